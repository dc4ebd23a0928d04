//! How credits refusals become problems (status and [`ProblemType`](super::ProblemType)).

use super::{ApiError, ProblemType};
use crate::credits::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InsufficientCredits { balance, cost } => {
                ApiError::InsufficientCredits { balance, cost }
            }
            Error::AccountNotFound => ApiError::NotFound(e.to_string()),
            Error::KeySpendLimitExceeded {
                ref key_id,
                limit,
                period,
                spent,
                cost,
                resets_at,
            } => ApiError::problem(ProblemType::KeySpendLimitExceeded, e.to_string())
                .with("key_id", key_id.clone())
                .with("limit", limit)
                .with("period", period.as_str())
                .with("spent", spent)
                .with("cost", cost)
                .with(
                    "resets_at",
                    resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
            // An internal signal of the charge paths; reaching here is a bug.
            Error::KeyLimitsApply => ApiError::Internal(anyhow::anyhow!(
                "a key-limited charge left the credits module unhandled"
            )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_status_field_and_detail() {
        let e = ApiError::from(Error::InsufficientCredits {
            balance: 3,
            cost: 5,
        });
        assert!(matches!(
            e,
            ApiError::InsufficientCredits {
                balance: 3,
                cost: 5
            }
        ));
        let e = ApiError::from(Error::BelowZero {
            amount: -7,
            balance: 2,
        });
        assert!(matches!(
            e,
            ApiError::Validation { ref detail, field: Some("amount") }
                if detail == "An adjustment of -7 would take the balance (2) below zero."
        ));
        let e = ApiError::from(Error::ChargeOutOfRange);
        assert!(matches!(
            e,
            ApiError::Validation { ref detail, field: Some("amount") }
                if detail == "amount must be between 1 and 1000000."
        ));
        let e = ApiError::from(Error::RangeTooLong {
            granularity: "hour",
            max_days: 31,
        });
        assert!(matches!(
            e,
            ApiError::Validation { ref detail, field: Some("from") }
                if detail == "a hour report covers at most 31 days."
        ));
        assert!(matches!(
            ApiError::from(Error::AccountNotFound),
            ApiError::NotFound(ref d) if d == "No account with that id."
        ));
    }
}
