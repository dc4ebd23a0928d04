//! How a refused page or time range becomes a problem: a cursor that is not ours is
//! `400 invalid_request`; a value of the right shape but out of range is
//! `422 validation_failed` naming the parameter.

use super::ApiError;
use crate::pagination::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e.field() {
            Some(field) => ApiError::validation(field, e.to_string()),
            None => ApiError::InvalidRequest(e.to_string()),
        }
    }
}
