//! The edge middleware: the first and last code every request meets.
//!
//! Reading it top to bottom is the request's journey before the routes:
//! 1. a request id (the caller's if sane, else a UUID v7) and a tracing span carrying it;
//! 2. the body limit — a declared `Content-Length` over it is refused with 413 before
//!    routing and without reading a byte; a chunked body is counted as it streams and cut
//!    off at the limit;
//! 3. the request timeout and a panic guard around everything below, so a slow or panicking
//!    handler becomes a 504/500 problem and the worker keeps serving;
//! 4. on the way out, any error response that is not already problem+json (actix's own
//!    404/405, an extractor's 413) is rewritten as one, and the security headers and
//!    `X-Request-Id` are added.
//!
//! It is one `from_fn` middleware rather than five because the order matters and is easiest
//! to verify when it is written down once.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpResponse, ResponseError};
use bytes::Bytes;
use futures_util::{FutureExt, Stream};
use tracing::Instrument;

use crate::http::problem::{
    problem_body, problem_for_status, problem_response, ApiError, PROBLEM_JSON,
};
use crate::http::request_id;

pub const WEBHOOK_PATH: &str = "/v1/billing/webhook";

/// What the edge needs to know, registered as app data.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    pub body_limit: usize,
    /// Stripe's events can be larger than API requests; only its webhook route gets this.
    pub webhook_body_limit: usize,
    pub request_timeout: Duration,
    pub production: bool,
}

pub async fn edge(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let settings = req
        .app_data::<web::Data<EdgeSettings>>()
        .map(|d| d.get_ref().clone())
        .unwrap_or(EdgeSettings {
            body_limit: 64 * 1024,
            webhook_body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            production: false,
        });
    let mut settings = settings;
    if req.path() == WEBHOOK_PATH {
        settings.body_limit = settings.webhook_body_limit;
    }
    let id = request_id::from_headers_or_new(req.headers());
    let method = req.method().clone();
    let uri = req.uri().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = tracing::field::Empty,
        key_id = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    crate::telemetry::adopt_remote_parent(&span, req.headers());
    let started = Instant::now();
    let inner_span = span.clone();

    let work = async move {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut res: ServiceResponse<BoxBody> =
            if declared.is_some_and(|len| len > settings.body_limit as u64) {
                // Refused before routing and before reading: an attacker cannot make us buffer it.
                let err = ApiError::PayloadTooLarge {
                    limit: settings.body_limit,
                };
                let mut r = err.error_response();
                r.head_mut()
                    .set_connection_type(actix_http::ConnectionType::Close);
                let (http_req, _payload) = req.into_parts();
                ServiceResponse::new(http_req, r)
            } else {
                if declared.is_none() && req.headers().contains_key(header::TRANSFER_ENCODING) {
                    let inner = req.take_payload();
                    let limited: actix_http::BoxedPayloadStream = Box::pin(Limited {
                        inner,
                        seen: 0,
                        limit: settings.body_limit,
                    });
                    req.set_payload(Payload::from(limited));
                }
                let call = AssertUnwindSafe(next.call(req)).catch_unwind();
                match tokio::time::timeout(settings.request_timeout, call).await {
                    Ok(Ok(Ok(res))) => res.map_into_boxed_body(),
                    Ok(Ok(Err(err))) => ServiceResponse::from_err(err, detached(&method, &uri)),
                    Ok(Err(_panic)) => {
                        // The panic hook has logged the message and location already.
                        let err = ApiError::Internal(anyhow::anyhow!("handler panicked"));
                        ServiceResponse::new(detached(&method, &uri), err.error_response())
                    }
                    Err(_elapsed) => {
                        tracing::warn!(
                            timeout_s = settings.request_timeout.as_secs(),
                            "request timed out"
                        );
                        ServiceResponse::new(
                            detached(&method, &uri),
                            ApiError::Timeout.error_response(),
                        )
                    }
                }
            };

        let status = res.status();
        let is_problem = res
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
        // The console's own error pages (text/html, written on purpose for people) are kept.
        let is_page = res
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
        if (status.is_client_error() || status.is_server_error()) && !is_problem && !is_page {
            res = into_problem(res, status);
        }
        res
    }
    .instrument(inner_span);

    let mut res = request_id::scope(id.clone(), work).await;

    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(request_id::HEADER_NAME, v);
    }
    set_security_headers(headers, settings.production);

    let status = res.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    crate::metrics::observe_request(
        &route,
        res.request().method(),
        res.status(),
        started.elapsed(),
    );
    span.record("route", route.as_str());
    span.record("status", status);
    span.record("latency_ms", latency_ms);
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!("request finished");
        } else {
            tracing::info!("request finished");
        }
    });
    Ok(res)
}

/// A stand-in request for a response whose real request was consumed by a handler that
/// panicked or timed out. actix cannot hand the original back (and routing panics if the
/// edge keeps a clone of it during the call), but a `ServiceResponse` must carry one; only
/// its method and URI are ever read from it again (for the log line).
fn detached(
    method: &actix_web::http::Method,
    uri: &actix_web::http::Uri,
) -> actix_web::HttpRequest {
    actix_web::test::TestRequest::default()
        .method(method.clone())
        .uri(&uri.to_string())
        .to_http_request()
}

