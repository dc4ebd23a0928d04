//! Stripe, as the billing tests meet it: events built from Stripe's published fixtures
//! (`tests/fixtures/stripe/`, see its README), signed the way Stripe signs them (HMAC-SHA256
//! of "t.body", computed here independently of the server's verifier) and delivered to
//! `/v1/billing/webhook`; and a local stand-in for api.stripe.com that records what it is
//! sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use super::app::TestApp;

/// One of Stripe's published objects, by file name (`event`, `checkout.session`, …).
pub fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stripe")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("stripe fixture"))
        .expect("fixture JSON")
}

/// Now, in Unix seconds, as Stripe stamps events and signatures.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An event envelope from the fixture, with a fresh id, around `object`.
pub fn event(kind: &str, object: Value, created: i64) -> Value {
    let mut e = fixture("event");
    e["id"] = json!(format!("evt_{}", Uuid::new_v4().simple()));
    e["type"] = json!(kind);
    e["created"] = json!(created);
    e["data"]["object"] = object;
    e
}

/// The hex `v1` signature of `body` at time `t` under `secret`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The whole `Stripe-Signature` header: `t=…,v1=…`.
pub fn signature_header(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", signature(secret, t, body))
}

/// Posts `body` to the webhook route with `header` as its `Stripe-Signature` (none if `None`).
pub async fn deliver_with(app: &TestApp, body: &[u8], header: Option<String>) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/v1/billing/webhook"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(h) = header {
        req = req.header("Stripe-Signature", h);
    }
    req.send().await.unwrap()
}

/// Delivers event `e`, signed now with `secret`.
pub async fn deliver(app: &TestApp, secret: &str, e: &Value) -> reqwest::Response {
    let body = serde_json::to_vec(e).unwrap();
    deliver_with(app, &body, Some(signature_header(secret, now(), &body))).await
}

/// What the local Stripe API received: (path, Idempotency-Key, form body), in order.
pub type Recorded = Arc<Mutex<Vec<(String, Option<String>, String)>>>;

/// A local stand-in for api.stripe.com: answers with Stripe's fixture objects (a customer
/// `cus_local_1`, Checkout sessions `cs_local_…`), refuses any key but `sk_test_keymeter`,
/// and records each request. Returns its base URL (for `config.billing.api_base`).
pub async fn local_stripe() -> (String, Recorded) {
    let recorded: Recorded = Arc::default();
    let rec = recorded.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || {
        let rec = rec.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let rec = rec.clone();
            async move {
                let key = req
                    .headers()
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let auth_ok = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    == Some("Bearer sk_test_keymeter");
                rec.lock().unwrap().push((
                    req.path().to_owned(),
                    key,
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                if !auth_ok {
                    return HttpResponse::Unauthorized().json(
                        json!({"error": {"type": "invalid_request_error", "message": "bad key"}}),
                    );
                }
                match req.path() {
                    "/v1/customers" => {
                        let mut c = fixture("customer");
                        c["id"] = json!("cus_local_1");
                        HttpResponse::Ok().json(c)
                    }
                    "/v1/checkout/sessions" => {
                        let mut s = fixture("checkout.session");
                        s["id"] = json!(format!("cs_local_{}", Uuid::new_v4().simple()));
                        s["url"] = json!("https://checkout.stripe.com/c/pay/cs_local");
                        HttpResponse::Ok().json(s)
                    }
                    _ => HttpResponse::NotFound()
                        .json(json!({"error": {"type": "invalid_request_error"}})),
                }
            }
        }))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (format!("http://127.0.0.1:{port}"), recorded)
}

/// A recorded form body (`a=1&b%5B0%5D=x`), decoded into its fields.
pub fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}
