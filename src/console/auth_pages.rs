//! Signing up, in and out, and the password change (a form of the settings page, see
//! `settings_pages`). The same domain
//! functions as `POST /v1/signup` and `POST /v1/login` (Argon2id under the shared bound, the
//! per-email lockout) and the same per-address limit as those routes: the console is not a
//! way around any of them.

use actix_web::cookie::{time::Duration as CookieDuration, Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;

use super::format::time;
use super::key_pages::shown_once;
use super::layout::{notices, page, respond, Nav, Notice};
use super::{see_other, session, state, ConsoleError, NoFields, Owner, Posted, Result, BASE};
use crate::accounts::{self, Error as AccountError};
use crate::audit::{self, Action, Actor};
use crate::startup::AppState;

/// Messages for a form: at the top, and by field.
#[derive(Default)]
pub struct FormErrors {
    pub top: Vec<Notice>,
    pub email: Option<String>,
    pub password: Option<String>,
}

impl FormErrors {
    fn top(msg: impl Into<String>) -> FormErrors {
        FormErrors {
            top: vec![Notice::Error(msg.into())],
            ..FormErrors::default()
        }
    }
}

/// An account refusal as a form message, or the error it really is.
fn account_refusal(e: AccountError) -> Result<FormErrors> {
    Ok(match e {
        AccountError::InvalidEmail => FormErrors {
            email: Some("Enter an address like name@example.com.".into()),
            ..FormErrors::default()
        },
        AccountError::InvalidPassword => FormErrors {
            password: Some(e.to_string()),
            ..FormErrors::default()
        },
        AccountError::EmailTaken => FormErrors {
            email: Some("An account with this email already exists. Sign in instead.".into()),
            ..FormErrors::default()
        },
        AccountError::InvalidCredentials => FormErrors::top("The email or password is wrong."),
        AccountError::LockedOut { retry_after } => FormErrors::top(format!(
            "Too many failed sign-ins for this email. Try again in {} minute(s).",
            retry_after.div_ceil(60)
        )),
        AccountError::PasswordHashingBusy { retry_after } => FormErrors::top(format!(
            "We are checking many passwords right now. Try again in {retry_after} second(s)."
        )),
        other => return Err(ConsoleError::Internal(anyhow::Error::new(other))),
    })
}

/// A text input with its label and, when given, its message (tied to it for screen readers).
pub fn field(
    name: &str,
    label: &str,
    kind: &str,
    value: &str,
    autocomplete: &str,
    error: Option<&str>,
) -> Markup {
    let id = format!("f-{name}");
    let err_id = format!("{id}-error");
    html! {
        div.field {
            label for=(id) { (label) }
            @if let Some(e) = error {
                input id=(id) name=(name) type=(kind) value=(value) autocomplete=(autocomplete)
                    required aria-invalid="true" aria-describedby=(err_id);
                p.field-error id=(err_id) { (e) }
            } @else {
                input id=(id) name=(name) type=(kind) value=(value) autocomplete=(autocomplete) required;
            }
        }
    }
}

/// The cookie a form's token is bound to before login: the session's if there is one, else
/// the pre-session cookie (made here when missing, and returned to be set).
fn pre_secret(req: &HttpRequest) -> (String, Option<Cookie<'static>>) {
    if let Some(c) = req
        .cookie(session::COOKIE)
        .or_else(|| req.cookie(session::PRE_COOKIE))
    {
        return (c.value().to_owned(), None);
    }
    let secret = session::new_secret();
    let cookie = Cookie::build(session::PRE_COOKIE, secret.clone())
        .path(BASE)
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(CookieDuration::hours(1))
        .finish();
    (secret, Some(cookie))
}

fn with_cookies(mut res: HttpResponse, cookies: Vec<Cookie<'static>>) -> HttpResponse {
    for c in cookies {
        if let Err(e) = res.add_cookie(&c) {
            tracing::warn!(error = %e, "setting a console cookie failed");
        }
    }
    res
}

/// Where to go after login: only a console path of ours (never another site, nor `//host`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with(BASE)
                && !n.starts_with("//")
                && !n.contains("://")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n.to_owned()
        }
        _ => format!("{BASE}/"),
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    signed_out: Option<String>,
    changed: Option<String>,
}

