//! Shared senders and shared CPU under attack: job webhooks to an endpoint that never answers,
//! parallel password guesses, and signup/login storms. See `tests/api/isolation.rs`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keymeter::config::Config;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::app::spawn_jobs_app;
use crate::support::prometheus::scrape;
use crate::support::upstream::{black_hole, loopback, Upstream};
use crate::support::{assert_problem, spawn_app_with, TestApp};

#[tokio::test]
async fn a_webhook_endpoint_that_never_answers_delays_only_its_own_account() {
    let site = Upstream::start().await;
    let hole = black_hole().await;
    let app = spawn_jobs_app(&loopback(&[site.port, hole.port]), |c| {
        c.jobs.poll = Duration::from_millis(100);
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
    app.wait_for_job(&key_b, &id, &["succeeded"]).await;
    let done = Instant::now();
    let arrived = loop {
        let hit = site
            .hooks()
            .iter()
            .find(|h| h.event()["data"]["id"] == id.as_str())
            .map(|h| h.at);
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

/// One counter of this app's `/metrics`.
async fn metric(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape(app).await.get(name, labels)
}

/// `keymeter_password_hash_operations_total{operation="verify"}`.
const VERIFICATIONS: (&str, &[(&str, &str)]) = (
    "keymeter_password_hash_operations_total",
    &[("operation", "verify")],
);

/// The per-IP limits of the key-less routes are another defence; these tests open them wide
/// so that what they see is the lockout and the hashing bound alone.
fn open_ip_limits(c: &mut Config) {
    c.ip_rate_per_minute = 100_000;
    c.ip_burst = 10_000;
    c.auth_failures_per_minute = 100_000;
}

#[tokio::test]
async fn concurrent_wrong_guesses_verify_at_most_five_passwords() {
    let app = spawn_app_with(|c| {
        open_ip_limits(c);
        // Room for every guess to wait for a hashing slot: only the lockout may stop them.
        c.password_hash_queue = 64;
    })
    .await;
    assert_eq!(
        app.signup("target@example.com", "the right password")
            .await
            .status(),
        201
    );
    let before = metric(&app, VERIFICATIONS.0, VERIFICATIONS.1)
        .await
        .unwrap_or(0.0);

    let guesses = (0..20).map(|i| {
        let app = &app;
        async move {
            app.login("target@example.com", &format!("wrong guess {i}"))
                .await
        }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for res in answers {
        *statuses.entry(res.status().as_u16()).or_default() += 1;
    }
    let verified = metric(&app, VERIFICATIONS.0, VERIFICATIONS.1)
        .await
        .unwrap_or(0.0)
        - before;
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
    let res = app.login("target@example.com", "the right password").await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
    assert_eq!(
        metric(&app, VERIFICATIONS.0, VERIFICATIONS.1)
            .await
            .unwrap_or(0.0)
            - before,
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
    let app = spawn_app_with(|c| {
        open_ip_limits(c);
        c.login_lockout = Duration::from_secs(8);
    })
    .await;
    // Failures for addresses that may not exist: one row each, written by anyone.
    for i in 0..3 {
        let res = app
            .login(&format!("nobody{i}@example.com"), "wrong password")
            .await;
        assert_problem(res, 401, "invalid_credentials").await;
    }
    // And one email locked by five failures.
    for _ in 0..5 {
        let _ = app.login("locked@example.com", "wrong password").await;
    }
    assert_problem(
        app.login("locked@example.com", "wrong password").await,
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
        app.login("locked@example.com", "wrong password").await,
        401,
        "invalid_credentials",
    )
    .await;
}

#[tokio::test]
async fn password_hashing_is_bounded_and_excess_attempts_are_told_to_retry() {
    let app = spawn_app_with(|c| {
        open_ip_limits(c);
        c.password_hash_concurrency = 1;
        c.password_hash_queue = 1;
    })
    .await;
    let n = 24;
    let signups = (0..n).map(|_| {
        let app = &app;
        async move {
            let email = format!("{}@example.com", Uuid::new_v4().simple());
            app.signup(&email, "a long enough password").await
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
    let hash = [("operation", "hash")];
    assert_eq!(
        metric(&app, "keymeter_password_hash_operations_total", &hash).await,
        Some(created as f64)
    );
    assert_eq!(
        metric(&app, "keymeter_password_hash_refusals_total", &hash).await,
        Some(refused as f64)
    );

    // Logins share the bound: a storm of them is refused the same way, never a 500.
    let logins = (0..n).map(|i| {
        let app = &app;
        async move {
            app.login(&format!("storm{i}@example.com"), "a wrong password")
                .await
        }
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
