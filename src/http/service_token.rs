//! The `ServiceToken` extractor: the operator's own servers (`KEYMETER_SERVICE_TOKENS`) on the
//! gateway's refund and verify routes. As with the admin token, failures count against the
//! client address's failed-authentication budget, and an address over it is refused before
//! any comparison. With no token configured every request is refused the same way.

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::{ready, Ready};

use crate::http::problem::{ApiError, ProblemType};
use crate::startup::AppState;

pub struct ServiceToken;

fn refused() -> ApiError {
    ApiError::problem(
        ProblemType::InvalidServiceToken,
        "A valid service token is required (Authorization: Bearer <token>).",
    )
}

impl FromRequest for ServiceToken {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::Internal(anyhow::anyhow!(
                "application state missing"
            ))));
        };
        if let Some(wait) = state
            .limits
            .client_ip(req)
            .and_then(|ip| state.limits.ip_blocked(ip))
        {
            crate::metrics::rate_limited(crate::metrics::Limit::AuthFailures);
            return ready(Err(ApiError::RateLimited {
                retry_after_secs: wait,
                detail: "Too many failed authentication attempts from this address.".into(),
            }));
        }
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .and_then(|v| {
                (v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ")).then(|| v[7..].trim())
            })
            .unwrap_or("");
        if !presented.is_empty() && state.gateway.service_tokens.accepts(presented) {
            ready(Ok(ServiceToken))
        } else {
            state.limits.note_auth_failure(req);
            ready(Err(refused()))
        }
    }
}
