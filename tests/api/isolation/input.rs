//! No client input reaches a 500, and the smaller fences: idempotency claims that cannot be
//! charged twice, and the public development webhook key kept off public addresses.
//! See `tests/api/isolation.rs`.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};
use uuid::Uuid;

use secrecy::SecretString;

use crate::support::db::{assert_ledger_invariant, balance, database_url};
use crate::support::process::{keymeter, run_to_end};
use crate::support::stripe::signature_header;
use crate::support::{assert_problem, spawn_app, spawn_app_on, spawn_app_with, TestApp};

async fn get(app: &TestApp, key: &str, path: &str, query: &[(&str, String)]) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(key)
        .query(query)
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn out_of_range_dates_are_refused_with_422_naming_the_parameter() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 100).await;
    for (path, field, value) in [
        // chrono reads these years, but `to - 30 days` overflows it: a panic, a 500.
        ("/v1/usage", "to", "-262143-01-01"),
        ("/v1/usage", "from", "-262143-01-01"),
        // Inside chrono's range, outside PostgreSQL's: "timestamp out of range", a 500.
        ("/v1/usage", "from", "-5000-01-01"),
        ("/v1/credits/ledger", "from", "-5000-01-01"),
        ("/v1/credits/ledger", "to", "-5000-01-01T00:00:00Z"),
        // Past the years a date can be written in (0000–9999), either way.
        ("/v1/credits/ledger", "to", "+10000-01-01"),
        ("/v1/credits/ledger", "from", "262142-12-31"),
        ("/v1/usage", "to", "+262142-12-31"),
        // In range as written, out of it in UTC.
        ("/v1/credits/ledger", "from", "0000-01-01T00:00:00+00:01"),
    ] {
        let p = assert_problem(
            get(&app, &key, path, &[(field, value.to_owned())]).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(p["field"], field, "{path}?{field}={value}: {p}");
    }
    // The edges themselves are fine, and so is the arithmetic the routes do near them.
    for (path, query) in [
        (
            "/v1/credits/ledger",
            vec![
                ("from", "0000-01-01"),
                ("to", "9999-12-31T23:59:59.999999Z"),
            ],
        ),
        ("/v1/usage", vec![("to", "0000-01-05")]),
        (
            "/v1/usage",
            vec![("from", "9999-12-01"), ("to", "9999-12-31")],
        ),
    ] {
        let query: Vec<(&str, String)> = query.into_iter().map(|(k, v)| (k, v.into())).collect();
        let res = get(&app, &key, path, &query).await;
        assert_eq!(
            res.status(),
            200,
            "{path} {query:?}: {}",
            res.text().await.unwrap()
        );
    }
}

