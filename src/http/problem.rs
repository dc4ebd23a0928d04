//! The one place where a refusal becomes an HTTP status and a problem `type`, rendered as
//! RFC 9457 `application/problem+json`.
//!
//! When to use which error:
//!
//! - **Domain modules** (`credits/`, `accounts/`, `auth/`, `jobs/`, `billing/`,
//!   `idempotency`) return their own `thiserror` enums that say what happened in the
//!   domain's words (`credits::Error::InsufficientCredits { balance, cost }`), never a status
//!   code. Database failures travel inside them as [`crate::db::Error`].
//! - **Background tasks** (workers, reapers, purges) and start-up return `anyhow::Result`
//!   with `.context(…)`: nobody answers a client from there, a log line is the outcome.
//! - **HTTP code** (routes, extractors, gates) returns [`ApiError`]. Each domain enum has a
//!   `From` impl into it, in the domain's own `http` glue or here; that impl is where a
//!   refusal is given its status and its [`ProblemType`]. Anything a client cannot cause
//!   becomes [`ApiError::Internal`]: logged in full, shown as a bare 500 with the request id.
//!
//! A body never carries a stack trace, SQL text or a secret. Every `type` the API can answer
//! is a [`ProblemType`]; the OpenAPI document, the `/docs` page and [`ApiError`] all read that
//! one list, so a slug is never a string at a call site.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Map, Value};

use crate::http::request_id;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Declares [`ProblemType`]: variant => (slug, statuses it is sent with, title, description).
macro_rules! problem_types {
    ($($name:ident => ($slug:literal, [$($status:literal),*], $title:literal, $desc:expr)),* $(,)?) => {
        /// Every problem `type` the API can answer. Clients match on the slug, never on
        /// `detail`.
        /// Its OpenAPI schema (`utoipa::ToSchema`) is written by hand in
        /// `crate::openapi::components`, to carry each type's statuses and description.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ProblemType {
            $(#[doc = $desc] $name,)*
        }

        impl ProblemType {
            /// Every type, in the order the docs list them.
            pub const ALL: &'static [ProblemType] = &[$(ProblemType::$name,)*];

            /// The stable `type` slug in a problem body.
            pub const fn slug(self) -> &'static str {
                match self { $(ProblemType::$name => $slug,)* }
            }

            /// Every status this type is sent with (empty: any other 4xx).
            pub const fn statuses(self) -> &'static [u16] {
                match self { $(ProblemType::$name => &[$($status),*],)* }
            }

            /// The short, fixed `title` of the problem body.
            pub const fn title(self) -> &'static str {
                match self { $(ProblemType::$name => $title,)* }
            }

            /// What the type means and what a client should do (the docs' table).
            pub const fn description(self) -> &'static str {
                match self { $(ProblemType::$name => $desc,)* }
            }
        }
    };
}

