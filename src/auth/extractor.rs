//! The `Authenticated` extractor: a handler that takes one is behind an API key.
//!
//! Keys are accepted as `Authorization: Bearer <key>` or `X-API-Key: <key>`. The header
//! value is never logged; the key id is recorded on the request span once verified.

use actix_web::dev::Payload;
use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;

use super::Authenticated;
use crate::error::ApiError;
use crate::startup::AppState;

/// The presented key, if any, from either header.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        // Already verified for this request (e.g. by the rate limiter)?
        if let Some(a) = req.extensions().get::<Authenticated>() {
            let a = a.clone();
            return Box::pin(async move { Ok(a) });
        }
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let presented = presented_key(req.headers()).map(str::to_owned);
        let req = req.clone();
        Box::pin(async move {
            let state = state
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("application state missing")))?;
            let outcome = state.auth.authenticate(presented.as_deref()).await;
            match &outcome {
                Ok(a) => {
                    tracing::Span::current().record("key_id", a.key_id.as_str());
                    req.extensions_mut().insert(a.clone());
                }
                Err(ApiError::InvalidApiKey) => {
                    state.limits.note_auth_failure(&req);
                }
                Err(_) => {}
            }
            outcome
        })
    }
}
