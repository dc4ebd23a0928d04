//! How operator actions and audit-trail reads become problems: a wrapped domain refusal
//! keeps that domain's problem; the actions' own checks are `422 validation_failed`.

use super::ApiError;
use crate::{audit, operator};

impl From<operator::Error> for ApiError {
    // Until the credits domain has its own error (see `accounts::error::CreditsError`), the
    // credits conversion is the identity.
    #[allow(clippy::useless_conversion)]
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
