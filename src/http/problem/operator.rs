//! How operator actions and audit-trail reads become problems: a wrapped domain refusal
//! keeps that domain's problem; the actions' own checks are `422 validation_failed`.

use super::ApiError;
use crate::{audit, operator};

impl From<operator::Error> for ApiError {
    fn from(e: operator::Error) -> Self {
        use operator::Error;
        let detail = e.to_string();
        match e {
            Error::Account(e) => e.into(),
            Error::Key(e) => e.into(),
            Error::Credits(e) => ApiError::from(e),
            Error::Db(e) => e.into(),
            Error::ZeroAmount => ApiError::validation("amount", detail),
            Error::InvalidReason => ApiError::validation("reason", detail),
        }
    }
}

impl From<audit::Error> for ApiError {
    fn from(e: audit::Error) -> Self {
        match e {
            audit::Error::Page(e) => e.into(),
            audit::Error::Db(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::auth::rendered;
    use super::*;

    /// The actions' own checks answer exactly what they answered before.
    #[test]
    fn the_actions_own_refusals_render_as_before() {
        let cases: Vec<(operator::Error, ApiError)> = vec![
            (
                operator::Error::ZeroAmount,
                ApiError::validation("amount", "amount must not be zero."),
            ),
            (
                operator::Error::InvalidReason,
                ApiError::validation(
                    "reason",
                    "reason must be 1 to 500 characters, without NUL characters.",
                ),
            ),
            (
                operator::Error::Account(crate::accounts::Error::NotFound),
                ApiError::NotFound("No account with that id.".into()),
            ),
            (
                operator::Error::Key(crate::auth::Error::KeyNotFound),
                ApiError::NotFound("No API key with that id on this account.".into()),
            ),
        ];
        for (domain, before) in cases {
            let label = format!("{domain:?}");
            assert_eq!(rendered(domain.into()), rendered(before), "{label}");
        }
        assert_eq!(
            rendered(audit::Error::Page(crate::pagination::Error::BadCursor).into()),
            rendered(ApiError::InvalidRequest(
                "The cursor is not one this API returned.".into()
            )),
        );
    }
}
