//! How billing refusals become problems (status and [`ProblemType`](super::ProblemType)).

use super::{ApiError, ProblemType};
use crate::billing::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::NotConfigured | Error::WebhooksNotConfigured => {
                ApiError::Disabled(e.to_string())
            }
            Error::UnknownPack { .. }
            | Error::UnknownPlan { .. }
            | Error::PackOrPlan
            | Error::InvalidUrl { .. } => ApiError::Validation {
                detail: e.to_string(),
                field: e.field(),
            },
            Error::InvalidSignature(_) => ApiError::InvalidSignature,
            Error::InvalidJson(detail) => ApiError::InvalidJson(detail),
            Error::InvalidEvent(_) => ApiError::InvalidRequest(e.to_string()),
            Error::PaymentProviderUnavailable { detail } => {
                ApiError::problem(ProblemType::PaymentProviderUnavailable, detail)
            }
            Error::AccountNotFound => ApiError::NotFound(e.to_string()),
            Error::Accounts(e) => e,
            Error::Credits(e) => e.into(),
            Error::Idempotency(e) => e.into(),
            Error::Db(e) => e.into(),
            Error::Internal(e) => ApiError::Internal(e),
        }
    }
}
