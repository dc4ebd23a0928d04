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
            Error::PlanActive { ref subscription } => {
                let subscription = subscription.clone();
                ApiError::problem(ProblemType::PlanActive, e.to_string())
                    .with("subscription", subscription)
            }
            Error::PlanCheckoutOpen { ref session } => {
                let session = session.clone();
                ApiError::problem(ProblemType::PlanActive, e.to_string()).with("checkout", session)
            }
            Error::PaymentMethodRequired => {
                ApiError::problem(ProblemType::PaymentMethodRequired, e.to_string())
            }
            Error::InvalidSetting { field, detail } => ApiError::Validation {
                detail,
                field: Some(field),
            },
            Error::NoPacks => ApiError::Disabled(e.to_string()),
            Error::Accounts(e) => e.into(),
            Error::Credits(e) => e.into(),
            Error::Idempotency(e) => e.into(),
            Error::Db(e) => e.into(),
            Error::Internal(e) => ApiError::Internal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_type_field_and_detail() {
        let e = ApiError::from(Error::UnknownPack {
            name: "huge".into(),
            available: "small, large".into(),
        });
        assert!(matches!(
            e,
            ApiError::Validation { ref detail, field: Some("pack") }
                if detail == "unknown pack \"huge\"; available: small, large."
        ));
        let e = ApiError::from(Error::InvalidUrl {
            field: "cancel_url",
        });
        assert!(matches!(
            e,
            ApiError::Validation { ref detail, field: Some("cancel_url") }
                if detail == "cancel_url must be an absolute http(s) URL."
        ));
        let e = ApiError::from(Error::InvalidEvent("no id"));
        assert!(matches!(
            e,
            ApiError::InvalidRequest(ref d) if d == "Not a usable Stripe event: no id."
        ));
        let e = ApiError::from(Error::PaymentProviderUnavailable {
            detail: "The payment provider is unavailable; retry shortly.",
        });
        assert_eq!(e.kind(), ProblemType::PaymentProviderUnavailable);
        assert!(matches!(
            ApiError::from(Error::NotConfigured),
            ApiError::Disabled(ref d) if d == "Billing is not configured on this server."
        ));
    }
}