fn login_page(csrf: &str, email: &str, next: &str, errors: &FormErrors) -> Markup {
    page(
        "Sign in",
        None,
        Nav::None,
        html! {
            section.card.narrow {
                h1 { "Sign in" }
                (notices(&errors.top))
                form method="post" action={(BASE) "/login"} novalidate {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="next" value=(next);
                    (field("email", "Email", "email", email, "username", errors.email.as_deref()))
                    (field("password", "Password", "password", "", "current-password", errors.password.as_deref()))
                    button type="submit" { "Sign in" }
                }
                p { "New here? " a href={(BASE) "/signup"} { "Create an account" } }
            }
        },
    )
}

/// `GET /console/login`
pub async fn login_form(req: HttpRequest, q: web::Query<LoginQuery>) -> HttpResponse {
    let (secret, cookie) = pre_secret(&req);
    let mut errors = FormErrors::default();
    if q.signed_out.is_some() {
        errors.top.push(Notice::Ok("You are signed out.".into()));
    }
    if q.changed.is_some() {
        errors.top.push(Notice::Ok(
            "Your password was changed. Sign in with the new one.".into(),
        ));
    }
    let next = safe_next(q.next.as_deref());
    let markup = login_page(&session::csrf_token(&secret), "", &next, &errors);
    with_cookies(
        respond(StatusCode::OK, markup),
        cookie.into_iter().collect(),
    )
}

#[derive(Deserialize)]
pub struct Credentials {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    next: Option<String>,
}

/// The per-address limit signup and login share with `POST /v1/signup` and `/v1/login`:
/// `Some(message)` when this address is over it.
fn over_ip_limit(state: &AppState, req: &HttpRequest) -> Option<String> {
    let ip = state.limits.client_ip(req)?;
    let d = state.limits.check_ip(ip);
    (!d.allowed).then(|| {
        crate::metrics::rate_limited(crate::metrics::Limit::Ip);
        format!(
            "Too many attempts from your address. Try again in {} second(s).",
            d.retry_after_secs
        )
    })
}

/// A new session for `account_id`: its cookie, with the pre-session cookie removed. The
/// login's audit row is written with it.
async fn start_session(
    state: &AppState,
    account_id: uuid::Uuid,
    who: &Actor,
    how: &str,
) -> Result<Vec<Cookie<'static>>> {
    let mut client = state.db.get().await.map_err(crate::db::Error::from)?;
    let tx = client.transaction().await.map_err(crate::db::Error::from)?;
    let secret = session::create(&tx, account_id).await?;
    audit::record(
        &tx,
        who,
        Action::LoginSuccess,
        Some(account_id),
        None,
        json!({"via": "console", "how": how}),
    )
    .await
    .map_err(|e| ConsoleError::Internal(anyhow::Error::new(e)))?;
    tx.commit().await.map_err(crate::db::Error::from)?;
    let session_cookie = Cookie::build(session::COOKIE, secret)
        .path(BASE)
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(super::secure_cookies(state))
        .max_age(CookieDuration::seconds(session::ABSOLUTE.as_secs() as i64))
        .finish();
    let mut gone = Cookie::build(session::PRE_COOKIE, "").path(BASE).finish();
    gone.make_removal();
    Ok(vec![session_cookie, gone])
}