problem_types! {
    InvalidJson => ("invalid_json", [400], "Invalid JSON body",
        "The body is not well-formed JSON."),
    InvalidRequest => ("invalid_request", [400], "Invalid request",
        "A malformed query string, cursor or header (e.g. `Idempotency-Key`), or a body that \
         could not be read."),
    InvalidSignature => ("invalid_signature", [400], "Invalid signature",
        "A webhook signature that is missing, malformed, stale or wrong."),
    BadRequest => ("bad_request", [400], "Bad request",
        "A request the server could not understand."),
    InvalidApiKey => ("invalid_api_key", [401], "Invalid API key",
        "The API key is missing, malformed, unknown, expired or revoked, or its account is \
         suspended. The same body in every case."),
    InvalidAdminToken => ("invalid_admin_token", [401], "Invalid admin token",
        "The admin token is missing or wrong."),
    InvalidCredentials => ("invalid_credentials", [401], "Invalid credentials",
        "Wrong email or password."),
    InsufficientCredits => ("insufficient_credits", [402], "Insufficient credits",
        "The balance does not cover the cost; `balance` and `cost` say by how much."),
    InsufficientScope => ("insufficient_scope", [403], "Insufficient scope",
        "The key lacks the scope the operation needs; `required_scope` names it. Also when a \
         key would create or rotate a key with more than it has: `missing_scopes` lists the \
         scopes it lacks (empty when the new key would outlive it or have a higher rate limit)."),
    NotFound => ("not_found", [404], "Not found",
        "No such resource on this account, or no route matches the path."),
    FeatureDisabled => ("feature_disabled", [404], "Feature disabled",
        "The feature (signup, billing, the webhook) is not enabled on this server."),
    MethodNotAllowed => ("method_not_allowed", [405], "Method not allowed",
        "The path exists but does not take this method."),
    EmailTaken => ("email_taken", [409], "Conflict",
        "An account with this email already exists."),
    KeyRevoked => ("key_revoked", [409], "Conflict",
        "A revoked key cannot be rotated."),
    KeyLimitReached => ("key_limit_reached", [409], "Key limit reached",
        "The account already holds its tier's `max_keys` active keys; revoke one first."),
    KeyAlreadyRotated => ("key_already_rotated", [409], "Conflict",
        "The key already has a successor."),
    JobNotCancellable => ("job_not_cancellable", [409], "Job not cancellable",
        "Only a queued job can be cancelled; this one is running or finished (`job_status`)."),
    JobCancelled => ("job_cancelled", [409], "Job cancelled",
        "The job `POST /v1/scrape` waited for was cancelled before it ran; refunded \
         (`job_id`, `reason`, `refunded`, `cost`)."),
    PlanActive => ("plan_active", [409], "Plan active",
        "The account already has a plan (`subscription`); change or cancel it through the \
         customer portal (`POST /v1/billing/portal`) instead of buying a second one."),
    IdempotencyConflict => ("idempotency_conflict", [409], "Conflict",
        "A request with this `Idempotency-Key` is still running; retry later. Also the answer \
         of an attempt that outlived its claim (a retry took the key over): that attempt was \
         undone, and a retry with the same key gets the outcome."),
    PayloadTooLarge => ("payload_too_large", [413], "Payload too large",
        "The body is larger than the server accepts."),
    UriTooLong => ("uri_too_long", [414], "URI too long",
        "The request URI is too long."),
    UnsupportedMediaType => ("unsupported_media_type", [415], "Unsupported media type",
        "Send the body as `application/json`."),
    ValidationFailed => ("validation_failed", [422], "Validation failed",
        "Well-formed JSON (or a query parameter) with a value the operation does not accept; \
         `field` names it when known."),
    IdempotencyKeyReused => ("idempotency_key_reused", [422], "Idempotency key reused",
        "This `Idempotency-Key` was used with a different request; use a new key."),
    UrlNotAllowed => ("url_not_allowed", [422], "URL not allowed",
        "A scrape or webhook URL that is not http(s), carries credentials, or points at a \
         loopback, private, link-local, CGNAT, multicast or unique-local address (`field`). \
         Refused before any charge; from `POST /v1/scrape` also when a redirect led there \
         (with `job_id`, refunded)."),
    QueueFull => ("queue_full", [429], "Job queue full",
        "The account has as many queued jobs as its tier allows (`max_queued_jobs`); retry \
         after `Retry-After`. Nothing was charged."),
    RateLimited => ("rate_limited", [429], "Too many requests",
        "Too many requests: the tier's limit for the account (shared by all its keys), the \
         key's own `rate_limit`, the per-IP limit, or too many failed authentications. Wait \
         `Retry-After` seconds (also in `retry_after`)."),
    HeadersTooLarge => ("headers_too_large", [431], "Request header fields too large",
        "The request headers are too large."),
    ClientError => ("client_error", [], "Client error",
        "Any other refused request (a 4xx status without a more specific type)."),
    InternalError => ("internal_error", [500], "Internal server error",
        "An unexpected error; quote `request_id` when reporting it."),
    UpstreamFailed => ("upstream_failed", [502], "Upstream failed",
        "The scraped site failed (5xx, 429, a block, a network, DNS or TLS error…) or its \
         page could not be processed; the job is refunded (`job_id`, `reason`, \
         `upstream_status`)."),
    DatabaseUnavailable => ("database_unavailable", [503], "Database unavailable",
        "The database is unavailable; retry after `Retry-After`. From `POST /v1/scrape` with \
         `job_id`: the job was queued but its end could not be read; look it up."),
    UpstreamUnavailable => ("upstream_unavailable", [503], "Upstream unavailable",
        "The target origin's or the egress provider's circuit breaker is open (`breaker`, \
         `scope`), so nothing was charged; or it opened while the job waited (`job_id`, \
         refunded). Retry after `Retry-After`."),
    PasswordHashingBusy => ("password_hashing_busy", [503], "Service unavailable",
        "Signup or login: the server is hashing as many passwords as it allows at once (a \
         bounded number per instance, with a short line behind it); retry after \
         `Retry-After`. Nothing was created, and a refused login is not counted against its \
         email."),
    NotReady => ("not_ready", [503], "Service not ready",
        "The instance is not ready (its database did not answer)."),
    RateLimiterUnavailable => ("rate_limiter_unavailable", [503], "Service unavailable",
        "The shared rate-limit store is unreachable and the server is configured to refuse \
         rather than fall back."),
    PaymentProviderUnavailable => ("payment_provider_unavailable", [503], "Service unavailable",
        "Stripe did not answer; retry."),
    ServiceUnavailable => ("service_unavailable", [503], "Service unavailable",
        "The service is temporarily unavailable."),
    RequestTimeout => ("request_timeout", [408, 504], "Request timed out",
        "The request took longer than the server allows."),
    JobTimeout => ("job_timeout", [504], "Job timed out",
        "The scrape job did not finish within its `timeout_ms`; refunded (`job_id`)."),
    RouteNotMetered => ("route_not_metered", [404], "Route not metered",
        "Gateway mode: no priced route in `KEYMETER_GATEWAY_ROUTES` covers the proxied request \
         (`method`, `path`); nothing was charged."),
    InvalidServiceToken => ("invalid_service_token", [401], "Invalid service token",
        "The service token (`KEYMETER_SERVICE_TOKENS`) is missing or wrong."),
    GatewayChargeNotFound => ("gateway_charge_not_found", [404], "Charge not found",
        "No gateway charge has this id (`X-Keymeter-Charge` names one)."),
    ChargeAlreadyRefunded => ("charge_already_refunded", [409], "Charge already refunded",
        "The gateway charge was refunded already (`refund` names the refund); a charge is \
         refunded at most once."),
    PaymentMethodRequired => ("payment_method_required", [409], "Payment method required",
        "Auto-recharge needs a card saved for off-session payments: buy a pack through \
         Checkout (it saves the card) or save one with `POST /v1/billing/auto-recharge/setup`, \
         then enable it again."),
    KeySpendLimitExceeded => ("key_spend_limit_exceeded", [402], "Key spend limit exceeded",
        "The charge or job would take the calling key's spend in its period past the key's \
         `spend_limit`; nothing was charged or queued. `key_id`, `limit`, `period`, `spent`, \
         `cost` and `resets_at` (when the period ends) say by how much and until when."),
    WebhookEndpointLimitReached => ("webhook_endpoint_limit_reached", [409], "Webhook endpoint limit reached",
        "The account already holds the most webhook endpoints it may (`max_endpoints`); delete \
         one first."),
}

