//! The customer console: web pages at `/console` where a customer signs up, sees the balance
//! and usage, manages keys, follows jobs and buys credits.
//!
//! It is a thin layer like `routes/`: each handler reads a form or query, calls the same
//! domain function the API route calls (`accounts`, `auth::key_actions`, `credits::report`,
//! `credits::alerts`, `jobs::queue`, `billing`, `events::endpoints`) and renders HTML. It never calls keymeter's own HTTP API, so the
//! console and the API cannot disagree about a rule.
//!
//! - Pages are server-rendered with maud (HTML as a Rust macro: compiled and type-checked
//!   with the crate, escaped by default, nothing to find on disk at run time). Every action
//!   is a plain form that works without JavaScript; `assets/console/console.js` only adds a
//!   copy button and local times.
//! - A person is signed in by a session cookie (see [`session`]), not by an API key; the
//!   console acts for the account's owner, with every scope, and its changes are on the
//!   audit trail as the console's (actor: the client address).
//! - Every POST carries the session's CSRF token, checked by the [`Posted`] extractor before
//!   the handler sees the form: a handler cannot take a form without it.
//! - Every response carries a CSP of `default-src 'self'` (no inline script or style, which
//!   the pages do not use) and `frame-ancestors 'none'`.
//! - A domain refusal becomes a message next to its field or at the top of the page; only
//!   a bug or an outage is the console's own 500 page, and unknown paths its 404 page.

mod assets;
mod auth_pages;
mod billing_pages;
mod chart;
mod format;
mod key_pages;
mod layout;
mod pages;
pub mod session;
mod settings_pages;

use std::future::Future;
use std::pin::Pin;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::accounts::Account;
use crate::audit::Actor;
use crate::auth::{Authenticated, Scopes};
use crate::startup::AppState;

/// Where the console lives.
pub const BASE: &str = "/console";

/// The console's content security policy: nothing but this origin, no inline code, never in
/// a frame (clickjacking), no `<base>` games. `form-action` is left out on purpose: the
/// checkout form's answer redirects to Stripe, and Chrome holds redirects to it.
const CSP: &str = "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'";

/// Registers the console under [`BASE`]. Not in the API's route table (`routes::table`):
/// these are pages for people, not operations of the documented API.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope(BASE)
            .wrap(from_fn(headers))
            .route("", web::get().to(to_overview))
            .route("/", web::get().to(pages::overview))
            .route("/assets/{name}", web::get().to(assets::serve))
            .route("/login", web::get().to(auth_pages::login_form))
            .route("/login", web::post().to(auth_pages::login))
            .route("/signup", web::get().to(auth_pages::signup_form))
            .route("/signup", web::post().to(auth_pages::signup))
            .route("/logout", web::post().to(auth_pages::logout))
            .route("/settings", web::get().to(settings_pages::settings))
            .route(
                "/settings/password",
                web::post().to(auth_pages::change_password),
            )
            .route(
                "/settings/alerts",
                web::post().to(settings_pages::save_threshold),
            )
            .route(
                "/settings/webhooks",
                web::post().to(settings_pages::create_webhook),
            )
            .route(
                "/settings/webhooks/{id}",
                web::get().to(settings_pages::webhook),
            )
            .route(
                "/settings/webhooks/{id}/rotate",
                web::post().to(settings_pages::rotate_webhook),
            )
            .route(
                "/settings/webhooks/{id}/delete",
                web::get().to(settings_pages::confirm_delete_webhook),
            )
            .route(
                "/settings/webhooks/{id}/delete",
                web::post().to(settings_pages::delete_webhook),
            )
            .route("/keys", web::get().to(key_pages::list))
            .route("/keys", web::post().to(key_pages::create))
            .route(
                "/keys/{id}/revoke",
                web::get().to(key_pages::confirm_revoke),
            )
            .route("/keys/{id}/revoke", web::post().to(key_pages::revoke))
            .route("/keys/{id}/rotate", web::post().to(key_pages::rotate))
            .route("/usage", web::get().to(pages::usage))
            .route("/usage.csv", web::get().to(pages::usage_csv))
            .route("/jobs", web::get().to(pages::jobs))
            .route("/jobs/{id}", web::get().to(pages::job))
            .route("/billing", web::get().to(billing_pages::billing))
            .route("/billing/checkout", web::post().to(billing_pages::checkout))
            .route("/billing/portal", web::post().to(billing_pages::portal))
            .route(
                "/billing/auto-recharge",
                web::post().to(billing_pages::save_auto_recharge),
            )
            .route(
                "/billing/auto-recharge/setup",
                web::post().to(billing_pages::setup_card),
            )
            .default_service(web::to(not_found)),
    );
}

