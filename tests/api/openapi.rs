//! `/openapi.json` and `/docs`, and the document checked against the routes that really exist.
//!
//! "The routes that exist" is the route table the server registers (`routes::table()`, the
//! same data `routes::configure` hands to actix), confirmed against the running server: each
//! path is requested with every method, with credentials that pass its gate (an
//! unlimited-tier key with every scope, or the admin token) and no body. A method the table
//! lists must reach a handler; any other must be refused by the router (405). A handler's
//! own 404 is told apart from the router's by comparing with what an unregistered path gets.
//!
//! The registered (method, path) set must equal the documented one, in both directions.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::support::{assert_problem, spawn_app_with, TestApp, ADMIN_TOKEN};

const PROBE_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// No limits in the way: probing sends many requests, some without credentials.
async fn spawn() -> TestApp {
    spawn_app_with(|c| {
        crate::gateway::gateway(c);
        c.auth_failures_per_minute = 100_000;
        c.ip_rate_per_minute = 100_000;
        c.ip_burst = 100_000;
    })
    .await
}

async fn fetch_document(app: &TestApp) -> Value {
    let res = app.get("/openapi.json").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    res.json().await.expect("the document is JSON")
}

/// (METHOD, path) of every documented operation.
fn documented(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if [
                "get", "put", "post", "delete", "patch", "options", "head", "trace",
            ]
            .contains(&method.as_str())
            {
                out.insert((method.to_uppercase(), path.clone()), op.clone());
            }
        }
    }
    out
}

/// The pattern with every `{param}` filled by a random UUID.
fn concrete(pattern: &str) -> String {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed {param}") + start;
        out.push_str(&uuid::Uuid::new_v4().to_string());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

// ---- probing the running server -----------------------------------------------------------

/// How the server answers a path no route matches, to tell it apart from a handler's 404.
async fn router_not_found(app: &TestApp) -> (String, String) {
    let res = app
        .get(&format!("/no-such-route-{}", uuid::Uuid::new_v4()))
        .await;
    let body = assert_problem(res, 404, "not_found").await;
    (
        body["type"].as_str().unwrap().to_owned(),
        body["detail"].as_str().unwrap().to_owned(),
    )
}

enum Credentials<'a> {
    None,
    Key(&'a str),
    Admin,
    Service,
}

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    credentials: &Credentials<'_>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = app.client.request(method, app.url(path));
    match credentials {
        Credentials::None => {}
        Credentials::Key(k) => req = req.bearer_auth(k),
        Credentials::Admin => req = req.bearer_auth(ADMIN_TOKEN),
        Credentials::Service => req = req.bearer_auth(crate::gateway::SERVICE_TOKEN),
    }
    let res = req.send().await.expect("request sent");
    let status = res.status().as_u16();
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

fn is_router_refusal(status: u16, body: &Value, not_found: &(String, String)) -> bool {
    status == 405
        || (status == 404
            && body["type"].as_str() == Some(not_found.0.as_str())
            && body["detail"].as_str() == Some(not_found.1.as_str()))
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_both_pages_need_no_key() {
    let app = spawn().await;
    let doc = fetch_document(&app).await;
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3.1"), "openapi is {version}");
    for scheme in ["ApiKey", "ApiKeyHeader", "AdminToken"] {
        assert!(
            doc["components"]["securitySchemes"][scheme].is_object(),
            "{scheme}"
        );
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());

    let res = app.get("/docs").await;
    assert_eq!(res.status(), 200);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = res.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    assert!(!html.contains("https://") && !html.contains("http://"));
}

#[tokio::test]
async fn every_registered_route_is_documented_and_every_documented_route_exists() {
    let app = spawn().await;
    let doc = fetch_document(&app).await;
    let documented = documented(&doc);
    let not_found = router_not_found(&app).await;
    let (_, key) = app.create_account("internal", 0).await;

    let registered: BTreeSet<(String, String)> = keymeter::routes::table()
        .into_iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    let paths: BTreeSet<&String> = registered.iter().map(|(_, p)| p).collect();
    for path in paths {
        let service = keymeter::routes::table()
            .iter()
            .any(|r| r.path == path.as_str() && r.access == keymeter::routes::Access::Service);
        let credentials = if path.starts_with("/admin") {
            Credentials::Admin
        } else if service {
            Credentials::Service
        } else {
            Credentials::Key(&key)
        };
        for method in PROBE_METHODS {
            let (status, body) = call(&app, method, &concrete(path), &credentials).await;
            assert_ne!(status, 429, "{method} {path} was rate limited: {body}");
            assert_ne!(
                status, 401,
                "{method} {path} refused the credentials: {body}"
            );
            let in_table = registered.contains(&(method.to_owned(), path.clone()));
            assert_eq!(
                !is_router_refusal(status, &body, &not_found),
                in_table,
                "{method} {path}: the route table says {}, the server answered {status} {body}",
                if in_table {
                    "registered"
                } else {
                    "not registered"
                }
            );
        }
    }
    let documented_set: BTreeSet<_> = documented.keys().cloned().collect();
    let undocumented: Vec<_> = registered.difference(&documented_set).collect();
    let missing: Vec<_> = documented_set.difference(&registered).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "registered but not in /openapi.json: {undocumented:?}\n\
         in /openapi.json but not served: {missing:?}"
    );
}

#[tokio::test]
async fn without_credentials_documented_routes_answer_as_their_security_says() {
    let app = spawn().await;
    let doc = fetch_document(&app).await;
    let not_found = router_not_found(&app).await;
    for ((method, path), op) in documented(&doc) {
        let (status, body) = call(&app, &method, &concrete(&path), &Credentials::None).await;
        assert!(
            !is_router_refusal(status, &body, &not_found),
            "{method} {path}: the router does not know it ({status} {body})"
        );
        let schemes: BTreeSet<String> = op["security"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
            .flat_map(|o| o.keys().cloned())
            .collect();
        let expected = if schemes.contains("ApiKey") {
            Some("invalid_api_key")
        } else if schemes.contains("AdminToken") {
            Some("invalid_admin_token")
        } else if schemes.contains("ServiceToken") {
            Some("invalid_service_token")
        } else {
            None
        };
        match expected {
            Some(slug) => {
                assert_eq!(status, 401, "{method} {path} needs credentials: {body}");
                // A HEAD answer has no body to read the type from.
                if method != "HEAD" {
                    assert_eq!(body["type"], slug, "{method} {path}");
                }
            }
            None => assert_ne!(status, 401, "{method} {path} is documented as public"),
        }
        let documented_status = op["responses"][status.to_string()].is_object();
        assert!(
            documented_status,
            "{method} {path} answered {status}, which it does not document: {body}"
        );
    }
}

/// Found by fuzzing the document (schemathesis): PostgreSQL text cannot hold NUL, and these
/// reached the database and came back as 500s (a charge's could fail a whole group commit).
#[tokio::test]
async fn fuzzing_findings_are_refused_as_invalid_not_server_errors() {
    let app = spawn().await;
    let (account, key) = app.create_account("internal", 100).await;
    let res = app
        .post_json("/v1/keys", &key, serde_json::json!({"name": "a\u{0}b"}))
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .post_json(
            "/v1/credits/charge",
            &key,
            serde_json::json!({"amount": 1, "reason": "x\u{0}"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            serde_json::json!({"amount": 1, "reason": "x\u{0}"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
    // Also found by fuzzing: a grant that would overflow the bigint balance was a 500.
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            serde_json::json!({"amount": i64::MAX, "reason": "too much"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
}
