//! How credits refusals become problems (status and [`ProblemType`](super::ProblemType)).

use super::ApiError;
use crate::credits::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InsufficientCredits { balance, cost } => {
                ApiError::InsufficientCredits { balance, cost }
            }
            Error::AccountNotFound => ApiError::NotFound(e.to_string()),
            Error::Idempotency(e) => e.into(),
            Error::Db(e) => e.into(),
            Error::Internal(e) => ApiError::Internal(e),
            // Every other refusal is a request value the ledger does not accept: 422.
            refused => ApiError::Validation {
                detail: refused.to_string(),
                field: refused.field(),
            },
        }
    }
}