async fn to_overview() -> HttpResponse {
    see_other(&format!("{BASE}/"))
}

async fn not_found() -> Result<HttpResponse, ConsoleError> {
    Err(ConsoleError::NotFound)
}

/// The console's headers on every answer under [`BASE`], pages and errors alike.
async fn headers(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let mut res = next.call(req).await?.map_into_boxed_body();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    Ok(res)
}

/// A 303 to `to` (a path of ours): the answer to a form that worked, so reloading the page
/// does not post it again.
pub(crate) fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to))
        .finish()
}

/// What stops a console request before or outside its handler's own messages.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No live session: to the login page, coming back to `next` afterwards.
    #[error("not signed in")]
    SignedOut { next: String },
    /// A POST without the session's CSRF token (or with another session's).
    #[error("the form's CSRF token is missing or wrong")]
    Csrf,
    #[error("not found")]
    NotFound,
    /// The form could not be read at all (not a form, too large, a field of the wrong type).
    #[error("bad form: {0}")]
    BadForm(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<crate::db::Error> for ConsoleError {
    fn from(e: crate::db::Error) -> Self {
        ConsoleError::Internal(anyhow::Error::new(e))
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::SignedOut { .. } => StatusCode::SEE_OTHER,
            ConsoleError::Csrf => StatusCode::FORBIDDEN,
            ConsoleError::NotFound => StatusCode::NOT_FOUND,
            ConsoleError::BadForm(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ConsoleError::SignedOut { next } => {
                let q = serde_urlencoded::to_string([("next", next.as_str())]).unwrap_or_default();
                see_other(&format!("{BASE}/login?{q}"))
            }
            ConsoleError::Csrf => layout::error_page(
                StatusCode::FORBIDDEN,
                "This form has expired",
                "The form was not sent from this console's own page, or your session changed since \
                 it was shown. Go back, reload the page and try again.",
            ),
            ConsoleError::NotFound => layout::error_page(
                StatusCode::NOT_FOUND,
                "Page not found",
                "There is nothing at this address. It may have been removed, or the link is mistyped.",
            ),
            ConsoleError::BadForm(_) => layout::error_page(
                StatusCode::BAD_REQUEST,
                "That form could not be read",
                "Go back, check the fields and send it again.",
            ),
            ConsoleError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "console request failed");
                layout::error_page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong on our side",
                    "Nothing you did caused this. Try again in a moment; if it keeps happening, \
                     contact support with the time it happened.",
                )
            }
        }
    }
}

pub(crate) type Result<T, E = ConsoleError> = std::result::Result<T, E>;

/// The application state, as the console's extractors reach it.
fn state(req: &HttpRequest) -> Result<web::Data<AppState>> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ConsoleError::Internal(anyhow::anyhow!("application state missing")))
}

/// Whether cookies must be `Secure` (only over HTTPS): in production.
fn secure_cookies(state: &AppState) -> bool {
    state.config.env.is_production()
}

/// The signed-in customer: a live session's account. A handler that takes an `Owner` is
/// only reached signed in; without a session the request is sent to the login page.
pub struct Owner {
    pub account: Account,
    /// The session cookie's secret (its CSRF token is derived from it).
    secret: String,
    /// The client address, as the rate limits and the audit trail see it.
    pub actor: Actor,
}

