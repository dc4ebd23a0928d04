//! The local upstream of the load suite (`load/run.sh` starts it next to keymeter):
//! `cargo build --release --example upstream`, then `target/release/examples/upstream
//! [--port N]`. It listens on 127.0.0.1 (port 0 = one the OS picks) and prints exactly one
//! line on stdout, `listening on 127.0.0.1:<port>`, once it accepts connections.
//!
//! Routes, chosen so every outcome a scrape job can have is one URL away:
//! - `GET /page` — a fixed ~10 KiB HTML page with title, description, canonical, Open Graph
//!   fields and links: what a successful (charged) job fetches;
//! - `GET /slow/{ms}` — the same page after `ms` milliseconds (≤ 120 000): beyond the job's
//!   `timeout_ms` it is a refunded 504;
//! - `GET /status/{code}` — an empty answer with that status (200–599):
//!   `/status/500` is a refunded 502, `/status/503` feeds a breaker;
//! - `POST /hook` — a job-webhook receiver that counts deliveries and answers 200, verifying
//!   nothing; `GET /stats` — `{"hook_deliveries": n, "requests": n}`;
//! - `POST /stripe/v1/customers`, `POST /stripe/v1/checkout/sessions` — a minimal stand-in
//!   for the Stripe API calls the load scripts make keymeter make (point `STRIPE_API_BASE` at
//!   `http://127.0.0.1:<port>/stripe`): each answers Stripe's fixture object with a fresh id,
//!   the same one again for a repeated `Idempotency-Key`, as Stripe does.
//!
//! Built as an example so it shares the crate's dependencies and needs no extra crate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::json;

/// Longest `/slow/{ms}`: a load run never needs more, and a typo cannot park a worker forever.
const MAX_SLOW_MS: u64 = 120_000;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    hook_deliveries: AtomicU64,
    stripe_objects: AtomicU64,
    /// Stripe's idempotency: (path, Idempotency-Key) → the id answered the first time. A
    /// `std` mutex: held only for a map lookup, never across an await.
    stripe_ids: Mutex<HashMap<(String, String), String>>,
}

/// A page with everything the `metadata`, `text`, `markdown` and `links` formats extract,
/// padded with readable paragraphs and links to about 10 KiB.
fn page() -> String {
    let mut body = String::new();
    let mut n = 0;
    while body.len() < 9 * 1024 {
        n += 1;
        body.push_str(&format!(
            "<h2>Section {n}</h2>\n<p>Paragraph {n} of the load-test page: plain prose with \
             <b>some markup</b>, <i>emphasis</i> and a <a href=\"/articles/{n}\">link to article \
             {n}</a>, plus an <a href=\"https://example.org/ref/{n}\">external reference</a>. \
             The text is long enough to make extraction do real work.</p>\n"
        ));
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <title>Load test page</title>\n\
         <meta name=\"description\" content=\"A fixed page served by keymeter's load-test upstream.\">\n\
         <link rel=\"canonical\" href=\"/page\">\n\
         <meta property=\"og:title\" content=\"Load test page (OG)\">\n\
         <meta property=\"og:description\" content=\"Open Graph description of the load page.\">\n\
         <meta property=\"og:image\" content=\"/img/cover.png\">\n\
         <meta property=\"og:type\" content=\"article\">\n\
         </head><body>\n<h1>Load test page</h1>\n{body}</body></html>\n"
    )
}

fn html(page: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(page.to_owned())
}

async fn get_page(page: web::Data<String>) -> HttpResponse {
    html(&page)
}

async fn slow(path: web::Path<u64>, page: web::Data<String>) -> HttpResponse {
    tokio::time::sleep(Duration::from_millis(path.into_inner().min(MAX_SLOW_MS))).await;
    html(&page)
}

async fn status(path: web::Path<u16>) -> HttpResponse {
    match StatusCode::from_u16(path.into_inner()) {
        Ok(code) if code.as_u16() >= 200 => HttpResponse::build(code).finish(),
        _ => HttpResponse::BadRequest().body("status must be 200-599\n"),
    }
}

async fn hook(counters: web::Data<Counters>) -> HttpResponse {
    counters.hook_deliveries.fetch_add(1, Ordering::Relaxed);
    HttpResponse::Ok().finish()
}

async fn stats(counters: web::Data<Counters>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "requests": counters.requests.load(Ordering::Relaxed),
        "hook_deliveries": counters.hook_deliveries.load(Ordering::Relaxed),
        "stripe_objects": counters.stripe_objects.load(Ordering::Relaxed),
    }))
}

/// `POST /stripe/v1/{customers|checkout/sessions}`: a new id per Idempotency-Key.
async fn stripe(req: HttpRequest, counters: web::Data<Counters>) -> HttpResponse {
    let path = req.path().to_owned();
    let prefix = if path.ends_with("/customers") {
        "cus_load"
    } else {
        "cs_test_load"
    };
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut fresh = || {
        let n = counters.stripe_objects.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}_{n:08}_{}", std::process::id())
    };
    let id = match key {
        Some(k) => {
            let mut ids = counters
                .stripe_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            ids.entry((path, k)).or_insert_with(&mut fresh).clone()
        }
        None => fresh(),
    };
    // Stripe's own object shape (the tests' fixtures): keymeter's client (stripe-rust) reads
    // the answer as a typed Customer or Checkout Session, so a bare `{id}` would not do.
    let fixture = if prefix == "cus_load" {
        include_str!("../tests/fixtures/stripe/customer.json")
    } else {
        include_str!("../tests/fixtures/stripe/checkout.session.json")
    };
    let mut object: serde_json::Value = serde_json::from_str(fixture).unwrap_or_default();
    object["id"] = json!(id);
    if prefix != "cus_load" {
        object["url"] = json!(format!("https://checkout.stripe.test/pay/{id}"));
    }
    HttpResponse::Ok().json(object)
}

fn port_from_args() -> std::io::Result<u16> {
    let mut args = std::env::args().skip(1);
    let mut port = 0;
    while let Some(a) = args.next() {
        let value = match a.as_str() {
            "--port" => args.next(),
            _ if a.starts_with("--port=") => a.strip_prefix("--port=").map(str::to_owned),
            "-h" | "--help" => {
                println!("usage: upstream [--port N]   (0 or none: a free port)");
                std::process::exit(0);
            }
            _ => None,
        };
        port = value.and_then(|v| v.parse().ok()).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad argument {a:?}; usage: upstream [--port N]"),
            )
        })?;
    }
    Ok(port)
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let port = port_from_args()?;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let addr = listener.local_addr()?;
    let page = web::Data::new(page());
    let counters = web::Data::new(Counters::default());
    let c = counters.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(page.clone())
            .app_data(c.clone())
            .wrap_fn(|req, srv| {
                if let Some(c) = req.app_data::<web::Data<Counters>>() {
                    c.requests.fetch_add(1, Ordering::Relaxed);
                }
                actix_web::dev::Service::call(srv, req)
            })
            .route("/page", web::get().to(get_page))
            .route("/slow/{ms}", web::get().to(slow))
            .route("/status/{code}", web::get().to(status))
            .route("/hook", web::post().to(hook))
            .route("/stats", web::get().to(stats))
            .route("/stripe/v1/customers", web::post().to(stripe))
            .route("/stripe/v1/checkout/sessions", web::post().to(stripe))
    })
    // SIGTERM/SIGINT stop it (actix's own handling); a slow page does not hold that up.
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    // One line (stdout is line-buffered) so a script can read the port.
    println!("listening on {addr}");
    server.await
}
