//! How auth refusals become problems (status and [`ProblemType`](super::ProblemType)).
//!
//! Every key refusal is `401 invalid_api_key`; a scope the key lacks is
//! `403 insufficient_scope` with `required_scope`; a key that would create or rotate a key
//! with more than it has is `403 insufficient_scope` too, with `missing_scopes` (and the first
//! of them as `required_scope`, as every `insufficient_scope` carries one). The `detail` is
//! the domain's own sentence.

use super::{ApiError, ProblemType};
use crate::auth::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let detail = e.to_string();
        match e {
            Error::Db(db) => db.into(),
            Error::InvalidApiKey => ApiError::InvalidApiKey,
            Error::MissingScope { required } => ApiError::InsufficientScope { required },
            Error::ScopesBeyondCreator { missing, .. } => beyond_power(detail, &missing),
            Error::OutlivesCreator { .. } | Error::RateAboveCreator { .. } => {
                beyond_power(detail, &[])
            }
            Error::InvalidName => ApiError::validation("name", detail),
            Error::UnknownScope(_) | Error::NoScopes => ApiError::validation("scopes", detail),
            Error::ExpiryNotInFuture => ApiError::validation("expires_at", detail),
            Error::RateLimitOutOfRange { .. } => ApiError::validation("rate_limit", detail),
            Error::GraceOutOfRange => ApiError::validation("grace_seconds", detail),
            Error::KeyLimitReached { max, .. } => {
                ApiError::problem(ProblemType::KeyLimitReached, detail).with("max_keys", max)
            }
            Error::KeyRevoked => ApiError::problem(ProblemType::KeyRevoked, detail),
            Error::KeyAlreadyRotated { .. } => {
                ApiError::problem(ProblemType::KeyAlreadyRotated, detail)
            }
            Error::KeyNotFound | Error::AccountNotFound => ApiError::NotFound(detail),
        }
    }
}

fn beyond_power(detail: String, missing: &[&'static str]) -> ApiError {
    let mut e = ApiError::problem(ProblemType::InsufficientScope, detail)
        .with("missing_scopes", missing.to_vec());
    if let Some(first) = missing.first() {
        e = e.with("required_scope", *first);
    }
    e
}