impl ProblemType {
    /// The status a problem of this type is sent with by default (its first listed one).
    pub fn status(self) -> StatusCode {
        self.statuses()
            .first()
            .and_then(|s| StatusCode::from_u16(*s).ok())
            .unwrap_or(StatusCode::BAD_REQUEST)
    }

    /// The type for a slug, when it is one of ours.
    pub fn from_slug(slug: &str) -> Option<ProblemType> {
        ProblemType::ALL.iter().copied().find(|t| t.slug() == slug)
    }
}

impl std::fmt::Display for ProblemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.slug())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("payload too large")]
    PayloadTooLarge { limit: usize },
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("validation failed: {detail}")]
    Validation {
        detail: String,
        field: Option<&'static str>,
    },
    #[error("unsupported media type")]
    UnsupportedMediaType(String),
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("insufficient scope")]
    InsufficientScope { required: &'static str },
    #[error("admin token required")]
    AdminUnauthorized,
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("insufficient credits")]
    InsufficientCredits { balance: i64, cost: i64 },
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    #[error("invalid webhook signature")]
    InvalidSignature,
    #[error("rate limited")]
    RateLimited {
        retry_after_secs: u64,
        detail: String,
    },
    #[error("request timed out")]
    Timeout,
    #[error("database unavailable")]
    DatabaseUnavailable,
    #[error("service not ready")]
    NotReady(String),
    #[error("feature disabled: {0}")]
    Disabled(String),
    /// Any other problem: its [`ProblemType`] gives the status and title (a 409
    /// `email_taken`, a 429 `queue_full`, a 503 `payment_provider_unavailable`…); it may carry
    /// extension members and a `Retry-After`.
    #[error("{}", .0.detail)]
    Problem(Box<Problem>),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// The parts of an [`ApiError::Problem`].
