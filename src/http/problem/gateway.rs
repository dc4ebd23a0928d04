//! How gateway refusals become problems (status and [`ProblemType`](super::ProblemType)).

use super::{ApiError, ProblemType};
use crate::gateway::Error;

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let detail = e.to_string();
        match e {
            Error::RouteNotMetered { method, path } => {
                ApiError::problem(ProblemType::RouteNotMetered, detail)
                    .with("method", method)
                    .with("path", path)
            }
            Error::NoOriginalRequest => ApiError::InvalidRequest(detail),
            Error::ChargeNotFound => ApiError::problem(ProblemType::GatewayChargeNotFound, detail),
            Error::AlreadyRefunded { refund_id } => {
                ApiError::problem(ProblemType::ChargeAlreadyRefunded, detail)
                    .with("refund", refund_id)
            }
            Error::Credits(c) => c.into(),
            Error::Db(db) => db.into(),
            Error::Internal(e) => ApiError::Internal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::ResponseError;

    #[test]
    fn gateway_refusals_have_their_statuses() {
        let e = ApiError::from(Error::RouteNotMetered {
            method: "GET".into(),
            path: "/x".into(),
        });
        assert_eq!(e.status_code(), 404);
        assert_eq!(e.kind(), ProblemType::RouteNotMetered);
        assert_eq!(
            ApiError::from(Error::AlreadyRefunded { refund_id: 7 }).status_code(),
            409
        );
        assert_eq!(ApiError::from(Error::ChargeNotFound).status_code(), 404);
        assert_eq!(ApiError::from(Error::NoOriginalRequest).status_code(), 400);
        assert_eq!(
            ApiError::from(Error::Credits(crate::credits::Error::InsufficientCredits {
                balance: 1,
                cost: 2
            }))
            .status_code(),
            402
        );
    }
}
