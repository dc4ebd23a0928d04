//! The one error type every route returns, rendered as RFC 9457 `application/problem+json`.
//!
//! When to use what: lower layers return `anyhow::Result` with `.context(…)` for failures a
//! client cannot cause (they become [`ApiError::Internal`], logged in full and shown as a
//! bare 500); anything a client can cause or act on is a typed variant here with a stable
//! `type` slug that client code may match on. A body never carries a stack trace, SQL text or
//! a secret: `Internal` and database errors show only a generic sentence and the request id
//! that finds the log line.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Map, Value};

use crate::http::request_id;

pub const PROBLEM_JSON: &str = "application/problem+json";

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
    #[error("conflict: {detail}")]
    Conflict { kind: &'static str, detail: String },
    #[error("request timed out")]
    Timeout,
    #[error("database unavailable")]
    DatabaseUnavailable,
    #[error("service not ready")]
    NotReady(String),
    #[error("temporarily unavailable: {detail}")]
    Unavailable { kind: &'static str, detail: String },
    #[error("feature disabled: {0}")]
    Disabled(String),
    /// Any other problem with its own status and stable type (the job outcomes: 422
    /// `url_not_allowed`, 429 `queue_full`, 502 `upstream_failed`, 503
    /// `upstream_unavailable`, 504 `job_timeout`…), carrying extension members.
    #[error("{}", .0.detail)]
    Problem(Box<Problem>),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// The parts of an [`ApiError::Problem`].
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub extensions: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn problem(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        ApiError::Problem(Box::new(Problem {
            status,
            kind,
            title,
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

    /// (stable type slug, title) for each variant.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::NotFound(_) => ("not_found", "Not found"),
            ApiError::MethodNotAllowed => ("method_not_allowed", "Method not allowed"),
            ApiError::PayloadTooLarge { .. } => ("payload_too_large", "Payload too large"),
            ApiError::InvalidJson(_) => ("invalid_json", "Invalid JSON body"),
            ApiError::InvalidRequest(_) => ("invalid_request", "Invalid request"),
            ApiError::Validation { .. } => ("validation_failed", "Validation failed"),
            ApiError::UnsupportedMediaType(_) => {
                ("unsupported_media_type", "Unsupported media type")
            }
            ApiError::InvalidApiKey => ("invalid_api_key", "Invalid API key"),
            ApiError::InsufficientScope { .. } => ("insufficient_scope", "Insufficient scope"),
            ApiError::AdminUnauthorized => ("invalid_admin_token", "Invalid admin token"),
            ApiError::InvalidCredentials => ("invalid_credentials", "Invalid credentials"),
            ApiError::InsufficientCredits { .. } => {
                ("insufficient_credits", "Insufficient credits")
            }
            ApiError::IdempotencyKeyReused => ("idempotency_key_reused", "Idempotency key reused"),
            ApiError::InvalidSignature => ("invalid_signature", "Invalid signature"),
            ApiError::RateLimited { .. } => ("rate_limited", "Too many requests"),
            ApiError::Conflict { kind, .. } => (kind, "Conflict"),
            ApiError::Timeout => ("request_timeout", "Request timed out"),
            ApiError::DatabaseUnavailable => ("database_unavailable", "Database unavailable"),
            ApiError::NotReady(_) => ("not_ready", "Service not ready"),
            ApiError::Unavailable { kind, .. } => (kind, "Service unavailable"),
            ApiError::Disabled(_) => ("feature_disabled", "Feature disabled"),
            ApiError::Problem(p) => (p.kind, p.title),
            ApiError::Internal(_) => ("internal_error", "Internal server error"),
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
            ApiError::Conflict { detail, .. } => detail.clone(),
            ApiError::Timeout => "The request took longer than the server allows.".into(),
            ApiError::DatabaseUnavailable => "The database is unavailable; retry shortly.".into(),
            ApiError::NotReady(d) => d.clone(),
            ApiError::Unavailable { detail, .. } => detail.clone(),
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

/// A problem body for a status that has no richer error attached (actix's own 404/405/413,
/// a panic, a timeout): used by the edge middleware so *every* error leaves as problem+json.
pub fn problem_for_status(status: StatusCode) -> (&'static str, &'static str, &'static str) {
    let (slug, title, detail) = match status.as_u16() {
        400 => (
            "bad_request",
            "Bad request",
            "The request could not be understood.",
        ),
        404 => ("not_found", "Not found", "No route matches this path."),
        405 => (
            "method_not_allowed",
            "Method not allowed",
            "This route does not accept that method.",
        ),
        408 => (
            "request_timeout",
            "Request timeout",
            "The request was not received in time.",
        ),
        413 => (
            "payload_too_large",
            "Payload too large",
            "The request body is larger than the server accepts.",
        ),
        414 => (
            "uri_too_long",
            "URI too long",
            "The request URI is too long.",
        ),
        415 => (
            "unsupported_media_type",
            "Unsupported media type",
            "Send the body as application/json.",
        ),
        431 => (
            "headers_too_large",
            "Request header fields too large",
            "The request headers are too large.",
        ),
        503 => (
            "service_unavailable",
            "Service unavailable",
            "The service is temporarily unavailable.",
        ),
        504 => (
            "request_timeout",
            "Request timed out",
            "The request took longer than the server allows.",
        ),
        s if s >= 500 => (
            "internal_error",
            "Internal server error",
            "An unexpected error occurred; quote the request id when reporting it.",
        ),
        _ => ("client_error", "Client error", "The request was refused."),
    };
    (slug, title, detail)
}

/// Builds the JSON body of a problem, stamped with the current request's id.
pub fn problem_body(
    slug: &str,
    title: &str,
    status: StatusCode,
    detail: &str,
    extensions: Map<String, Value>,
) -> Value {
    let mut body = Map::new();
    body.insert("type".into(), json!(slug));
    body.insert("title".into(), json!(title));
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
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidJson(_) | ApiError::InvalidRequest(_) | ApiError::InvalidSignature => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Validation { .. } | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidApiKey
            | ApiError::AdminUnauthorized
            | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::InsufficientScope { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::DatabaseUnavailable
            | ApiError::NotReady(_)
            | ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Disabled(_) => StatusCode::NOT_FOUND,
            ApiError::Problem(p) => p.status,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::Internal(e) = self {
            // The full chain goes to the log (with the request id from the span), never out.
            tracing::error!(error = ?e, "internal error");
        }
        let (slug, title) = self.kind();
        let body = problem_body(slug, title, status, &self.detail(), self.extensions());
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
            ApiError::DatabaseUnavailable
            | ApiError::NotReady(_)
            | ApiError::Unavailable { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u32));
            }
            ApiError::Problem(p) => {
                if let Some(secs) = p.retry_after {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            _ => {}
        }
        res
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Timeout(_) | PoolError::Backend(_) | PoolError::Closed => {
                tracing::warn!(error = %e, "database pool could not provide a connection");
                ApiError::DatabaseUnavailable
            }
            other => ApiError::Internal(anyhow::Error::new(other).context("database pool")),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        if crate::db::is_connection_error(&e) {
            tracing::warn!(error = %e, "database connection lost");
            ApiError::DatabaseUnavailable
        } else {
            ApiError::Internal(anyhow::Error::new(e).context("database query"))
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