#[derive(Debug)]
pub struct Problem {
    pub kind: ProblemType,
    pub detail: String,
    pub extensions: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A problem of this type, sent with the type's status.
    pub fn problem(kind: ProblemType, detail: impl Into<String>) -> Self {
        ApiError::Problem(Box::new(Problem {
            kind,
            detail: detail.into(),
            extensions: Map::new(),
            retry_after: None,
        }))
    }

    /// Adds an extension member to an [`ApiError::Problem`] (no-op on other variants).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let ApiError::Problem(p) = &mut self {
            p.extensions.insert(key.to_owned(), value.into());
        }
        self
    }

    /// Sets `Retry-After` on an [`ApiError::Problem`].
    pub fn retry_after(mut self, secs: u64) -> Self {
        if let ApiError::Problem(p) = &mut self {
            p.retry_after = Some(secs);
        }
        self
    }

    pub fn validation(field: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Validation {
            detail: detail.into(),
            field: Some(field),
        }
    }

    /// The problem type of this error.
    pub fn kind(&self) -> ProblemType {
        match self {
            ApiError::NotFound(_) => ProblemType::NotFound,
            ApiError::MethodNotAllowed => ProblemType::MethodNotAllowed,
            ApiError::PayloadTooLarge { .. } => ProblemType::PayloadTooLarge,
            ApiError::InvalidJson(_) => ProblemType::InvalidJson,
            ApiError::InvalidRequest(_) => ProblemType::InvalidRequest,
            ApiError::Validation { .. } => ProblemType::ValidationFailed,
            ApiError::UnsupportedMediaType(_) => ProblemType::UnsupportedMediaType,
            ApiError::InvalidApiKey => ProblemType::InvalidApiKey,
            ApiError::InsufficientScope { .. } => ProblemType::InsufficientScope,
            ApiError::AdminUnauthorized => ProblemType::InvalidAdminToken,
            ApiError::InvalidCredentials => ProblemType::InvalidCredentials,
            ApiError::InsufficientCredits { .. } => ProblemType::InsufficientCredits,
            ApiError::IdempotencyKeyReused => ProblemType::IdempotencyKeyReused,
            ApiError::InvalidSignature => ProblemType::InvalidSignature,
            ApiError::RateLimited { .. } => ProblemType::RateLimited,
            ApiError::Timeout => ProblemType::RequestTimeout,
            ApiError::DatabaseUnavailable => ProblemType::DatabaseUnavailable,
            ApiError::NotReady(_) => ProblemType::NotReady,
            ApiError::Disabled(_) => ProblemType::FeatureDisabled,
            ApiError::Problem(p) => p.kind,
            ApiError::Internal(_) => ProblemType::InternalError,
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::NotFound(what) => what.clone(),
            ApiError::MethodNotAllowed => "This route does not accept that method.".into(),
            ApiError::PayloadTooLarge { limit } => {
                format!("The request body is larger than the limit of {limit} bytes.")
            }
            ApiError::InvalidJson(d) => d.clone(),
            ApiError::InvalidRequest(d) => d.clone(),
            ApiError::Validation { detail, .. } => detail.clone(),
            ApiError::UnsupportedMediaType(d) => d.clone(),
            ApiError::InvalidApiKey => {
                "The API key is missing, malformed, unknown, expired or revoked.".into()
            }
            ApiError::InsufficientScope { required } => {
                format!("This API key lacks the `{required}` scope this route needs.")
            }
            ApiError::AdminUnauthorized => "A valid admin token is required.".into(),
            ApiError::InvalidCredentials => "The email or password is wrong.".into(),
            ApiError::InsufficientCredits { balance, cost } => {
                format!("This costs {cost} credits and the balance is {balance}.")
            }
            ApiError::IdempotencyKeyReused => {
                "This Idempotency-Key was used with a different request; use a new key.".into()
            }
            ApiError::InvalidSignature => "The signature could not be verified.".into(),
            ApiError::RateLimited { detail, .. } => detail.clone(),
            ApiError::Timeout => "The request took longer than the server allows.".into(),
            ApiError::DatabaseUnavailable => "The database is unavailable; retry shortly.".into(),
            ApiError::NotReady(d) => d.clone(),
            ApiError::Disabled(d) => d.clone(),
            ApiError::Problem(p) => p.detail.clone(),
            ApiError::Internal(_) => {
                "An unexpected error occurred; quote the request id when reporting it.".into()
            }
        }
    }

    fn extensions(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            ApiError::Validation { field: Some(f), .. } => {
                m.insert("field".into(), json!(f));
            }
            ApiError::InsufficientScope { required } => {
                m.insert("required_scope".into(), json!(required));
            }
            ApiError::RateLimited {
                retry_after_secs, ..
            } => {
                m.insert("retry_after".into(), json!(retry_after_secs));
            }
            ApiError::InsufficientCredits { balance, cost } => {
                m.insert("balance".into(), json!(balance));
                m.insert("cost".into(), json!(cost));
            }
            ApiError::Problem(p) => {
                m.extend(p.extensions.clone());
            }
            _ => {}
        }
        m
    }
}