#[tokio::test]
async fn out_of_range_cursors_are_refused_with_422() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 100).await;
    let job = Uuid::now_v7();
    for (path, cursor) in [
        // Year −7537: chrono can hold it, PostgreSQL cannot (a 500 before).
        ("/v1/keys", "-300000000000000000_abcdefghijkl".to_owned()),
        ("/v1/jobs", format!("-300000000000000000_{job}")),
        ("/v1/credits/ledger", "-300000000000000000_5".to_owned()),
        // Beyond chrono, beyond i64, and far in the future.
        ("/v1/keys", "-9223372036854775808_abcdefghijkl".to_owned()),
        ("/v1/jobs", format!("99999999999999999999_{job}")),
        ("/v1/keys", "8000000000000000000_abcdefghijkl".to_owned()),
    ] {
        let p = assert_problem(
            get(&app, &key, path, &[("cursor", cursor.clone())]).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(p["field"], "cursor", "{path}?cursor={cursor}: {p}");
    }
    // A cursor this API could have returned still pages; one of another shape is still 400.
    let now = chrono::Utc::now().timestamp_micros();
    for (path, cursor) in [
        ("/v1/keys", format!("{now}_abcdefghijkl")),
        ("/v1/jobs", format!("{now}_{job}")),
        ("/v1/credits/ledger", format!("{now}_5")),
    ] {
        let res = get(&app, &key, path, &[("cursor", cursor.clone())]).await;
        assert_eq!(res.status(), 200, "{path}?cursor={cursor}");
    }
    assert_problem(
        get(&app, &key, "/v1/keys", &[("cursor", "garbage".into())]).await,
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn an_overflowing_stripe_signature_timestamp_is_a_400() {
    const SECRET: &str = "whsec_test_input_0123456789";
    let app = spawn_app_with(|c| {
        c.billing.webhook_secrets = vec![SecretString::from(SECRET.to_owned())];
    })
    .await;
    let body = serde_json::to_vec(&json!({
        "id": "evt_overflow", "object": "event", "type": "checkout.session.completed",
        "created": 0, "data": {"object": {}}
    }))
    .unwrap();
    for t in [i64::MIN, i64::MIN + 1, i64::MAX] {
        // Correctly signed for its (absurd) time: only the time can refuse it.
        let header = signature_header(SECRET, t, &body);
        let res = app
            .client
            .post(app.url("/v1/billing/webhook"))
            .header("content-type", "application/json")
            .header("Stripe-Signature", header)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_problem(res, 400, "invalid_signature").await;
    }
    let written: i64 = app
        .db
        .query_one("SELECT count(*) FROM stripe_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0, "nothing is written for a refused delivery");
}

// ---------------------------------------------------------------------------------------
// The property: whatever a client puts in a list route's query string, the answer is never
// a 5xx (and every refusal is a problem document).

/// Years around every edge that matters (0000/9999, chrono's ±262143, PostgreSQL's 4713 BC
/// and 294276 AD), the stretch chrono can hold and PostgreSQL cannot, and anywhere between.
fn year() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => -10i64..10_000,
        2 => -262_143i64..-4713,
        1 => -400_000i64..400_000,
        1 => prop::sample::select(vec![
            i64::from(i32::MIN),
            -262_144,
            -262_143,
            -4714,
            -4713,
            -1,
            0,
            9999,
            10_000,
            262_142,
            262_143,
            294_276,
            294_277,
            i64::from(i32::MAX),
        ]),
    ]
}

fn date() -> impl Strategy<Value = String> {
    (
        year(),
        prop_oneof![4 => 1u32..=12, 1 => 0u32..=13],
        prop_oneof![4 => 1u32..=28, 1 => 0u32..=32],
        any::<bool>(),
    )
        .prop_map(|(y, m, d, plus)| {
            let sign = if y < 0 {
                "-"
            } else if plus {
                "+"
            } else {
                ""
            };
            format!("{sign}{:04}-{m:02}-{d:02}", y.unsigned_abs())
        })
}

fn time_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => date(),
        2 => (
            date(),
            0u32..25,
            0u32..61,
            0u32..61,
            prop::sample::select(vec![
                "Z", "+00:00", "+23:59", "-23:59", "+24:00", ".999999999Z", "z", ""
            ]),
        )
            .prop_map(|(d, h, mi, s, off)| format!("{d}T{h:02}:{mi:02}:{s:02}{off}")),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => "(?s).{0,24}",
    ]
}

/// Micros (any `i64`; the stretch chrono can hold and PostgreSQL cannot; in range; past
/// `i64`; not a number) and ids (a UUID, a ledger id, a key id, garbage) in the cursor's
/// shape, and base64-ish or arbitrary text.
fn cursor() -> impl Strategy<Value = String> {
    let micros = prop_oneof![
        2 => any::<i64>().prop_map(|n| n.to_string()),
        2 => (-8_000_000_000_000_000_000i64..-150_000_000_000_000_000).prop_map(|n| n.to_string()),
        2 => (-62_167_219_200_000_000i64..=253_402_300_799_999_999).prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec![i64::MIN, i64::MAX, 0, -1]).prop_map(|n| n.to_string()),
        1 => "-?[0-9]{17,25}",
        1 => "[0-9a-zA-Z+/=-]{0,12}",
    ];
    let id = prop_oneof![
        2 => any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        2 => "[A-Za-z0-9]{12}",
        1 => "[A-Za-z0-9-]{0,70}",
        1 => "(?s).{0,8}",
    ];
    prop_oneof![
        4 => (micros, id).prop_map(|(m, i)| format!("{m}_{i}")),
        1 => "[A-Za-z0-9+/=_-]{0,40}",
        1 => "(?s).{0,24}",
    ]
}