/// `POST /console/login`
pub async fn login(req: HttpRequest, form: Posted<Credentials>) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(form) = form;
    let next = safe_next(form.next.as_deref());
    let csrf = super::form_secret(&req)
        .map(|s| session::csrf_token(&s))
        .unwrap_or_default();
    let fail = |status, errors: FormErrors| {
        Ok(respond(
            status,
            login_page(&csrf, &form.email, &next, &errors),
        ))
    };
    if let Some(msg) = over_ip_limit(&state, &req) {
        return fail(StatusCode::TOO_MANY_REQUESTS, FormErrors::top(msg));
    }
    let who = Actor::login(state.limits.client_ip(&req));
    let checked = accounts::check_password(
        &state.db,
        &state.passwords,
        &form.email,
        SecretString::from(form.password.clone()),
        state.config.login_lockout,
        &who,
    )
    .await;
    let account_id = match checked {
        Ok(id) => id,
        // A malformed email is "wrong email or password" too: the login form does not
        // tell which addresses could have accounts.
        Err(AccountError::InvalidEmail) => {
            return fail(
                StatusCode::UNPROCESSABLE_ENTITY,
                FormErrors::top("The email or password is wrong."),
            )
        }
        Err(e) => {
            let status = match &e {
                AccountError::LockedOut { .. } => StatusCode::TOO_MANY_REQUESTS,
                AccountError::PasswordHashingBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            return fail(status, account_refusal(e)?);
        }
    };
    let cookies = start_session(&state, account_id, &who, "password").await?;
    Ok(with_cookies(see_other(&next), cookies))
}

fn signup_page(csrf: &str, email: &str, errors: &FormErrors, credits: i64) -> Markup {
    page(
        "Create an account",
        None,
        Nav::None,
        html! {
            section.card.narrow {
                h1 { "Create an account" }
                @if credits > 0 {
                    p { "New accounts start with " (super::format::thousands(credits)) " free credits." }
                }
                (notices(&errors.top))
                form method="post" action={(BASE) "/signup"} novalidate {
                    input type="hidden" name="csrf" value=(csrf);
                    (field("email", "Email", "email", email, "email", errors.email.as_deref()))
                    (field("password", "Password (at least 8 characters)", "password", "", "new-password", errors.password.as_deref()))
                    button type="submit" { "Create account" }
                }
                p { "Already have an account? " a href={(BASE) "/login"} { "Sign in" } }
            }
        },
    )
}

/// `GET /console/signup`
pub async fn signup_form(req: HttpRequest) -> Result<HttpResponse> {
    let state = state(&req)?;
    let (secret, cookie) = pre_secret(&req);
    let markup = signup_page(
        &session::csrf_token(&secret),
        "",
        &FormErrors::default(),
        state.config.signup_credits,
    );
    Ok(with_cookies(
        respond(StatusCode::OK, markup),
        cookie.into_iter().collect(),
    ))
}

/// `POST /console/signup`: the account, its first key (shown once, here) and a session.
pub async fn signup(req: HttpRequest, form: Posted<Credentials>) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(form) = form;
    let csrf = super::form_secret(&req)
        .map(|s| session::csrf_token(&s))
        .unwrap_or_default();
    let credits = state.config.signup_credits;
    if let Some(msg) = over_ip_limit(&state, &req) {
        return Ok(respond(
            StatusCode::TOO_MANY_REQUESTS,
            signup_page(&csrf, &form.email, &FormErrors::top(msg), credits),
        ));
    }
    let created = accounts::signup(
        &state.db,
        &state.tiers,
        &state.passwords,
        &form.email,
        SecretString::from(form.password.clone()),
        credits,
        state.config.signup_credits_ttl,
    )
    .await;
    let (account, key) = match created {
        Ok(done) => done,
        Err(e) => {
            let status = match &e {
                AccountError::PasswordHashingBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
                AccountError::EmailTaken => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            let errors = account_refusal(e)?;
            return Ok(respond(
                status,
                signup_page(&csrf, &form.email, &errors, credits),
            ));
        }
    };
    let who = Actor::login(state.limits.client_ip(&req));
    let cookies = start_session(&state, account.id, &who, "signup").await?;
    let markup = page(
        "Welcome",
        None,
        Nav::None,
        html! {
            section.card {
                h1 { "Your account is ready" }
                p { "Signed in as " strong { (account.email) } ", with "
                    strong.balance-inline { (super::format::thousands(account.credit_balance)) " credits" } "." }
                (shown_once(&key.key, &key.view.name))
                p { a.button href={(BASE) "/"} { "Continue to the overview" } }
            }
        },
    );
    Ok(with_cookies(respond(StatusCode::OK, markup), cookies))
}