/// A problem for a status that has no richer error attached (actix's own 404/405/413, a
/// panic, a timeout): used by the edge middleware so *every* error leaves as problem+json.
/// Returns the type and the detail sentence.
pub fn problem_for_status(status: StatusCode) -> (ProblemType, &'static str) {
    match status.as_u16() {
        400 => (
            ProblemType::BadRequest,
            "The request could not be understood.",
        ),
        404 => (ProblemType::NotFound, "No route matches this path."),
        405 => (
            ProblemType::MethodNotAllowed,
            "This route does not accept that method.",
        ),
        408 => (
            ProblemType::RequestTimeout,
            "The request was not received in time.",
        ),
        413 => (
            ProblemType::PayloadTooLarge,
            "The request body is larger than the server accepts.",
        ),
        414 => (ProblemType::UriTooLong, "The request URI is too long."),
        415 => (
            ProblemType::UnsupportedMediaType,
            "Send the body as application/json.",
        ),
        431 => (
            ProblemType::HeadersTooLarge,
            "The request headers are too large.",
        ),
        503 => (
            ProblemType::ServiceUnavailable,
            "The service is temporarily unavailable.",
        ),
        504 => (
            ProblemType::RequestTimeout,
            "The request took longer than the server allows.",
        ),
        s if s >= 500 => (
            ProblemType::InternalError,
            "An unexpected error occurred; quote the request id when reporting it.",
        ),
        _ => (ProblemType::ClientError, "The request was refused."),
    }
}

/// Builds the JSON body of a problem, stamped with the current request's id.
pub fn problem_body(
    kind: ProblemType,
    status: StatusCode,
    detail: &str,
    extensions: Map<String, Value>,
) -> Value {
    let mut body = Map::new();
    body.insert("type".into(), json!(kind.slug()));
    body.insert("title".into(), json!(kind.title()));
    body.insert("status".into(), json!(status.as_u16()));
    body.insert("detail".into(), json!(detail));
    if let Some(id) = request_id::current() {
        body.insert("request_id".into(), json!(id));
    }
    for (k, v) in extensions {
        body.insert(k, v);
    }
    Value::Object(body)
}

pub fn problem_response(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)))
        .body(body.to_string())
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            // Sent with a status of their own rather than their type's first one.
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Disabled(_) => StatusCode::NOT_FOUND,
            other => other.kind().status(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::Internal(e) = self {
            // The full chain goes to the log (with the request id from the span), never out.
            tracing::error!(error = ?e, "internal error");
        }
        let body = problem_body(self.kind(), status, &self.detail(), self.extensions());
        let mut res = problem_response(status, &body);
        let headers = res.headers_mut();
        match self {
            ApiError::InvalidApiKey | ApiError::AdminUnauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::DatabaseUnavailable | ApiError::NotReady(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            }
            ApiError::Problem(p) => {
                // A 503 without its own hint is a short outage: retry in a second.
                let secs = p
                    .retry_after
                    .or((status == StatusCode::SERVICE_UNAVAILABLE).then_some(1));
                if let Some(secs) = secs {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            _ => {}
        }
        res
    }
}

impl From<crate::db::Error> for ApiError {
    fn from(e: crate::db::Error) -> Self {
        match e {
            crate::db::Error::Unavailable(_) => ApiError::DatabaseUnavailable,
            crate::db::Error::Other(e) => ApiError::Internal(e),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        crate::db::Error::from(e).into()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        crate::db::Error::from(e).into()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

// Where each domain's refusals become problems: one file per domain, each holding the
// `From<domain::Error> for ApiError` impls.
mod accounts;
mod auth;
mod billing;
mod credits;
mod events;
mod gateway;
mod idempotency;
mod jobs;
mod operator;
mod pagination;
