//! Request ids: accepted from a caller when sane, generated (UUID v7, time-ordered so they
//! sort like the logs) otherwise, and available to any code running for the request through
//! a task-local — that is how a problem body rendered deep in a handler gets its
//! `request_id` without threading the request everywhere.

use actix_web::http::header::{HeaderMap, HeaderName};

pub const HEADER: &str = "x-request-id";
/// [`HEADER`] as a header name: a lookup by `&str` parses (and allocates) the name on every
/// request, and every request looks this one up.
pub const HEADER_NAME: HeaderName = HeaderName::from_static(HEADER);

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served on this task, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// Runs `fut` with `id` as the current request id.
pub async fn scope<F: std::future::Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// A caller's id is kept only if it is short and made of `[A-Za-z0-9._-]`: anything else
/// could inject into logs or headers, so it is replaced.
pub fn is_acceptable(candidate: &str) -> bool {
    !candidate.is_empty()
        && candidate.len() <= 64
        && candidate
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn from_headers_or_new(headers: &HeaderMap) -> String {
    headers
        .get(HEADER_NAME)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_acceptable(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_short_safe_ids() {
        assert!(is_acceptable("abc-123_x.y"));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable(&"a".repeat(65)));
        assert!(is_acceptable(&"a".repeat(64)));
        assert!(!is_acceptable("a b"));
        assert!(!is_acceptable("a\nb"));
        assert!(!is_acceptable("ä"));
    }
}