/// Replaces the body of an error response that actix (or an extractor) produced as plain
/// text with a problem document, keeping its status and headers.
fn into_problem(res: ServiceResponse<BoxBody>, status: StatusCode) -> ServiceResponse<BoxBody> {
    let (kind, detail) = problem_for_status(status);
    let body = problem_body(kind, status, detail, Default::default());
    let (req, old) = res.into_parts();
    let mut fresh: HttpResponse = problem_response(status, &body);
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fresh.headers_mut().append(name.clone(), value.clone());
        }
    }
    ServiceResponse::new(req, fresh)
}

fn set_security_headers(headers: &mut actix_web::http::header::HeaderMap, production: bool) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if production {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
}

/// A request body stream that fails with `Overflow` once more than `limit` bytes have
/// arrived, so a chunked upload cannot grow past the limit however the handler reads it.
struct Limited {
    inner: Payload,
    seen: usize,
    limit: usize,
}

impl Stream for Limited {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.seen > self.limit {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen = self.seen.saturating_add(chunk.len());
                if self.seen > self.limit {
                    Poll::Ready(Some(Err(PayloadError::Overflow)))
                } else {
                    Poll::Ready(Some(Ok(chunk)))
                }
            }
            other => other,
        }
    }
}

/// Makes a panic a single structured log line (message and location, no backtrace) instead
/// of raw stderr text; the edge turns the panicking request into a 500 problem.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %msg, location = %location, "panic");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test, App};

    fn app_settings(timeout: Duration) -> web::Data<EdgeSettings> {
        web::Data::new(EdgeSettings {
            body_limit: 1024,
            webhook_body_limit: 1024,
            request_timeout: timeout,
            production: false,
        })
    }

    async fn panics() -> HttpResponse {
        panic!("boom")
    }

    async fn sleeps() -> HttpResponse {
        tokio::time::sleep(Duration::from_secs(5)).await;
        HttpResponse::Ok().finish()
    }

    async fn echo(body: web::Json<serde_json::Value>) -> HttpResponse {
        HttpResponse::Ok().json(body.into_inner())
    }

    #[actix_web::test]
    async fn a_panicking_handler_becomes_a_500_problem_and_the_app_keeps_serving() {
        let app = test::init_service(
            App::new()
                .app_data(app_settings(Duration::from_secs(5)))
                .route("/panic", web::get().to(panics))
                .route("/ok", web::get().to(HttpResponse::Ok))
                .wrap(actix_web::middleware::from_fn(edge)),
        )
        .await;
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/panic").to_request()).await;
        assert_eq!(res.status(), 500);
        assert_eq!(
            res.headers().get(header::CONTENT_TYPE).unwrap(),
            PROBLEM_JSON
        );
        let id = res
            .headers()
            .get(request_id::HEADER)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["type"], "internal_error");
        assert_eq!(body["request_id"], id.as_str());
        assert!(
            !body.to_string().contains("boom"),
            "no panic text in the body"
        );
        let res = test::call_service(&app, test::TestRequest::get().uri("/ok").to_request()).await;
        assert_eq!(res.status(), 200);
    }

    #[actix_web::test]
    async fn a_slow_handler_is_cut_off_with_a_504_problem() {
        let app = test::init_service(
            App::new()
                .app_data(app_settings(Duration::from_millis(100)))
                .route("/slow", web::get().to(sleeps))
                .wrap(actix_web::middleware::from_fn(edge)),
        )
        .await;
        let started = Instant::now();
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/slow").to_request()).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(res.status(), 504);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["type"], "request_timeout");
    }

    #[actix_web::test]
    async fn a_chunked_body_is_cut_off_at_the_limit() {
        let app = test::init_service(
            App::new()
                .app_data(app_settings(Duration::from_secs(5)))
                .app_data(crate::http::extractors::json_config(1024))
                .route("/echo", web::post().to(echo))
                .wrap(actix_web::middleware::from_fn(edge)),
        )
        .await;
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(4000));
        let chunks = futures_util::stream::iter(
            big.into_bytes()
                .chunks(100)
                .map(|c| Ok::<_, PayloadError>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        );
        let req = test::TestRequest::post()
            .uri("/echo")
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .insert_header((header::TRANSFER_ENCODING, "chunked"))
            .to_request();
        let payload: actix_http::BoxedPayloadStream = Box::pin(chunks);
        let (req, _) = req.replace_payload(Payload::from(payload));
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status(), 413);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["type"], "payload_too_large");
    }

    #[actix_web::test]
    async fn actix_plain_errors_are_rewritten_as_problems() {
        let app = test::init_service(
            App::new()
                .app_data(app_settings(Duration::from_secs(5)))
                .app_data(crate::http::extractors::json_config(1024))
                .route("/echo", web::post().to(echo))
                .wrap(actix_web::middleware::from_fn(edge)),
        )
        .await;
        let res = test::call_service(
            &app,
            test::TestRequest::post()
                .uri("/echo")
                .insert_header((header::CONTENT_TYPE, "application/json"))
                .set_payload("{not json")
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), 400);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["type"], "invalid_json");
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/missing").to_request()).await;
        assert_eq!(res.status(), 404);
        assert_eq!(
            res.headers().get(header::CONTENT_TYPE).unwrap(),
            PROBLEM_JSON
        );
    }
}
