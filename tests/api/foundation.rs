//! What a client sees of the foundation: health, request ids, security headers, problem
//! bodies for routing errors, and the body limit.

use std::time::Duration;

use keymeter::config::Environment;

use crate::support::db::admin_client;
use crate::support::{assert_problem, spawn_app, spawn_app_with};

#[tokio::test]
async fn liveness_answers_with_request_id_and_security_headers() {
    let app = spawn_app().await;
    let res = app.get("/health/live").await;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    let id = h["x-request-id"].to_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cache-control"], "no-store");
    assert!(
        h.get("strict-transport-security").is_none(),
        "no HSTS in development"
    );
    assert!(
        h.get("access-control-allow-origin").is_none(),
        "CORS off by default"
    );
}

#[tokio::test]
async fn readiness_is_200_while_the_database_answers() {
    let app = spawn_app().await;
    let res = app.get("/health/ready").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ready");
}

#[tokio::test]
async fn readiness_is_503_problem_when_the_database_is_gone() {
    let app = spawn_app().await;
    // Take the database away under the running app: its connections are terminated and
    // new ones are refused, as when the server is down.
    admin_client()
        .await
        .batch_execute(&format!("DROP DATABASE \"{}\" WITH (FORCE)", app.db_name))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let res = app.get("/health/ready").await;
    assert!(started.elapsed() < Duration::from_secs(3), "answers fast");
    assert_problem(res, 503, "not_ready").await;
    // Liveness does not depend on the database.
    assert_eq!(app.get("/health/live").await.status(), 200);
}

#[tokio::test]
async fn a_sane_incoming_request_id_is_kept_and_an_unsafe_one_replaced() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/health/live"))
        .header("X-Request-Id", "trace-abc.123_X")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-abc.123_X");

    for bad in ["has space", &"x".repeat(65), "semi;colon"] {
        let res = app
            .client
            .get(app.url("/health/live"))
            .header("X-Request-Id", bad)
            .send()
            .await
            .unwrap();
        let got = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(got, bad);
        assert!(uuid::Uuid::parse_str(&got).is_ok(), "{got}");
    }
}

#[tokio::test]
async fn an_unknown_route_is_a_404_problem() {
    let app = spawn_app().await;
    let res = app.get("/does-not-exist").await;
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    assert_problem(res, 404, "not_found").await;
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem_with_allow() {
    let app = spawn_app().await;
    let res = app
        .client
        .delete(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["allow"], "GET");
    assert_problem(res, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_before_routing() {
    let app = spawn_app().await;
    let body = vec![b'x'; 64 * 1024 + 1];
    for path in ["/health/live", "/no/such/route"] {
        let res = app
            .client
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let problem = assert_problem(res, 413, "payload_too_large").await;
        assert!(problem["detail"].as_str().unwrap().contains("65536"));
    }
    // A body at the limit is not refused for its size.
    let res = app
        .client
        .post(app.url("/no/such/route"))
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn the_body_limit_is_configurable() {
    let app = spawn_app_with(|c| c.body_limit = 100).await;
    let res = app
        .client
        .post(app.url("/health/live"))
        .body(vec![b'x'; 101])
        .send()
        .await
        .unwrap();
    assert_problem(res, 413, "payload_too_large").await;
}

#[tokio::test]
async fn production_adds_hsts_and_configured_origins_get_cors() {
    let app = spawn_app_with(|c| {
        c.env = Environment::Production;
        c.cors_origins = vec!["https://app.example.com".to_owned()];
    })
    .await;
    let res = app
        .client
        .get(app.url("/health/live"))
        .header("Origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(res.headers()["strict-transport-security"]
        .to_str()
        .unwrap()
        .starts_with("max-age="));
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}
