//! How idempotency refusals become problems (status and [`ProblemType`](super::ProblemType)).

use super::{ApiError, ProblemType};
use crate::idempotency::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidKey => ApiError::InvalidRequest(e.to_string()),
            Error::KeyReused => ApiError::IdempotencyKeyReused,
            Error::Conflict { cause } => {
                ApiError::problem(ProblemType::IdempotencyConflict, cause.to_string())
            }
            Error::Encode(e) => ApiError::Internal(e.into()),
            Error::Db(e) => e.into(),
        }
    }
}
