//! gzip for large responses — job results with their page's HTML or Markdown run to
//! megabytes of highly compressible text — when the client says it accepts gzip.
//!
//! Not actix's own `Compress` middleware, for two reasons. It compresses every response,
//! however small: a deflate stream allocates its state (hundreds of KiB with zlib's
//! defaults) and spends CPU for each of the hot path's ~300-byte answers (an account, a
//! charge, a problem), which would come out barely smaller — they already fit in one TCP
//! segment. And it answers `406` when a client's `Accept-Encoding` rules out both gzip and
//! identity, where a client that cannot be satisfied is better served plainly.
//!
//! So: only bodies of known size of at least [`MIN_BYTES`], only textual types (JSON,
//! problem+json, text, HTML), only when `Accept-Encoding` prefers gzip to no encoding, and
//! only if nothing upstream set `Content-Encoding`. The encoding itself is actix-http's
//! `Encoder` (flate2), which moves large bodies to the blocking pool. Small responses are
//! left exactly as they were: the request's `Accept-Encoding` is not even parsed for them.

use actix_http::encoding::Encoder;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{
    self, AcceptEncoding, ContentEncoding, Encoding, HeaderValue, ACCEPT_ENCODING,
};
use actix_web::middleware::Next;

/// Smaller bodies are sent as they are: about one TCP segment's payload, below which
/// compression cannot save a round trip, only CPU and memory.
pub const MIN_BYTES: u64 = 1400;

fn compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/problem+json")
        || essence.eq_ignore_ascii_case("text/html")
        || essence.eq_ignore_ascii_case("text/plain")
}

/// Whether the client's `Accept-Encoding` values make gzip the choice over identity.
fn prefers_gzip(values: &[HeaderValue]) -> bool {
    if values.is_empty() {
        return false;
    }
    let Ok(items) = header::from_comma_delimited(values.iter()) else {
        return false;
    };
    AcceptEncoding(items).negotiate([Encoding::gzip(), Encoding::identity()].iter())
        == Some(Encoding::gzip())
}

pub async fn compress(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    // Header values are reference-counted bytes: keeping them is cheap; parsing waits until
    // a response is large enough to care.
    let accept: Vec<HeaderValue> = req.headers().get_all(ACCEPT_ENCODING).cloned().collect();
    let res = next.call(req).await?;
    Ok(res.map_body(move |head, body| {
        let large = matches!(body.size(), BodySize::Sized(n) if n >= MIN_BYTES);
        if !large
            || head.headers().contains_key(header::CONTENT_ENCODING)
            || !compressible(head.headers().get(header::CONTENT_TYPE))
        {
            return body.boxed();
        }
        // The representation of this response depends on Accept-Encoding from here on.
        head.headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
        if prefers_gzip(&accept) {
            Encoder::response(ContentEncoding::Gzip, head, body).boxed()
        } else {
            body.boxed()
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &'static str) -> Vec<HeaderValue> {
        vec![HeaderValue::from_static(s)]
    }

    #[test]
    fn gzip_only_when_the_client_prefers_it() {
        assert!(prefers_gzip(&v("gzip")));
        assert!(prefers_gzip(&v("gzip, deflate, br")));
        assert!(!prefers_gzip(&[]));
        assert!(!prefers_gzip(&v("br")));
        assert!(!prefers_gzip(&v("gzip;q=0")));
        assert!(!prefers_gzip(&v("identity")));
    }

    #[test]
    fn only_textual_types_are_compressed() {
        let ct = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(compressible(ct("application/json").as_ref()));
        assert!(compressible(ct("application/problem+json").as_ref()));
        assert!(compressible(ct("text/html; charset=utf-8").as_ref()));
        assert!(!compressible(ct("image/png").as_ref()));
        assert!(!compressible(None));
    }
}
