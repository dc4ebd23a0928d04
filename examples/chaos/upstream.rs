//! The run's local world outside keymeter, in this process: the web pages scrape jobs fetch
//! (fast, slow and failing ones, and a knob to slow them all: the "slow upstream" fault), the
//! receiver of job webhooks, and the stand-in for the two Stripe API calls a Checkout makes
//! keymeter make (as `examples/upstream.rs` does for the load suite).
//!
//! It runs on its own actix system on its own thread, so the fault of slowing it is a real
//! slowdown of a real HTTP server, not of the client's own runtime.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

#[derive(Default)]
pub struct World {
    /// Extra milliseconds before every page answer (the "slow upstream" fault).
    pub delay_ms: AtomicU64,
    pub page_requests: AtomicU64,
    /// Job ids whose webhook arrived, with how many deliveries each.
    pub hooks: Mutex<HashMap<String, u64>>,
    /// Account event ids (`evt_…`) delivered to `/events`, with how many deliveries each.
    pub events: Mutex<HashMap<String, u64>>,
    stripe_objects: AtomicU64,
    /// Stripe's idempotency: (path, Idempotency-Key) → the id answered the first time.
    stripe_ids: Mutex<HashMap<(String, String), String>>,
    pub sessions: Mutex<HashSet<String>>,
    /// Tokens `/once/{token}` has answered, with how many requests each.
    pub once: Mutex<HashMap<String, u64>>,
}

fn page() -> String {
    let mut links = String::new();
    for n in 0..20 {
        links.push_str(&format!(
            "<p>Paragraph {n}: <a href=\"/articles/{n}\">article {n}</a> and \
             <a href=\"https://example.org/ref/{n}\">a reference</a>.</p>\n"
        ));
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Chaos page</title><meta name=\"description\" content=\"A page of the chaos run.\">\
         <link rel=\"canonical\" href=\"/page\"></head><body><h1>Chaos page</h1>\n{links}</body></html>\n"
    )
}

async fn delayed(world: &World) {
    let d = world.delay_ms.load(Ordering::Relaxed);
    if d > 0 {
        tokio::time::sleep(Duration::from_millis(d)).await;
    }
}

async fn get_page(world: web::Data<Arc<World>>, page: web::Data<String>) -> HttpResponse {
    world.page_requests.fetch_add(1, Ordering::Relaxed);
    delayed(&world).await;
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(page.get_ref().clone())
}

async fn slow(
    path: web::Path<u64>,
    world: web::Data<Arc<World>>,
    page: web::Data<String>,
) -> HttpResponse {
    world.page_requests.fetch_add(1, Ordering::Relaxed);
    delayed(&world).await;
    tokio::time::sleep(Duration::from_millis(path.into_inner().min(60_000))).await;
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(page.get_ref().clone())
}

async fn status(path: web::Path<u16>, world: web::Data<Arc<World>>) -> HttpResponse {
    world.page_requests.fetch_add(1, Ordering::Relaxed);
    delayed(&world).await;
    match StatusCode::from_u16(path.into_inner()) {
        Ok(code) if code.as_u16() >= 200 => HttpResponse::build(code).finish(),
        _ => HttpResponse::BadRequest().finish(),
    }
}

/// `/once/{token}`: a flaky page — the first request for a token gets the page after 3 s,
/// every later one a 500 after 5 s. A job fetches it once; only a job run twice (its lease
/// expired while its instance was stalled, and another instance ran it again) sees both
/// answers. The second attempt is still waiting for its 500 when the stalled instance wakes
/// with the page in hand, so only the lease fence (owner and attempt, not just `running`)
/// keeps the stale attempt from ending the job `succeeded`: the checker's
/// `job_ended_by_its_last_attempt` reads the request counts kept here.
async fn once(
    path: web::Path<String>,
    world: web::Data<Arc<World>>,
    page: web::Data<String>,
) -> HttpResponse {
    world.page_requests.fetch_add(1, Ordering::Relaxed);
    let seen = {
        let mut once = world.once.lock().unwrap_or_else(|e| e.into_inner());
        let n = once.entry(path.into_inner()).or_default();
        *n += 1;
        *n
    };
    delayed(&world).await;
    if seen > 1 {
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        return HttpResponse::InternalServerError().finish();
    }
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(page.get_ref().clone())
}