fn limit() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1i64..=100).prop_map(|n| n.to_string()),
        1 => (-5i64..200).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => "-?[0-9]{19,30}",
        1 => prop::sample::select(vec!["", " 5", "1.5", "1e3", "0x10", "+7"]).prop_map(String::from),
        1 => "(?s).{0,8}",
    ]
}

/// Mostly a value the route accepts, so the other parameters get past it.
fn one_of_or_garbage(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(valid.to_vec()).prop_map(String::from),
        1 => "(?s).{0,12}",
    ]
}

#[derive(Debug, Clone)]
struct ListQuery {
    limit: Option<String>,
    cursor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    kind: Option<String>,
    status: Option<String>,
    granularity: Option<String>,
}

fn list_query() -> impl Strategy<Value = ListQuery> {
    use prop::option::{of, weighted};
    (
        of(limit()),
        weighted(0.7, cursor()),
        weighted(0.7, time_value()),
        weighted(0.7, time_value()),
        of(one_of_or_garbage(&[
            "grant",
            "purchase",
            "charge",
            "refund",
            "adjustment",
            "clawback",
        ])),
        of(one_of_or_garbage(&[
            "queued",
            "running",
            "succeeded",
            "failed",
            "cancelled",
        ])),
        of(one_of_or_garbage(&["day", "hour"])),
    )
        .prop_map(
            |(limit, cursor, from, to, kind, status, granularity)| ListQuery {
                limit,
                cursor,
                from,
                to,
                kind,
                status,
                granularity,
            },
        )
}

/// Every list route with the parameters it takes.
fn requests(q: &ListQuery) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let pick = |names: &[&'static str]| -> Vec<(&'static str, String)> {
        names
            .iter()
            .filter_map(|n| {
                let v = match *n {
                    "limit" => &q.limit,
                    "cursor" => &q.cursor,
                    "from" => &q.from,
                    "to" => &q.to,
                    "kind" => &q.kind,
                    "status" => &q.status,
                    _ => &q.granularity,
                };
                v.clone().map(|v| (*n, v))
            })
            .collect()
    };
    vec![
        ("/v1/keys", pick(&["limit", "cursor"])),
        ("/v1/jobs", pick(&["limit", "cursor", "status"])),
        (
            "/v1/credits/ledger",
            pick(&["limit", "cursor", "kind", "from", "to"]),
        ),
        ("/v1/usage", pick(&["from", "to", "granularity"])),
    ]
}

