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
            Error::Credits(e) => e.into(),
            Error::OutlivesCreator { .. }
            | Error::RateAboveCreator { .. }
            | Error::SpendAboveCreator { .. } => beyond_power(detail, &[]),
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

/// What a client receives for an error: status, headers and body bytes.
#[cfg(test)]
pub(super) fn rendered(e: ApiError) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use actix_web::body::MessageBody;
    use actix_web::ResponseError;
    let res = e.error_response();
    let status = res.status().as_u16();
    let mut headers: Vec<(String, String)> = res
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
        .collect();
    headers.sort();
    let body = res
        .into_body()
        .try_into_bytes()
        .unwrap_or_else(|_| panic!("a problem body is in memory"))
        .to_vec();
    assert!(
        body.starts_with(b"{\"type\":"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    (status, headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal answers exactly what the API answered before auth had its own errors:
    /// the right-hand sides are the `ApiError`s the domain used to build itself.
    #[test]
    fn every_refusal_renders_as_before() {
        let ends_at = chrono::DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
            .unwrap()
            .to_utc();
        let cases: Vec<(Error, ApiError)> = vec![
            (Error::InvalidApiKey, ApiError::InvalidApiKey),
            (
                Error::MissingScope { required: "read" },
                ApiError::InsufficientScope { required: "read" },
            ),
            (
                Error::ScopesBeyondCreator {
                    verb: "create",
                    missing: vec!["billing", "scrape"],
                },
                ApiError::problem(
                    ProblemType::InsufficientScope,
                    "This key cannot create a key with scopes it lacks itself: billing, scrape.",
                )
                .with("missing_scopes", vec!["billing", "scrape"])
                .with("required_scope", "billing"),
            ),
            (
                Error::OutlivesCreator {
                    verb: "rotate",
                    ends_at,
                },
                ApiError::problem(
                    ProblemType::InsufficientScope,
                    "This key stops working at 2030-01-02T03:04:05Z; it cannot rotate a key \
                     that outlives it.",
                )
                .with("missing_scopes", Vec::<&str>::new()),
            ),
            (
                Error::RateAboveCreator {
                    verb: "create",
                    rate: 10,
                },
                ApiError::problem(
                    ProblemType::InsufficientScope,
                    "This key is limited to 10 requests per minute; it cannot create a key \
                     with a higher limit.",
                )
                .with("missing_scopes", Vec::<&str>::new()),
            ),
            (
                Error::InvalidName,
                ApiError::validation(
                    "name",
                    "name must be 1 to 100 characters, without control characters.",
                ),
            ),
            (
                Error::UnknownScope("x".into()),
                ApiError::validation(
                    "scopes",
                    "unknown scope \"x\"; known: scrape, read, keys:manage, billing.",
                ),
            ),
            (
                Error::NoScopes,
                ApiError::validation("scopes", "a key needs at least one scope."),
            ),
            (
                Error::ExpiryNotInFuture,
                ApiError::validation("expires_at", "expires_at must be in the future."),
            ),
            (
                Error::RateLimitOutOfRange { max: 60 },
                ApiError::validation(
                    "rate_limit",
                    "rate_limit must be between 1 and 60 (the tier's requests per minute).",
                ),
            ),
            (
                Error::GraceOutOfRange,
                ApiError::validation(
                    "grace_seconds",
                    "grace_seconds must be between 0 and 86400.",
                ),
            ),
            (
                Error::KeyLimitReached {
                    tier: "free".into(),
                    max: 5,
                },
                ApiError::problem(
                    ProblemType::KeyLimitReached,
                    "The free tier allows 5 active keys per account; revoke one first.",
                )
                .with("max_keys", 5),
            ),
            (
                Error::KeyRevoked,
                ApiError::problem(ProblemType::KeyRevoked, "A revoked key cannot be rotated."),
            ),
            (
                Error::KeyAlreadyRotated {
                    next: "a1B2c3D4e5F6".into(),
                },
                ApiError::problem(
                    ProblemType::KeyAlreadyRotated,
                    "This key was already rotated to a1B2c3D4e5F6.",
                ),
            ),
            (
                Error::KeyNotFound,
                ApiError::NotFound("No API key with that id on this account.".into()),
            ),
            (
                Error::AccountNotFound,
                ApiError::NotFound("No such account.".into()),
            ),
            (
                Error::Db(crate::db::Error::Unavailable("pool timed out".into())),
                ApiError::DatabaseUnavailable,
            ),
        ];
        for (domain, before) in cases {
            let label = format!("{domain:?}");
            assert_eq!(rendered(domain.into()), rendered(before), "{label}");
        }
    }
}
