//! `/openapi.json` and `/docs`, and the document checked against the routes that really exist.
//!
//! How "the routes that exist" is known without a hand-kept list that could drift:
//! - **paths** are read back from actix's own router: an in-process `App` is built with the
//!   real `routes::configure`, and its default service dumps the router's resource map
//!   (`HttpRequest::resource_map()`, printed with `{:?}` and parsed here). Every path found is
//!   then confirmed with the router's own matcher (`ResourceMap::match_pattern`), so a parse
//!   that went wrong fails loudly instead of silently checking less;
//! - **methods** are found by asking the running server: each path is requested with every
//!   method, with credentials that pass its gate (an unlimited-tier key with every scope, or
//!   the admin token) and no body. A method the resource lacks answers 405; anything else —
//!   a 2xx, a validation error, a handler's own 404 — means the route exists. The router's
//!   404 is told apart from a handler's by comparing with what an unregistered path gets.
//!
//! The registered (method, path) set must equal the documented one, in both directions.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::support::{assert_problem, spawn_app_with, TestApp, ADMIN_TOKEN};

const PROBE_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// No limits in the way: probing sends many requests, some without credentials.
async fn spawn() -> TestApp {
    spawn_app_with(|c| {
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

// ---- the router's paths, read back from actix -------------------------------------------

/// A value of Rust's `{:?}` output, enough of it to walk actix's `ResourceMap`.
#[derive(Debug)]
#[allow(dead_code)] // Map entries are parsed (to get past them) but never read.
enum Dbg {
    Str(String),
    Atom(String),
    Struct(String, Vec<(String, Dbg)>),
    Tuple(String, Vec<Dbg>),
    List(Vec<Dbg>),
    Map(Vec<(Dbg, Dbg)>),
}

struct DbgParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl DbgParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) {
        assert!(
            self.eat(c),
            "expected {:?} at {} in the resource map dump: {:?}",
            c as char,
            self.i,
            String::from_utf8_lossy(&self.s[self.i..(self.i + 60).min(self.s.len())])
        );
    }

    fn atom(&mut self) -> String {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"_-.".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn string(&mut self) -> String {
        self.expect(b'"');
        let mut out = Vec::new();
        while self.i < self.s.len() && self.s[self.i] != b'"' {
            if self.s[self.i] == b'\\' {
                self.i += 1;
            }
            out.push(self.s[self.i]);
            self.i += 1;
        }
        self.expect(b'"');
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Items up to `close`, separated by commas (a trailing comma and `..` allowed).
    fn items<T>(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let mut out = Vec::new();
        loop {
            if self.eat(close) {
                return out;
            }
            if self.peek() == Some(b'.') {
                self.atom();
            } else {
                out.push(item(self));
            }
            if !self.eat(b',') {
                self.expect(close);
                return out;
            }
        }
    }

    fn value(&mut self) -> Dbg {
        match self.peek() {
            Some(b'"') => Dbg::Str(self.string()),
            Some(b'[') => {
                self.i += 1;
                Dbg::List(self.items(b']', Self::value))
            }
            Some(b'(') => {
                self.i += 1;
                Dbg::Tuple(String::new(), self.items(b')', Self::value))
            }
            Some(b'{') => {
                self.i += 1;
                Dbg::Map(self.items(b'}', |p| {
                    let k = p.value();
                    p.expect(b':');
                    (k, p.value())
                }))
            }
            _ => {
                let name = self.atom();
                assert!(!name.is_empty(), "unexpected input at {}", self.i);
                if self.eat(b'{') {
                    Dbg::Struct(
                        name,
                        self.items(b'}', |p| {
                            let field = p.atom();
                            p.expect(b':');
                            (field, p.value())
                        }),
                    )
                } else if self.eat(b'(') {
                    Dbg::Tuple(name, self.items(b')', Self::value))
                } else {
                    Dbg::Atom(name)
                }
            }
        }
    }
}

fn field<'a>(v: &'a Dbg, name: &str) -> &'a Dbg {
    match v {
        Dbg::Struct(_, fields) => fields
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no field {name} in {v:?}")),
        other => panic!("expected a struct with {name}, found {other:?}"),
    }
}

/// The full paths of the leaves (resources) under a `ResourceMap` node.
fn leaves(node: &Dbg, prefix: &str, out: &mut Vec<String>) {
    assert!(
        matches!(node, Dbg::Struct(name, _) if name == "ResourceMap"),
        "expected a ResourceMap, found {node:?}"
    );
    let patterns = match field(field(node, "pattern"), "patterns") {
        Dbg::Tuple(kind, items) if kind == "Single" || kind == "List" => match &items[..] {
            [Dbg::Str(p)] => vec![p.clone()],
            [Dbg::List(ps)] => ps
                .iter()
                .map(|p| match p {
                    Dbg::Str(s) => s.clone(),
                    other => panic!("pattern {other:?}"),
                })
                .collect(),
            other => panic!("patterns {other:?}"),
        },
        other => panic!("patterns {other:?}"),
    };
    for pattern in patterns {
        let full = format!("{prefix}{pattern}");
        match field(node, "nodes") {
            Dbg::Atom(none) if none == "None" => out.push(full),
            Dbg::Tuple(some, items) if some == "Some" => match &items[..] {
                [Dbg::List(children)] => {
                    for child in children {
                        leaves(child, &full, out);
                    }
                }
                other => panic!("nodes {other:?}"),
            },
            other => panic!("nodes {other:?}"),
        }
    }
}

/// Dumps the router's resource map (`GET /__router__`), or answers which pattern the router
/// matches for `?path=…`.
async fn router_oracle(
    req: actix_web::HttpRequest,
    q: actix_web::web::Query<BTreeMap<String, String>>,
) -> actix_web::HttpResponse {
    let rmap = req.resource_map();
    let body = match q.get("path") {
        Some(p) => rmap.match_pattern(p).unwrap_or_default(),
        None => format!("{rmap:?}"),
    };
    actix_web::HttpResponse::Ok().body(body)
}

/// Every path pattern the real `routes::configure` registers, from the router itself.
fn router_paths() -> Vec<String> {
    std::thread::spawn(|| {
        actix_web::rt::System::new().block_on(async {
            use actix_web::{test, web, App};
            let app = test::init_service(
                App::new()
                    .configure(keymeter::routes::configure)
                    .default_service(web::to(router_oracle)),
            )
            .await;
            let dump = test::call_and_read_body(
                &app,
                test::TestRequest::get().uri("/__router__").to_request(),
            )
            .await;
            let dump = String::from_utf8(dump.to_vec()).expect("utf-8 dump");
            let mut parser = DbgParser {
                s: dump.as_bytes(),
                i: 0,
            };
            let root = parser.value();
            let mut paths = Vec::new();
            leaves(&root, "", &mut paths);
            assert!(
                paths.len() >= 10,
                "the router dump parsed to only {paths:?}: {dump}"
            );
            // The parse is confirmed by the router's own matcher, path by path.
            for p in &paths {
                let probe = concrete(p);
                let uri = format!("/__router__?path={}", probe.replace('/', "%2F"));
                let matched =
                    test::call_and_read_body(&app, test::TestRequest::get().uri(&uri).to_request())
                        .await;
                assert_eq!(
                    String::from_utf8_lossy(&matched),
                    p.as_str(),
                    "the router does not match {probe} to the parsed pattern {p}"
                );
            }
            paths
        })
    })
    .join()
    .expect("router introspection")
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

    let mut registered = BTreeSet::new();
    for path in router_paths() {
        let credentials = if path.starts_with("/admin") {
            Credentials::Admin
        } else {
            Credentials::Key(&key)
        };
        for method in PROBE_METHODS {
            let (status, body) = call(&app, method, &concrete(&path), &credentials).await;
            assert_ne!(status, 429, "{method} {path} was rate limited: {body}");
            assert_ne!(
                status, 401,
                "{method} {path} refused the credentials: {body}"
            );
            if !is_router_refusal(status, &body, &not_found) {
                registered.insert((method.to_owned(), path.clone()));
            }
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
        } else {
            None
        };
        match expected {
            Some(slug) => {
                assert_eq!(status, 401, "{method} {path} needs credentials: {body}");
                assert_eq!(body["type"], slug, "{method} {path}");
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

#[test]
fn the_router_dump_parser_reads_nested_scopes() {
    let dump = r#"ResourceMap { pattern: ResourceDef { id: 0, name: None, patterns: Single(""), is_prefix: false, pat_type: Static(""), segments: [] }, named: {}, parent: RefCell { value: (Weak) }, nodes: Some([ResourceMap { pattern: ResourceDef { id: 0, name: Some("x"), patterns: Single("/v1"), is_prefix: true, pat_type: Dynamic(Regex("^/v1(?:/|$)"), ["a"]), segments: [Const("/v1")] }, named: {"x": ResourceMap { pattern: ResourceDef { id: 1, name: None, patterns: Single("/z"), is_prefix: false, pat_type: Static("/z"), segments: [] }, named: {}, parent: RefCell { value: (Weak) }, nodes: None }}, parent: RefCell { value: (Weak) }, nodes: Some([ResourceMap { pattern: ResourceDef { id: 0, name: None, patterns: Single("/keys/{id}"), is_prefix: false, pat_type: Static(""), segments: [] }, named: {}, parent: RefCell { value: (Weak) }, nodes: None }]) }, ResourceMap { pattern: ResourceDef { id: 1, name: None, patterns: List(["/a", "/b"]), is_prefix: false, pat_type: Static(""), segments: [] }, named: {}, parent: RefCell { value: (Weak) }, nodes: None }]) }"#;
    let mut p = DbgParser {
        s: dump.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    leaves(&p.value(), "", &mut out);
    assert_eq!(out, ["/v1/keys/{id}", "/a", "/b"]);
}