async fn check_list_query(app: &TestApp, key: &str, q: ListQuery) -> Result<(), TestCaseError> {
    for (path, query) in requests(&q) {
        let res = get(app, key, path, &query).await;
        let status = res.status();
        let problem = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/problem+json"));
        let body = res.text().await.unwrap_or_default();
        if status.is_server_error() {
            return Err(TestCaseError::fail(format!(
                "{path} {query:?} → {status}: {body}"
            )));
        }
        if !status.is_success() && !problem {
            return Err(TestCaseError::fail(format!(
                "{path} {query:?} → {status} without a problem document: {body}"
            )));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_list_query_reaches_a_5xx() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 1_000).await;
    // Something in every list, so the queries have rows to page through.
    for _ in 0..3 {
        app.create_key(account, &["read"]).await;
        let res = app
            .post_json("/v1/credits/charge", &key, json!({"amount": 1}))
            .await;
        assert_eq!(res.status(), 201);
    }
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let handle = tokio::runtime::Handle::current();
    // The runner is synchronous; each case blocks on its requests (the app runs on the other
    // worker threads). A failure reports the smallest query string that still fails.
    let outcome = tokio::task::block_in_place(|| {
        runner
            .run(&list_query(), |q| {
                handle.block_on(check_list_query(&app, &key, q))
            })
            .map_err(|e| e.to_string())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// Idempotency: a claim is the request's only while it holds it.

async fn charge_with_key(app: &TestApp, key: &str, idem: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/credits/charge"))
        .bearer_auth(key)
        .header("Idempotency-Key", idem)
        .json(&json!({"amount": 10, "reason": "slow"}))
        .send()
        .await
        .expect("request sent")
}

/// Two instances on one database, as during a rolling change of the request timeout: A
/// (timeout 60 s, so its claims count as abandoned after 72 s) takes a first attempt that the
/// test slows down by holding the account's row lock from its own connection, so the charge
/// waits. B (timeout 3 s: abandoned after 4 s) gets the retry; once the first attempt's claim
/// is older than that, B takes the key over and its charge queues behind the same lock. Then
/// the lock goes: the first attempt's charge runs first, and must not commit — only the
/// retry, which holds the claim, may charge.
#[tokio::test]
async fn a_slow_first_attempt_and_its_retry_never_both_charge() {
    let a = spawn_app_with(|c| {
        c.request_timeout = Duration::from_secs(60);
        // The first attempt's charge waits on the lock for seconds: the statement timeout
        // must not end it first (then it would simply fail, and prove nothing).
        c.database.statement_timeout = Duration::from_secs(60);
    })
    .await;
    let b = spawn_app_on(a.db_name.clone(), |c| {
        c.request_timeout = Duration::from_secs(3);
    })
    .await;
    let (account, key) = a.create_account("internal", 100).await;
    let idem = "slow-first-attempt";

    let (mut locker, conn) =
        tokio_postgres::connect(&database_url(&a.db_name), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let lock = locker.transaction().await.unwrap();
    // The lock an UPDATE of the balance takes, which waits for it; not FOR UPDATE, which would
    // also hold up the key-share lock the idempotency record's foreign key takes, and so the
    // claim itself.
    lock.query(
        "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        &[&account],
    )
    .await
    .unwrap();

    let first = {
        let (client, url, key) = (a.client.clone(), a.url("/v1/credits/charge"), key.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", idem)
                .json(&json!({"amount": 10, "reason": "slow"}))
                .send()
                .await
                .expect("first attempt sent")
        })
    };
    // The first attempt holds the claim and waits on the row lock.
    let claimed_at = wait_for(Duration::from_secs(20), || async {
        let waiting: i64 =
            a.db.query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE '%UPDATE accounts%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let claim =
            a.db.query_opt(
                "SELECT claimed_at FROM idempotency_keys WHERE account_id = $1 AND key = $2",
                &[&account, &idem],
            )
            .await
            .unwrap();
        claim
            .filter(|_| waiting == 1)
            .map(|r| r.get::<_, chrono::DateTime<chrono::Utc>>(0))
    })
    .await
    .expect("the first attempt claimed the key and waits for the account's row lock");

    // The retry, on B: refused while the claim is fresh, it takes over once B counts the
    // claim abandoned — and then waits for the lock too.
    let deadline = Instant::now() + Duration::from_secs(20);
    let retry = loop {
        let (client, url, key) = (b.client.clone(), b.url("/v1/credits/charge"), key.clone());
        let attempt = tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .header("Idempotency-Key", idem)
                .json(&json!({"amount": 10, "reason": "slow"}))
                .send()
                .await
                .expect("retry sent")
        });
        // Taken over (the claim is renewed, and the retry waits for the lock), or answered.
        let taken_over = wait_for(Duration::from_secs(10), || async {
            let now: chrono::DateTime<chrono::Utc> =
                a.db.query_one(
                    "SELECT claimed_at FROM idempotency_keys WHERE account_id = $1 AND key = $2",
                    &[&account, &idem],
                )
                .await
                .unwrap()
                .get(0);
            if now != claimed_at {
                Some(true)
            } else {
                attempt.is_finished().then_some(false)
            }
        })
        .await;
        if taken_over == Some(true) {
            break attempt;
        }
        let res = attempt.await.unwrap();
        assert_problem(res, 409, "idempotency_conflict").await;
        assert!(
            Instant::now() < deadline,
            "the retry never took over the claim of a first attempt that outlived the window"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // Let both charges run.
    lock.commit().await.unwrap();
    let first = first.await.unwrap();
    let retry = retry.await.unwrap();
    let first_status = first.status().as_u16();
    let first_body: Value = first.json().await.unwrap();
    let retry_status = retry.status().as_u16();
    let retry_body: Value = retry.json().await.unwrap();

    let after = balance(&a, account).await;
    assert_eq!(
        (after.credits, after.charges),
        (90, 1),
        "charged once; first attempt {first_status} {first_body}, retry {retry_status} {retry_body}"
    );
    assert_ledger_invariant(&a).await;
    assert_eq!(retry_status, 201, "the retry holds the claim: {retry_body}");
    assert_eq!(first_status, 409, "the first attempt lost it: {first_body}");
    assert_eq!(first_body["type"], "idempotency_conflict");

    // The stored answer is the retry's, whichever instance replays it.
    for app in [&a, &b] {
        let res = charge_with_key(app, &key, idem).await;
        assert_eq!(res.status(), 201);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["id"], retry_body["id"]);
    }
    drop(b);
}

/// Polls `probe` until it yields something, or `limit` passes.
async fn wait_for<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The development webhook signing key.

#[test]
fn the_development_webhook_key_is_refused_on_a_public_bind() {
    for (bind, key) in [
        ("0.0.0.0:0", None),
        ("[::]:0", None),
        (
            "0.0.0.0:0",
            Some("keymeter-development-webhook-signing-key"),
        ),
    ] {
        let mut c = keymeter();
        // Unreachable on purpose: if the key were accepted, start-up would fail later, and
        // differently (retrying, then exit 1), instead of touching a real database.
        c.arg("serve")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
            .env("KEYMETER_DB_STARTUP_RETRY_SECS", "1")
            .env("KEYMETER_BIND", bind);
        if let Some(k) = key {
            c.env("KEYMETER_WEBHOOK_SIGNING_KEY", k);
        }
        let (code, _out, err) = run_to_end(c, Duration::from_secs(20));
        assert_eq!(code, 2, "{bind} {key:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("KEYMETER_WEBHOOK_SIGNING_KEY"), "{err}");
        assert!(
            !err.contains("keymeter-development-webhook-signing-key"),
            "{err}"
        );
    }
    // On loopback, or with a key of its own, the same start-up gets past the configuration
    // (and fails only on the unreachable database).
    for (bind, key) in [
        ("127.0.0.1:0", None),
        ("0.0.0.0:0", Some("an-operator-chosen-key-0123456789abcdef")),
    ] {
        let mut c = keymeter();
        c.arg("serve")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
            .env("KEYMETER_DB_STARTUP_RETRY_SECS", "1")
            .env("KEYMETER_BIND", bind);
        if let Some(k) = key {
            c.env("KEYMETER_WEBHOOK_SIGNING_KEY", k);
        }
        let (code, _out, err) = run_to_end(c, Duration::from_secs(20));
        assert_ne!(code, 2, "{bind} {key:?}: {err}");
        assert!(!err.contains("KEYMETER_WEBHOOK_SIGNING_KEY"), "{err}");
    }
}