/// `POST /console/logout`: the session row is deleted (dead on every instance) and the
/// cookie cleared.
pub async fn logout(req: HttpRequest, owner: Owner, _: Posted<NoFields>) -> Result<HttpResponse> {
    let state = state(&req)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    session::delete(&client, owner.secret()).await?;
    let mut gone = Cookie::build(session::COOKIE, "").path(BASE).finish();
    gone.make_removal();
    Ok(with_cookies(
        see_other(&format!("{BASE}/login?signed_out=1")),
        vec![gone],
    ))
}

/// The settings page's account facts.
pub fn account_section(owner: &Owner, state: &AppState) -> Markup {
    let a = &owner.account;
    let tier = state.tiers.get_or_default(&a.tier);
    html! {
        section.card {
            h2 { "Account" }
            dl.facts {
                dt { "Email" } dd { (a.email) }
                dt { "Account id" } dd { code { (a.id) } }
                dt { "Tier" } dd { (a.tier) }
                dt { "Requests per minute" } dd {
                    @if tier.unlimited { "unlimited" } @else { (super::format::thousands(tier.requests_per_minute.into())) }
                }
                dt { "Created" } dd { (time(a.created_at)) }
            }
        }
    }
}

/// The settings page's password form (its messages: `email` is the current password's,
/// `password` the new one's).
pub fn password_section(owner: &Owner, errors: &FormErrors) -> Markup {
    html! {
        section.card {
            h2 { "Change password" }
            p.muted { "Other sessions of this account are signed out when the password changes." }
            form method="post" action={(BASE) "/settings/password"} novalidate {
                input type="hidden" name="csrf" value=(owner.csrf());
                (field("current", "Current password", "password", "", "current-password", errors.email.as_deref()))
                (field("new", "New password (at least 8 characters)", "password", "", "new-password", errors.password.as_deref()))
                button type="submit" { "Change password" }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct PasswordChange {
    #[serde(default)]
    current: String,
    #[serde(default)]
    new: String,
}

/// `POST /console/settings/password`
pub async fn change_password(
    req: HttpRequest,
    owner: Owner,
    form: Posted<PasswordChange>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(form) = form;
    let changed = accounts::change_password(
        &state.db,
        &state.passwords,
        owner.account.id,
        SecretString::from(form.current),
        SecretString::from(form.new),
        state.config.login_lockout,
        &Actor::login(state.limits.client_ip(&req)),
    )
    .await;
    let errors = match changed {
        Ok(()) => {
            let client = state.db.get().await.map_err(crate::db::Error::from)?;
            session::delete_others(&client, owner.account.id, owner.secret()).await?;
            FormErrors {
                top: vec![Notice::Ok("Your password was changed.".into())],
                ..FormErrors::default()
            }
        }
        // The field's own words: "current" is the first field, "new" the second.
        Err(AccountError::InvalidCredentials) => FormErrors {
            email: Some("This is not the current password.".into()),
            ..FormErrors::default()
        },
        Err(e) => account_refusal(e)?,
    };
    let status = if matches!(errors.top.first(), Some(Notice::Ok(_))) {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    super::settings_pages::render(
        &req,
        &owner,
        status,
        super::settings_pages::Messages {
            password: errors,
            ..Default::default()
        },
    )
    .await
}
