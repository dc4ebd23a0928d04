//! What an operator's infrastructure sees: readiness with the Redis rate-limit store,
//! response compression, and trace export.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::app::{allow_scraping, redis_backend, redis_url};
use crate::support::db::{create_database, drop_database_blocking};
use crate::support::process::{sigterm, start_server, wait_exit};
use crate::support::upstream::{collector, loopback, Upstream};
use crate::support::{assert_problem, spawn_app, spawn_app_with};

/// A Redis URL nothing listens on: port 1 on loopback refuses connections at once.
const CLOSED_REDIS: &str = "redis://127.0.0.1:1/";

#[tokio::test]
async fn readiness_is_503_when_redis_is_unreachable_and_the_policy_is_refuse() {
    let app = spawn_app_with(|c| redis_backend(c, CLOSED_REDIS, true)).await;
    let body = assert_problem(app.get("/health/ready").await, 503, "not_ready").await;
    assert!(
        body["detail"].as_str().unwrap().contains("rate-limit"),
        "{body}"
    );
    assert_eq!(app.get("/health/live").await.status(), 200);
}

#[tokio::test]
async fn readiness_says_degraded_when_redis_is_unreachable_and_memory_covers() {
    let app = spawn_app_with(|c| redis_backend(c, CLOSED_REDIS, false)).await;
    let res = app.get("/health/ready").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "degraded", "database": "ok", "rate_limiter": "unreachable"})
    );
}

#[tokio::test]
async fn readiness_is_ready_with_a_reachable_redis_and_without_one() {
    let app = spawn_app().await;
    let body: Value = app.get("/health/ready").await.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "database": "ok", "rate_limiter": "memory"})
    );

    let app = spawn_app_with(|c| redis_backend(c, &redis_url(), true)).await;
    // The connection is made in the background right after start.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = app.get("/health/ready").await;
        if res.status() == 200 {
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["status"], "ready");
            assert_eq!(body["rate_limiter"], "redis");
            break;
        }
        assert!(Instant::now() < deadline, "Redis never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_large_job_result_is_gzipped_only_for_a_client_that_accepts_it() {
    let up = Upstream::start().await;
    let app = spawn_app_with(|c| allow_scraping(c, &loopback(&[up.port]))).await;
    let (_, key) = app.create_account("pro", 100).await;
    // ~60 KB of repetitive HTML.
    let body = json!({"url": up.url("/compressible"), "formats": ["html"]});

    let res = app
        .client
        .post(app.url("/v1/scrape"))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert!(res.headers()["vary"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("accept-encoding"));
    let gz = res.bytes().await.unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "a gzip stream");

    let res = app
        .client
        .post(app.url("/v1/scrape"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("content-encoding").is_none());
    let plain = res.bytes().await.unwrap();
    let job: Value = serde_json::from_slice(&plain).unwrap();
    assert!(job["result"]["html"].as_str().unwrap().len() > 50_000);
    assert!(
        gz.len() * 10 < plain.len(),
        "compressed {} vs {} bytes",
        gz.len(),
        plain.len()
    );
}

#[tokio::test]
async fn small_responses_are_never_compressed() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("free", 0).await;
    for path in ["/v1/account", "/v1/keys"] {
        let res = app
            .client
            .get(app.url(path))
            .bearer_auth(&key)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("content-encoding").is_none(), "{path}");
        assert!(res.headers().get("vary").is_none(), "{path}");
        let _: Value = res.json().await.unwrap();
    }
    // A problem document stays plain too, and a client that accepts nothing we offer
    // still gets an answer rather than 406.
    let res = app
        .client
        .get(app.url("/v1/account"))
        .header("accept-encoding", "br;q=1, identity;q=0")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("content-encoding").is_none());
    assert_problem(res, 401, "invalid_api_key").await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn spans_are_exported_in_the_callers_trace() {
    let (endpoint, received) = collector().await;
    let db = create_database().await;
    let (mut child, port, _logs) = start_server(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "keymeter-under-test"),
        ],
    );
    let trace_id: [u8; 16] = rand::random();
    let parent_id: [u8; 8] = rand::random();
    let traceparent = format!("00-{}-{}-01", hex::encode(trace_id), hex::encode(parent_id));
    let res = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health/live"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Exit flushes what is still batched.
    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 0);
    drop_database_blocking(&db);

    let bodies = received.lock().unwrap().clone();
    assert!(!bodies.is_empty(), "the collector received no export");
    // OTLP protobuf carries ids as raw bytes: the request's span is in the caller's trace,
    // as a child of the caller's span, from this service.
    let exported = bodies
        .iter()
        .find(|b| contains(b, &trace_id))
        .expect("a span with the incoming trace id");
    assert!(contains(exported, &parent_id), "parent span id kept");
    assert!(contains(exported, b"request"), "the request span");
    assert!(contains(exported, b"keymeter-under-test"), "service name");
}
