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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::Conflict;

    fn problem(e: Error) -> (ProblemType, String) {
        let e = ApiError::from(e);
        (e.kind(), e.to_string())
    }

    #[test]
    fn refusals_keep_their_type_and_detail() {
        assert_eq!(
            problem(Error::Conflict {
                cause: Conflict::TakenOver
            }),
            (
                ProblemType::IdempotencyConflict,
                "This request took so long that a retry with the same Idempotency-Key took it \
                 over; this attempt was undone. Retry with the same key to get the outcome."
                    .to_owned()
            )
        );
        assert_eq!(
            problem(Error::Conflict {
                cause: Conflict::InProgress
            }),
            (
                ProblemType::IdempotencyConflict,
                "A request with this Idempotency-Key is still in progress.".to_owned()
            )
        );
        assert_eq!(
            problem(Error::KeyReused).0,
            ProblemType::IdempotencyKeyReused
        );
        assert!(matches!(
            ApiError::from(Error::InvalidKey),
            ApiError::InvalidRequest(d)
                if d == "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces."
        ));
    }
}
