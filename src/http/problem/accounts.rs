//! How accounts refusals become problems (status and [`ProblemType`](super::ProblemType)).
//! The `detail` is the domain's own sentence.

use super::{ApiError, ProblemType};
use crate::accounts::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let detail = e.to_string();
        match e {
            Error::Db(db) => db.into(),
            Error::Credits(credits) => ApiError::from(credits),
            Error::Password(inner) => ApiError::Internal(inner),
            Error::InvalidEmail => ApiError::validation("email", detail),
            Error::InvalidPassword => ApiError::validation("password", detail),
            Error::UnknownTier { .. } => ApiError::validation("tier", detail),
            Error::NegativeCredits => ApiError::validation("credits", detail),
            Error::EmailTaken => ApiError::problem(ProblemType::EmailTaken, detail),
            Error::NotFound => ApiError::NotFound(detail),
            Error::InvalidCredentials => ApiError::InvalidCredentials,
            Error::LockedOut { retry_after } => ApiError::RateLimited {
                retry_after_secs: retry_after,
                detail,
            },
            Error::PasswordHashingBusy { retry_after } => {
                ApiError::problem(ProblemType::PasswordHashingBusy, detail).retry_after(retry_after)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::auth::rendered;
    use super::*;

    /// Each refusal answers exactly what the API answered before accounts had its own
    /// errors: the right-hand sides are the `ApiError`s the domain used to build itself.
    #[test]
    fn every_refusal_renders_as_before() {
        let cases: Vec<(Error, ApiError)> = vec![
            (
                Error::InvalidEmail,
                ApiError::validation("email", "email must be an address like name@example.com."),
            ),
            (
                Error::InvalidPassword,
                ApiError::validation("password", "The password must be 8 to 128 characters long."),
            ),
            (
                Error::UnknownTier {
                    tier: "gold".into(),
                    known: "free, pro".into(),
                },
                ApiError::validation("tier", "unknown tier \"gold\"; known: free, pro."),
            ),
            (
                Error::NegativeCredits,
                ApiError::validation("credits", "credits must not be negative."),
            ),
            (
                Error::EmailTaken,
                ApiError::problem(
                    ProblemType::EmailTaken,
                    "An account with this email already exists.",
                ),
            ),
            (
                Error::NotFound,
                ApiError::NotFound("No account with that id.".into()),
            ),
            (Error::InvalidCredentials, ApiError::InvalidCredentials),
            (
                Error::LockedOut { retry_after: 30 },
                ApiError::RateLimited {
                    retry_after_secs: 30,
                    detail: "Too many failed logins for this email; try again later.".into(),
                },
            ),
            (
                Error::PasswordHashingBusy { retry_after: 1 },
                ApiError::problem(
                    ProblemType::PasswordHashingBusy,
                    "Too many signups and logins are being checked right now; retry in 1 second.",
                ),
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
