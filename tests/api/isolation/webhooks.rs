//! Shared senders and shared CPU under attack: job webhooks to an endpoint that never answers,
//! parallel password guesses, and signup/login storms. See `tests/api/isolation.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::helpers::*;

/// A local site: `/page` is a small page to scrape, `POST /hook` records a webhook delivery
/// (its event id) when it arrives.
struct Receiver {
    base: String,
    port: u16,
    arrivals: Arc<Mutex<Vec<(Instant, String)>>>,
}

async fn receiver() -> Receiver {
    let arrivals: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let a = arrivals.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(move || {
        let a = a.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let a = a.clone();
            async move {
                match req.path() {
                    "/page" => HttpResponse::Ok()
                        .content_type("text/html")
                        .body("<html><head><title>ok</title></head><body>ok</body></html>"),
                    "/hook" => {
                        let event: Value = serde_json::from_slice(&body).unwrap_or_default();
                        let job = event["data"]["id"].as_str().unwrap_or("").to_owned();
                        a.lock().unwrap().push((Instant::now(), job));
                        HttpResponse::Ok().finish()
                    }
                    _ => HttpResponse::NotFound().finish(),
                }
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    Receiver {
        base: format!("http://127.0.0.1:{port}"),
        port,
        arrivals,
    }
}

/// A real TCP endpoint that accepts every connection, reads what it is sent, and never
/// answers. Counts connections open now and the most ever open at once.
struct BlackHole {
    port: u16,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
}

async fn black_hole() -> BlackHole {
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

fn allow(env: &mut HashMap<String, String>, ports: &[u16]) {
    let list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    env.insert("KEYMETER_SCRAPE_ALLOW".into(), list.join(","));
}

async fn finished(app: &TestApp, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value = app
            .get_with_key(&format!("/v1/jobs/{id}"), key)
            .await
            .json()
            .await
            .unwrap();
        if job["status"] == "succeeded" {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never finished: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_webhook_endpoint_that_never_answers_delays_only_its_own_account() {
    let site = receiver().await;
    let hole = black_hole().await;
    let ports = [site.port, hole.port];
    let app = spawn_app_with(move |env| {
        allow(env, &ports);
        env.insert("KEYMETER_JOB_WORKERS".into(), "4".into());
        env.insert("KEYMETER_JOB_POLL_MS".into(), "100".into());
    })
    .await;
    let (a, key_a) = app.create_account("internal", 10_000).await;
    let (_, key_b) = app.create_account("pro", 100).await;

    // Account A: 50 jobs whose webhooks go to an endpoint that accepts and never answers.
    for _ in 0..50 {
        let res = app
            .post_json(
                "/v1/jobs",
                &key_a,
                json!({"url": format!("{}/page", site.base),
                       "webhook_url": format!("http://127.0.0.1:{}/hook", hole.port)}),
            )
            .await;
        assert_eq!(res.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let queued: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM job_webhooks WHERE account_id = $1",
                &[&a],
            )
            .await
            .unwrap()
            .get(0);
        // All of A's deliveries exist, and the black hole is holding some of them.
        if queued == 50 && hole.open.load(Ordering::SeqCst) >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's deliveries never started: {queued} queued, {} connections held",
            hole.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Account B: one job, its webhook at a receiver that answers at once.
    let res = app
        .post_json(
            "/v1/jobs",
            &key_b,
            json!({"url": format!("{}/page", site.base),
                   "webhook_url": format!("{}/hook", site.base)}),
        )
        .await;
    assert_eq!(res.status(), 202);
    let job: Value = res.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    finished(&app, &key_b, &id).await;
    let done = Instant::now();
    let arrived = loop {
        let hit = site
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .find(|(_, job)| *job == id)
            .map(|(at, _)| *at);
        if let Some(at) = hit {
            break at;
        }
        assert!(
            done.elapsed() < Duration::from_secs(2),
            "B's webhook did not arrive within 2 s of its job finishing, while A's endpoint held {} deliveries",
            hole.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(arrived.saturating_duration_since(done) < Duration::from_secs(2));

    // A's dead endpoint never got more than the per-destination bound (8 by default) at once,
    // and A's deliveries are still pending, not lost.
    assert!(
        hole.max_open.load(Ordering::SeqCst) <= 8,
        "{} deliveries in flight at once to one destination",
        hole.max_open.load(Ordering::SeqCst)
    );
    assert!(hole.accepted.load(Ordering::SeqCst) >= 4);
    let pending: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM job_webhooks
              WHERE account_id = $1 AND delivered_at IS NULL AND failed_at IS NULL",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 50);
}

async fn signup(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/signup"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/login"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// One sample of this app's `/metrics` (the line `name{labels} value`, labels as written).
async fn metric(app: &TestApp, series: &str) -> Option<f64> {
    let res = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .and_then(|(_, v)| v.parse().ok())
}

const VERIFICATIONS: &str = r#"keymeter_password_hash_operations_total{operation="verify"}"#;

/// The per-IP limits of the key-less routes are another defence; these tests open them wide
/// so that what they see is the lockout and the hashing bound alone.
fn open_ip_limits(env: &mut HashMap<String, String>) {
    env.insert("KEYMETER_IP_RATE_PER_MINUTE".into(), "100000".into());
    env.insert("KEYMETER_IP_BURST".into(), "10000".into());
    env.insert("KEYMETER_AUTH_FAILURES_PER_MINUTE".into(), "100000".into());
}

#[tokio::test]
async fn concurrent_wrong_guesses_verify_at_most_five_passwords() {
    let app = spawn_app_with(|env| {
        open_ip_limits(env);
        // Room for every guess to wait for a hashing slot: only the lockout may stop them.
        env.insert("KEYMETER_PASSWORD_HASH_QUEUE".into(), "64".into());
    })
    .await;
    assert_eq!(
        signup(&app, "target@example.com", "the right password")
            .await
            .status(),
        201
    );
    let before = metric(&app, VERIFICATIONS).await.unwrap_or(0.0);

    let guesses = (0..20).map(|i| {
        let app = &app;
        async move { login(app, "target@example.com", &format!("wrong guess {i}")).await }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for res in answers {
        *statuses.entry(res.status().as_u16()).or_default() += 1;
    }
    let verified = metric(&app, VERIFICATIONS).await.unwrap_or(0.0) - before;
    assert!(
        verified <= 5.0,
        "{verified} passwords were verified for 20 parallel guesses ({statuses:?})"
    );
    assert!(
        verified >= 1.0,
        "no guess was checked at all ({statuses:?})"
    );
    assert!(
        statuses.keys().all(|s| *s == 401 || *s == 429),
        "only 401s and 429s: {statuses:?}"
    );
    assert!(
        statuses.get(&401).copied().unwrap_or(0) <= 5,
        "{statuses:?}"
    );
    // The email is locked now, even for the right password, and without a check.
    let res = login(&app, "target@example.com", "the right password").await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
    assert_eq!(
        metric(&app, VERIFICATIONS).await.unwrap_or(0.0) - before,
        verified
    );
}

async fn rows(app: &TestApp) -> i64 {
    app.db
        .query_one("SELECT count(*) FROM login_failures", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn login_failures_are_purged_when_their_window_ends() {
    let app = spawn_app_with(|env| {
        open_ip_limits(env);
        env.insert("KEYMETER_LOGIN_LOCKOUT_SECS".into(), "8".into());
    })
    .await;
    // Failures for addresses that may not exist: one row each, written by anyone.
    for i in 0..3 {
        let res = login(&app, &format!("nobody{i}@example.com"), "wrong password").await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
    // And one email locked by five failures.
    for _ in 0..5 {
        let _ = login(&app, "locked@example.com", "wrong password").await;
    }
    assert_problem(
        login(&app, "locked@example.com", "wrong password").await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(
        rows(&app).await,
        4,
        "each failing email has its row while its window runs"
    );
    // The window is 8 s and the lock another 8 s at most: soon after, nothing is left.
    let deadline = Instant::now() + Duration::from_secs(40);
    while rows(&app).await > 0 {
        assert!(
            Instant::now() < deadline,
            "{} login_failures rows outlived their windows",
            rows(&app).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A purged email starts afresh: one more failure is a 401, not a lock.
    assert_problem(
        login(&app, "locked@example.com", "wrong password").await,
        401,
        "invalid_credentials",
    )
    .await;
}

#[tokio::test]
async fn password_hashing_is_bounded_and_excess_attempts_are_told_to_retry() {
    let app = spawn_app_with(|env| {
        open_ip_limits(env);
        env.insert("KEYMETER_PASSWORD_HASH_CONCURRENCY".into(), "1".into());
        env.insert("KEYMETER_PASSWORD_HASH_QUEUE".into(), "1".into());
    })
    .await;
    let n = 24;
    let signups = (0..n).map(|_| {
        let app = &app;
        async move {
            let email = format!("{}@example.com", Uuid::new_v4().simple());
            signup(app, &email, "a long enough password").await
        }
    });
    let answers = futures_util::future::join_all(signups).await;
    let (mut created, mut refused) = (0, 0);
    for res in answers {
        match res.status().as_u16() {
            201 => created += 1,
            503 => {
                let retry: u64 = res.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1);
                assert_problem(res, 503, "password_hashing_busy").await;
                refused += 1;
            }
            other => panic!("a signup answered {other}: {}", res.text().await.unwrap()),
        }
    }
    assert!(created >= 1, "some signups got through");
    assert!(
        refused >= 1,
        "{n} parallel signups with one hashing slot and a line of one: none was refused"
    );
    // Refused signups created nothing; the counters match what the clients saw.
    let accounts: i64 = app
        .db
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(accounts, created);
    let hashes = r#"keymeter_password_hash_operations_total{operation="hash"}"#;
    let refusals = r#"keymeter_password_hash_refusals_total{operation="hash"}"#;
    assert_eq!(metric(&app, hashes).await, Some(created as f64));
    assert_eq!(metric(&app, refusals).await, Some(refused as f64));

    // Logins share the bound: a storm of them is refused the same way, never a 500.
    let logins = (0..n).map(|i| {
        let app = &app;
        async move { login(app, &format!("storm{i}@example.com"), "a wrong password").await }
    });
    let mut busy = 0;
    for res in futures_util::future::join_all(logins).await {
        match res.status().as_u16() {
            401 => {}
            503 => {
                assert!(res.headers().contains_key("retry-after"));
                assert_problem(res, 503, "password_hashing_busy").await;
                busy += 1;
            }
            other => panic!("a login answered {other}"),
        }
    }
    assert!(busy >= 1, "no login was refused");
    // A refused login was not counted against its email.
    let counted: i64 = app
        .db
        .query_one("SELECT count(*) FROM login_failures", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(counted, n as i64 - busy);
}
