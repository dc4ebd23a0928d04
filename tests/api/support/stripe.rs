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

/// Objects the local Stripe API answers retrievals with, by id (Checkout Sessions with their
/// line items, as `GET /v1/checkout/sessions/{id}?expand[]=line_items` answers).
pub type Objects = Arc<Mutex<HashMap<String, Value>>>;

/// How the stand-in answers `POST /v1/payment_intents` (an auto-recharge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PiAnswer {
    /// 200, status `succeeded`.
    Succeeded,
    /// 200, status `processing` (the outcome comes by webhook).
    Processing,
    /// 200, status `requires_action` (the bank wants the customer).
    RequiresAction,
    /// 402 `card_error` with this code and decline code, as Stripe refuses an off-session
    /// confirmation (`authentication_required`, `card_declined`).
    Declined(&'static str, Option<&'static str>),
}

/// The local stand-in for api.stripe.com, as a test holds it.
pub struct LocalStripe {
    pub base: String,
    pub recorded: Recorded,
    pub objects: Objects,
    pub pi_answer: Arc<Mutex<PiAnswer>>,
}

impl LocalStripe {
    /// Makes Stripe know `session` (by its id), selling `quantity` of `price`: what a
    /// retrieval with its line items answers.
    pub fn knows_session(&self, session: &Value, price: &str, quantity: u64) {
        let mut s = session.clone();
        let mut item = fixture("item");
        item["id"] = json!(format!("li_{}", Uuid::new_v4().simple()));
        item["price"] = {
            let mut p = fixture("price");
            p["id"] = json!(price);
            p
        };
        item["quantity"] = json!(quantity);
        let id = s["id"].as_str().unwrap().to_owned();
        s["line_items"] = json!({
            "object": "list",
            "data": [item],
            "has_more": false,
            "url": format!("/v1/checkout/sessions/{id}/line_items"),
        });
        self.objects.lock().unwrap().insert(id, s);
    }

    /// Makes Stripe know a completed session whose intent saved card `pm`: a pack session
    /// (mode `payment`, its PaymentIntent expanded) or a setup session (its SetupIntent).
    pub fn knows_session_with_card(&self, session: &Value, pm: &str) {
        let mut s = session.clone();
        if s["mode"] == "setup" {
            let mut si = fixture("setup_intent");
            si["payment_method"] = json!(pm);
            si["status"] = json!("succeeded");
            s["setup_intent"] = si;
        } else {
            let mut pi = fixture("payment_intent");
            pi["id"] = s["payment_intent"].clone();
            pi["payment_method"] = json!(pm);
            pi["status"] = json!("succeeded");
            pi["last_payment_error"] = Value::Null;
            pi["next_action"] = Value::Null;
            s["payment_intent"] = pi;
        }
        let id = s["id"].as_str().unwrap().to_owned();
        self.objects.lock().unwrap().insert(id, s);
    }

    /// The PaymentIntents the stand-in created, as it answered them (replays excluded).
    pub fn payment_intents(&self) -> Vec<Value> {
        let objs = self.objects.lock().unwrap();
        let mut v: Vec<Value> = objs
            .iter()
            .filter(|(k, _)| k.starts_with("pi_local_"))
            .map(|(_, v)| v.clone())
            .collect();
        v.sort_by_key(|p| p["created"].as_i64());
        v
    }

    /// The requests made to `path`.
    pub fn requests_to(&self, path: &str) -> Vec<(String, Option<String>, String)> {
        self.recorded
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == path)
            .cloned()
            .collect()
    }
}

/// A local stand-in for api.stripe.com: answers with Stripe's fixture objects (a customer
/// `cus_local_1`, Checkout sessions `cs_local_…`, billing-portal sessions), retrieves the
/// Checkout Sessions a test made it know (404 `resource_missing` for others), refuses any
/// key but `sk_test_keymeter`, and records each request. Returns its base URL (for
/// `config.billing.api_base`).
pub async fn local_stripe() -> (String, Recorded) {
    let s = stand_in().await;
    (s.base, s.recorded)
}

