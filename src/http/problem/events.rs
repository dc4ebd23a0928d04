//! How webhook endpoint refusals become problems: a URL the SSRF guard refuses is
//! `url_not_allowed` (like a job's `webhook_url`), the endpoint cap a `409`, the rest of the
//! client's mistakes `422 validation_failed` naming the field.

use super::{ApiError, ProblemType};
use crate::events::endpoints::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let detail = e.to_string();
        match e {
            Error::Off => ApiError::problem(ProblemType::FeatureDisabled, detail),
            Error::NotFound => ApiError::NotFound(detail),
            Error::BadUrl => ApiError::validation("url", detail),
            Error::UrlNotAllowed(_) => {
                ApiError::problem(ProblemType::UrlNotAllowed, detail).with("field", "url")
            }
            Error::NoEvents | Error::UnknownEvent { .. } => ApiError::validation("events", detail),
            Error::LimitReached { max } => {
                ApiError::problem(ProblemType::WebhookEndpointLimitReached, detail)
                    .with("max_endpoints", max)
            }
            Error::Db(e) => e.into(),
        }
    }
}
