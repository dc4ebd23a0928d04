//! How accounts refusals become problems (status and [`ProblemType`](super::ProblemType)).
//! The `detail` is the domain's own sentence.

use super::{ApiError, ProblemType};
use crate::accounts::Error;

impl From<Error> for ApiError {
    // Until the credits domain has its own error (see `accounts::error::CreditsError`), the
    // credits conversion is the identity.
    #[allow(clippy::useless_conversion)]
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