/// A job webhook (`{id, type, data: <the job>}`): counted by job id. Not verified: the run
/// checks money, not the webhook signature (tests/api covers that).
async fn hook(body: web::Bytes, world: web::Data<Arc<World>>) -> HttpResponse {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = v["data"]["id"].as_str().unwrap_or("?").to_owned();
    *world
        .hooks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(id)
        .or_default() += 1;
    HttpResponse::Ok().finish()
}

/// An account event (`{id, type, account_id, data}`), counted by its id: deliveries are at
/// least once, so a receiver deduplicates on it.
async fn event(body: web::Bytes, world: web::Data<Arc<World>>) -> HttpResponse {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = v["id"].as_str().unwrap_or("?").to_owned();
    *world
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(id)
        .or_default() += 1;
    HttpResponse::Ok().finish()
}

/// `POST /stripe/v1/{customers|checkout/sessions}`: Stripe's fixture object with a fresh id,
/// the same id again for a repeated `Idempotency-Key`, as Stripe does.
async fn stripe(req: HttpRequest, world: web::Data<Arc<World>>) -> HttpResponse {
    let path = req.path().to_owned();
    let customer = path.ends_with("/customers");
    let prefix = if customer {
        "cus_chaos"
    } else {
        "cs_test_chaos"
    };
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let fresh = || {
        let n = world.stripe_objects.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}_{n:08}_{}", std::process::id())
    };
    let id = match key {
        Some(k) => world
            .stripe_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((path, k))
            .or_insert_with(fresh)
            .clone(),
        None => fresh(),
    };
    let fixture = if customer {
        include_str!("../../tests/fixtures/stripe/customer.json")
    } else {
        include_str!("../../tests/fixtures/stripe/checkout.session.json")
    };
    let mut object: Value = serde_json::from_str(fixture).unwrap_or_default();
    object["id"] = json!(id);
    if !customer {
        object["url"] = json!(format!("https://checkout.stripe.test/pay/{id}"));
        world
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }
    HttpResponse::Ok().json(object)
}

/// Anything else under `/stripe`: Stripe's 404 (keymeter's best-effort card read of a pack
/// session asks for the session; this run saves no cards).
async fn stripe_missing() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"error": {
        "type": "invalid_request_error", "code": "resource_missing",
        "message": "No such object (chaos stand-in)."}}))
}

/// Starts the server on 127.0.0.1 (a port the OS picks) on a thread of its own; returns the
/// port.
pub fn start(world: Arc<World>) -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::Builder::new()
        .name("chaos-upstream".into())
        .spawn(move || {
            let page = web::Data::new(page());
            let world = web::Data::new(world);
            let sys = actix_web::rt::System::new();
            let run = sys.block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(page.clone())
                        .app_data(world.clone())
                        .route("/page", web::get().to(get_page))
                        .route("/slow/{ms}", web::get().to(slow))
                        .route("/status/{code}", web::get().to(status))
                        .route("/once/{token}", web::get().to(once))
                        .route("/hook", web::post().to(hook))
                        .route("/events", web::post().to(event))
                        .route("/stripe/v1/customers", web::post().to(stripe))
                        .route("/stripe/v1/checkout/sessions", web::post().to(stripe))
                        .default_service(web::to(stripe_missing))
                })
                .workers(2)
                .shutdown_timeout(1)
                .listen(listener)?
                .run();
                server.await
            });
            if let Err(e) = run {
                eprintln!("chaos upstream stopped: {e}");
            }
        })?;
    Ok(port)
}
