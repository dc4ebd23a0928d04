//! `Idempotency-Key` at the HTTP edge: reading the header and the request's identity into an
//! [`idempotency::Request`], and answering a replay. The sequence itself (claim, work, record
//! or release) is [`idempotency::run`]; a route uses it like this:
//!
//! ```text
//! let request = idempotent::request(&req, caller.account_id, &raw, StatusCode::CREATED)?;
//! let outcome = idempotency::run(&state.db, state.config.request_timeout, request, |guard| {
//!     domain::do_it(&state.db, …, guard) // records its outcome with guard.record(&tx, …)
//! })
//! .await?;
//! Ok(idempotent::respond(outcome, |done| HttpResponse::Created().json(done)))
//! ```

use actix_web::http::header::{CONTENT_TYPE, LOCATION};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use serde_json::Value;
use uuid::Uuid;

use crate::http::problem::ApiError;
use crate::idempotency::{self, IdempotencyKey, Outcome, StoredResponse, HEADER, REPLAYED};

/// The request's `Idempotency-Key`, if it sent one: a value that is not 1 to 255 printable
/// ASCII characters is `400 invalid_request`.
pub fn key(req: &HttpRequest) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(v) = req.headers().get(HEADER) else {
        return Ok(None);
    };
    Ok(Some(IdempotencyKey::parse(v.to_str().unwrap_or(""))?))
}

/// What [`idempotency::run`] needs to know about this request: `None` without a key.
/// `success` is the status the route answers a success with, stored for replays. `body` is
/// the request body as JSON (see `extractors::json_body`).
pub fn request(
    req: &HttpRequest,
    account_id: Uuid,
    body: &Value,
    success: StatusCode,
) -> Result<Option<idempotency::Request>, ApiError> {
    Ok(key(req)?.map(|key| {
        idempotency::Request::new(
            account_id,
            key,
            req.method().as_str(),
            req.path(),
            body,
            success.as_u16(),
        )
    }))
}

/// The stored answer of an earlier request, sent again with `Idempotent-Replayed: true`.
pub fn replay(stored: StoredResponse) -> HttpResponse {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut res = HttpResponse::build(status);
    res.insert_header((CONTENT_TYPE, "application/json"))
        .insert_header((REPLAYED, "true"));
    if let Some(l) = stored.location {
        res.insert_header((LOCATION, l));
    }
    res.body(stored.body)
}

/// The answer to an idempotent request: the replay, or `render` of what the work returned.
pub fn respond<T>(outcome: Outcome<T>, render: impl FnOnce(T) -> HttpResponse) -> HttpResponse {
    match outcome {
        Outcome::Ran(done) => render(done),
        Outcome::Replayed(stored) => replay(stored),
    }
}
