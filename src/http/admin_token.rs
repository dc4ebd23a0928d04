//! The operator's admin token (`KEYMETER_ADMIN_TOKEN`): the `AdminToken` extractor guards
//! `/admin/*`. The comparison hashes both sides to 32 bytes and compares those in constant
//! time, so neither content nor length leaks through timing. With no token configured the
//! admin API does not exist (404).

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::{ready, Ready};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::http::problem::ApiError;
use crate::startup::AppState;

pub struct AdminToken;

pub fn token_matches(configured: &str, presented: &str) -> bool {
    let a: [u8; 32] = Sha256::digest(configured.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    a.ct_eq(&b).into()
}

impl FromRequest for AdminToken {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::Internal(anyhow::anyhow!(
                "application state missing"
            ))));
        };
        let Some(configured) = &state.config.admin_token else {
            return ready(Err(ApiError::NotFound(
                "No route matches this path.".into(),
            )));
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
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        if token_matches(configured.expose_secret(), presented.trim()) {
            ready(Ok(AdminToken))
        } else {
            state.limits.note_auth_failure(req);
            ready(Err(ApiError::AdminUnauthorized))
        }
    }
}
