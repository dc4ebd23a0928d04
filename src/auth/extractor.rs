//! The `Authenticated` extractor: a handler that takes one is behind an API key.
//!
//! Keys are accepted as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Verification
//! happens once per request, in the keyed gate (`http::ratelimit_gate::keyed`), which also applies
//! the tier's limit and leaves the verified caller in the request's extensions; this
//! extractor only hands it to the handler. The header value is never logged; the key id is
//! recorded on the request span.

use actix_web::dev::Payload;
use actix_web::http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use futures_util::future::{ready, Ready};

use super::Authenticated;
use crate::http::problem::ApiError;

/// `X-API-Key` as a constant: looking a header up by `&str` parses (and, for a non-standard
/// name, allocates) the name on every request.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The presented key, if any, from either header.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers
        .get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Authenticated>()
                .cloned()
                .ok_or_else(|| {
                    // A route taking `Authenticated` was registered outside the keyed gate.
                    ApiError::Internal(anyhow::anyhow!("route is not behind the keyed gate"))
                }),
        )
    }
}
