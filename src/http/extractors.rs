//! Extractor configuration: actix answers malformed JSON, bad paths and bad query strings
//! with plain text by default; these handlers turn each into an [`ApiError`] so the client
//! sees problem+json with a stable `type`.

use actix_web::error::{JsonPayloadError, PathError, PayloadError, QueryPayloadError};
use actix_web::{web, HttpRequest};

use crate::http::problem::ApiError;

pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(move |err, _req: &HttpRequest| json_error(err, limit).into())
}

fn json_error(err: JsonPayloadError, limit: usize) -> ApiError {
    match err {
        JsonPayloadError::Overflow { .. }
        | JsonPayloadError::OverflowKnownLength { .. }
        | JsonPayloadError::Payload(PayloadError::Overflow) => ApiError::PayloadTooLarge { limit },
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType(
            "Send the body as JSON with `Content-Type: application/json`.".into(),
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => ApiError::Validation {
            detail: e.to_string(),
            field: None,
        },
        JsonPayloadError::Deserialize(e) => ApiError::InvalidJson(e.to_string()),
        JsonPayloadError::Payload(e) => {
            ApiError::InvalidRequest(format!("The request body could not be read: {e}"))
        }
        other => ApiError::InvalidRequest(other.to_string()),
    }
}

pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|err: PathError, _req| {
        ApiError::NotFound(format!("No such resource ({err}).")).into()
    })
}

pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|err: QueryPayloadError, _req| {
        ApiError::InvalidRequest(format!("Invalid query string: {err}")).into()
    })
}

/// For routes whose JSON body is optional: an empty body is `T::default()`, anything else
/// must parse — a malformed body is an error, never silently ignored.
pub fn json_or_default<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(body_error)
}

/// Malformed JSON is 400 `invalid_json`; well-formed JSON of the wrong shape is 422.
fn body_error(e: serde_json::Error) -> ApiError {
    if e.is_data() {
        ApiError::Validation {
            detail: e.to_string(),
            field: None,
        }
    } else {
        ApiError::InvalidJson(e.to_string())
    }
}

/// For idempotent POSTs, which hash the request: the body both as JSON (for the hash) and
/// as the route's type.
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<(serde_json::Value, T), ApiError> {
    let raw: serde_json::Value = serde_json::from_slice(body).map_err(body_error)?;
    let parsed = T::deserialize(&raw).map_err(body_error)?;
    Ok((raw, parsed))
}
