//! How a refused page or time range becomes a problem: a cursor that is not ours is
//! `400 invalid_request`; a value of the right shape but out of range is
//! `422 validation_failed` naming the parameter.

use super::ApiError;
use crate::pagination::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e.field() {
            Some(field) => ApiError::validation(field, e.to_string()),
            None => ApiError::InvalidRequest(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::auth::rendered;
    use super::*;

    /// Each refusal answers exactly what it answered before pagination had its own errors.
    #[test]
    fn every_refusal_renders_as_before() {
        let cases: Vec<(Error, ApiError)> = vec![
            (
                Error::BadCursor,
                ApiError::InvalidRequest("The cursor is not one this API returned.".into()),
            ),
            (
                Error::OutOfRange { field: "cursor" },
                ApiError::validation(
                    "cursor",
                    "cursor must be between 0000-01-01 and 9999-12-31 (UTC).",
                ),
            ),
            (
                Error::BadLimit,
                ApiError::validation("limit", "limit must be a whole number between 1 and 100."),
            ),
            (
                Error::BadTime { field: "to" },
                ApiError::validation("to", "to must be a date (2026-11-23) or an RFC 3339 time."),
            ),
        ];
        for (domain, before) in cases {
            let label = format!("{domain:?}");
            assert_eq!(rendered(domain.into()), rendered(before), "{label}");
        }
    }
}