/// [`local_stripe`], with the objects it answers retrievals with.
pub async fn stand_in() -> LocalStripe {
    let recorded: Recorded = Arc::default();
    let objects: Objects = Arc::default();
    let pi_answer = Arc::new(Mutex::new(PiAnswer::Succeeded));
    // Stripe's idempotency: a key seen before gets the first answer again.
    let replays: Arc<Mutex<HashMap<String, (u16, Value)>>> = Arc::default();
    let rec = recorded.clone();
    let objs = objects.clone();
    let answer = pi_answer.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || {
        let rec = rec.clone();
        let objs = objs.clone();
        let answer = answer.clone();
        let replays = replays.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let rec = rec.clone();
            let objs = objs.clone();
            let answer = answer.clone();
            let replays = replays.clone();
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
                    if body.is_empty() {
                        req.query_string().to_owned()
                    } else {
                        String::from_utf8_lossy(&body).into_owned()
                    },
                ));
                if !auth_ok {
                    return HttpResponse::Unauthorized().json(
                        json!({"error": {"type": "invalid_request_error", "message": "bad key"}}),
                    );
                }
                let missing = || {
                    HttpResponse::NotFound().json(json!({"error": {
                        "type": "invalid_request_error", "code": "resource_missing",
                        "message": "No such object"}}))
                };
                match (req.method().as_str(), req.path()) {
                    ("POST", "/v1/customers") => {
                        let mut c = fixture("customer");
                        c["id"] = json!("cus_local_1");
                        HttpResponse::Ok().json(c)
                    }
                    ("POST", "/v1/checkout/sessions") => {
                        let mut s = fixture("checkout.session");
                        s["id"] = json!(format!("cs_local_{}", Uuid::new_v4().simple()));
                        s["url"] = json!("https://checkout.stripe.com/c/pay/cs_local");
                        HttpResponse::Ok().json(s)
                    }
                    ("POST", "/v1/billing_portal/sessions") => {
                        let f = form(&String::from_utf8_lossy(&body));
                        let mut s = fixture("billing_portal.session");
                        s["id"] = json!(format!("bps_local_{}", Uuid::new_v4().simple()));
                        s["customer"] = json!(f.get("customer"));
                        s["return_url"] = json!(f.get("return_url"));
                        s["url"] = json!("https://billing.stripe.com/p/session/local");
                        HttpResponse::Ok().json(s)
                    }
                    ("GET", p) if p.starts_with("/v1/prices/") => {
                        let mut price = fixture("price");
                        price["id"] = json!(&p["/v1/prices/".len()..]);
                        price["unit_amount"] = json!(1000);
                        price["currency"] = json!("usd");
                        HttpResponse::Ok().json(price)
                    }
                    ("POST", "/v1/payment_intents") => {
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        if let Some((status, v)) = replays.lock().unwrap().get(&key).cloned() {
                            return HttpResponse::build(
                                actix_web::http::StatusCode::from_u16(status).unwrap(),
                            )
                            .json(v);
                        }
                        let f = form(&String::from_utf8_lossy(&body));
                        let mut pi = fixture("payment_intent");
                        let id = format!("pi_local_{}", Uuid::new_v4().simple());
                        pi["id"] = json!(id);
                        pi["created"] = json!(now_nanos());
                        pi["amount"] = json!(f.get("amount").and_then(|a| a.parse::<i64>().ok()));
                        pi["currency"] = json!(f.get("currency"));
                        pi["customer"] = json!(f.get("customer"));
                        pi["payment_method"] = json!(f.get("payment_method"));
                        pi["last_payment_error"] = Value::Null;
                        pi["next_action"] = Value::Null;
                        pi["metadata"] = json!(f
                            .iter()
                            .filter_map(|(k, v)| k
                                .strip_prefix("metadata[")
                                .and_then(|k| k.strip_suffix(']'))
                                .map(|k| (k.to_owned(), json!(v))))
                            .collect::<serde_json::Map<_, _>>());
                        let (status, body) = match answer.lock().unwrap().clone() {
                            PiAnswer::Succeeded => {
                                pi["status"] = json!("succeeded");
                                pi["amount_received"] = pi["amount"].clone();
                                (200, pi.clone())
                            }
                            PiAnswer::Processing => {
                                pi["status"] = json!("processing");
                                (200, pi.clone())
                            }
                            PiAnswer::RequiresAction => {
                                pi["status"] = json!("requires_action");
                                (200, pi.clone())
                            }
                            PiAnswer::Declined(code, decline) => {
                                pi["status"] = json!("requires_payment_method");
                                (
                                    402,
                                    json!({"error": {
                                    "type": "card_error", "code": code, "decline_code": decline,
                                    "message": "Your card was declined.",
                                    "payment_intent": pi.clone()}}),
                                )
                            }
                        };
                        objs.lock().unwrap().insert(id, pi);
                        replays.lock().unwrap().insert(key, (status, body.clone()));
                        HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                            .json(body)
                    }
                    ("GET", p) if p.starts_with("/v1/checkout/sessions/") => {
                        let id = &p["/v1/checkout/sessions/".len()..];
                        match objs.lock().unwrap().get(id) {
                            Some(s) => HttpResponse::Ok().json(s),
                            None => missing(),
                        }
                    }
                    _ => missing(),
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
    LocalStripe {
        base: format!("http://127.0.0.1:{port}"),
        recorded,
        objects,
        pi_answer,
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
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
