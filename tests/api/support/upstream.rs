//! Local sites for scrape jobs and job webhooks, all on loopback: the SSRF guard lets a test
//! app reach them only through its allow-list ([`Upstream::allow`], [`loopback`], then
//! `spawn_jobs_app` or `allow_scraping`).
//!
//! - [`Upstream`]: pages with known metadata, slow pages, any status, redirects to private
//!   addresses and to `localhost`, a 50 MiB body, a compressible page, a page that fails on
//!   demand, and a webhook receiver that records deliveries (and fails the first few on
//!   demand). It counts requests per path and in flight, and has a port that resets every
//!   connection.
//! - [`dead_port`]: refuses every connection. [`black_hole`]: accepts and never answers.
//! - [`collector`]: an OTLP/HTTP trace collector.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// `/page`: a page whose metadata, text and links the tests know.
const PAGE: &str = r#"<!doctype html><html lang="en"><head>
<title>Known Page</title>
<meta name="description" content="A page with known metadata.">
<link rel="canonical" href="/canonical">
<meta property="og:title" content="OG Known">
<meta property="og:image" content="/img.png">
</head><body><h1>Hello</h1><p>Readable <b>text</b> here.</p>
<a href="/a">A</a> <a href="/a#frag">A again</a> <a href="https://example.org/x">X</a>
</body></html>"#;

/// A webhook delivery received at `/hook`.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub at: Instant,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Delivery {
    /// The delivered event (`Value::Null` when the body is not JSON).
    pub fn event(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

#[derive(Clone, Default)]
struct State {
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    failing: Arc<AtomicBool>,
    hooks: Arc<Mutex<Vec<Delivery>>>,
    hook_failures: Arc<AtomicUsize>,
}

/// A local site (see the module documentation for its paths).
pub struct Upstream {
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    pub port: u16,
    /// A port that accepts connections and closes them at once with a TCP reset.
    pub reset_port: u16,
    state: State,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let state = State::default();
        let s = state.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = HttpServer::new(move || {
            let s = s.clone();
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let s = s.clone();
                async move {
                    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    *s.hits
                        .lock()
                        .unwrap()
                        .entry(req.path().to_owned())
                        .or_default() += 1;
                    let res = respond(&s, &req, body).await;
                    s.in_flight.fetch_sub(1, Ordering::SeqCst);
                    res
                }
            }))
        })
        .workers(2)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        let reset = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let reset_port = reset.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((sock, _)) = reset.accept().await {
                // Linger 0: close with a TCP reset, not a FIN (it does not block when zero).
                #[allow(deprecated)]
                let _ = sock.set_linger(Some(Duration::ZERO));
                drop(sock);
            }
        });
        Upstream {
            base: format!("http://127.0.0.1:{port}"),
            port,
            reset_port,
            state,
        }
    }

    /// `{base}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Allow-list entries for this site and its reset port, by address and by the name
    /// `localhost`.
    pub fn allow(&self) -> Vec<String> {
        [self.port, self.reset_port]
            .iter()
            .flat_map(|p| [format!("127.0.0.1:{p}"), format!("localhost:{p}")])
            .collect()
    }

    /// Requests received for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// The most requests it was ever answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// `/health-toggle` answers 503 while this is set, 200 otherwise.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// The next `n` webhook deliveries are answered with a 500 (and still recorded).
    pub fn fail_next_hooks(&self, n: usize) {
        self.state.hook_failures.store(n, Ordering::SeqCst);
    }

    /// Every webhook delivery received so far, in order.
    pub fn hooks(&self) -> Vec<Delivery> {
        self.state.hooks.lock().unwrap().clone()
    }
}

async fn respond(s: &State, req: &HttpRequest, body: web::Bytes) -> HttpResponse {
    let path = req.path();
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return HttpResponse::Ok()
            .content_type("text/html")
            .body("<html><head><title>Slow</title></head><body>late</body></html>");
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        return HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap())
            .content_type("text/html")
            .body(format!("<html><head><title>{code}</title></head></html>"));
    }
    if let Some(port) = path.strip_prefix("/to-localhost/") {
        return HttpResponse::Found()
            .insert_header(("location", format!("http://localhost:{port}/")))
            .finish();
    }
    match path {
        "/" => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body("<html><head><title>Working</title></head><body>ok</body></html>"),
        "/page" => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(PAGE),
        "/health-toggle" => {
            if s.failing.load(Ordering::SeqCst) {
                HttpResponse::ServiceUnavailable().body("down")
            } else {
                HttpResponse::Ok()
                    .content_type("text/html")
                    .body("<title>up</title>")
            }
        }
        "/to-private" => HttpResponse::Found()
            .insert_header(("location", "http://10.0.0.1/admin"))
            .finish(),
        "/to-metadata" => HttpResponse::Found()
            .insert_header(("location", "http://169.254.169.254/latest/meta-data/"))
            .finish(),
        // 50 MiB, streamed: ten times the scrape cap.
        "/big" => {
            let chunk = web::Bytes::from(vec![b'a'; 1024 * 1024]);
            let mut first = b"<html><head><title>Big</title></head><body>".to_vec();
            first.extend_from_slice(&chunk[first.len()..]);
            let first = web::Bytes::from(first);
            let stream = futures_util::stream::iter((0..50).map(move |i| {
                Ok::<_, std::io::Error>(if i == 0 { first.clone() } else { chunk.clone() })
            }));
            HttpResponse::Ok()
                .content_type("text/html")
                .streaming(stream)
        }
        // ~60 KB of repetitive HTML: a scrape result worth compressing.
        "/compressible" => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(format!(
                "<html><head><title>Big</title></head><body>{}</body></html>",
                "<p>The quick brown fox jumps over the lazy dog.</p>".repeat(1200)
            )),
        "/hook" => {
            let headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            s.hooks.lock().unwrap().push(Delivery {
                at: Instant::now(),
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            if s.hook_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                HttpResponse::InternalServerError().finish()
            } else {
                HttpResponse::Ok().finish()
            }
        }
        _ => HttpResponse::NotFound().finish(),
    }
}

/// Allow-list entries for `ports` on 127.0.0.1 (by address only).
pub fn loopback(ports: &[u16]) -> Vec<String> {
    ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
}

/// A port nothing listens on, on every loopback address: bound (so nobody else takes it) but
/// never listening, so every connection to it is refused at once. Keep the socket alive.
pub fn dead_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A real TCP endpoint that accepts every connection, reads what it is sent, and never
/// answers. Counts connections open now and the most ever open at once.
pub struct BlackHole {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    pub max_open: Arc<AtomicUsize>,
}

pub async fn black_hole() -> BlackHole {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted, open, max_open) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (acc, op, max) = (accepted.clone(), open.clone(), max_open.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let now = op.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            let op = op.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Read until the sender gives up and closes; never write a byte.
                while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                op.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    BlackHole {
        port,
        accepted,
        open,
        max_open,
    }
}

/// A tiny OTLP/HTTP collector: accepts `POST /v1/traces` and keeps each body. Returns its
/// base URL (for `OTEL_EXPORTER_OTLP_ENDPOINT`) and the bodies received.
pub async fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Default::default();
    let keep = received.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || {
        let keep = keep.clone();
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                let keep = keep.clone();
                async move {
                    keep.lock().unwrap().push(body.to_vec());
                    // An empty ExportTraceServiceResponse: full success.
                    HttpResponse::Ok()
                        .content_type("application/x-protobuf")
                        .finish()
                }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    (format!("http://127.0.0.1:{port}"), received)
}