impl Owner {
    /// The token every form of this session carries.
    pub fn csrf(&self) -> String {
        session::csrf_token(&self.secret)
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// The account's owner as the key actions see a caller: every scope, no expiry, no
    /// limit of its own — what a key created at signup could do. The id names no key; it is
    /// only what the actions compare against (a key's own id, which this can never be).
    pub fn as_caller(&self) -> Authenticated {
        Authenticated {
            key_id: "console".to_owned(),
            account_id: self.account.id,
            tier: self.account.tier.clone(),
            scopes: Scopes::of(&crate::auth::Scope::ALL),
            expires_at: None,
            rate_limit: None,
        }
    }
}

fn actor_of(state: &AppState, req: &HttpRequest) -> Actor {
    Actor::Console(
        state
            .limits
            .client_ip(req)
            .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()),
    )
}

impl FromRequest for Owner {
    type Error = ConsoleError;
    type Future = Pin<Box<dyn Future<Output = Result<Owner>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let next = match req.uri().path_and_query() {
                Some(pq) if req.method() == actix_web::http::Method::GET => pq.to_string(),
                _ => format!("{BASE}/"),
            };
            let signed_out = || ConsoleError::SignedOut { next: next.clone() };
            let Some(secret) = req.cookie(session::COOKIE).map(|c| c.value().to_owned()) else {
                return Err(signed_out());
            };
            let state = state(&req)?;
            let client = state.db.get().await.map_err(crate::db::Error::from)?;
            let Some(account_id) = session::touch(&client, &secret).await? else {
                return Err(signed_out());
            };
            let Some(account) = crate::accounts::get(&client, account_id).await? else {
                return Err(signed_out());
            };
            // A suspended account is signed out, as its keys are refused.
            if account.status != "active" {
                session::delete(&client, &secret).await?;
                return Err(signed_out());
            }
            let actor = actor_of(&state, &req);
            Ok(Owner {
                account,
                secret,
                actor,
            })
        })
    }
}

/// The secret a form's CSRF token is bound to: the session's cookie when there is one, else
/// the pre-session cookie (login, signup). `None`: neither cookie, so no token can match.
fn form_secret(req: &HttpRequest) -> Option<String> {
    req.cookie(session::COOKIE)
        .or_else(|| req.cookie(session::PRE_COOKIE))
        .map(|c| c.value().to_owned())
}

/// The largest form the console reads (its forms are a few short fields).
const FORM_LIMIT: usize = 16 * 1024;

/// A POSTed form whose CSRF token was checked; the handler gets `T`, the other fields.
pub struct Posted<T>(pub T);

/// The fields of a form that is only a button: its CSRF token and nothing else.
#[derive(Deserialize)]
pub struct NoFields {}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

impl<T: DeserializeOwned + 'static> FromRequest for Posted<T> {
    type Error = ConsoleError;
    type Future = Pin<Box<dyn Future<Output = Result<Posted<T>>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        let body = web::Bytes::from_request(&req, payload);
        Box::pin(async move {
            let secret = form_secret(&req).ok_or(ConsoleError::Csrf)?;
            let body = body
                .await
                .map_err(|e| ConsoleError::BadForm(e.to_string()))?;
            if body.len() > FORM_LIMIT {
                return Err(ConsoleError::BadForm("too large".into()));
            }
            let token: CsrfField = serde_urlencoded::from_bytes(&body)
                .map_err(|e| ConsoleError::BadForm(e.to_string()))?;
            if !session::csrf_matches(&secret, &token.csrf) {
                return Err(ConsoleError::Csrf);
            }
            let form: T = serde_urlencoded::from_bytes(&body)
                .map_err(|e| ConsoleError::BadForm(e.to_string()))?;
            Ok(Posted(form))
        })
    }
}
