//! `/metrics`: scraped after real traffic and parsed as the Prometheus text format by a
//! strict parser (`support::prometheus`, independent of the exporter), so a malformed line,
//! an untyped sample or an inconsistent histogram fails the test.
//!
//! Event counters are process-wide and the tests run in parallel in one process, so they
//! assert that a counter grew by at least what the test did; the pool and key-cache values
//! belong to one application and are asserted exactly.

use futures_util::future::join_all;
use secrecy::SecretString;
use serde_json::json;

use crate::support::keys::forge_key;
use crate::support::prometheus::{parse, scrape, scrape_url, Exposition};
use crate::support::stripe::{deliver_with, now, signature};
use crate::support::{assert_problem, spawn_app, spawn_app_with, TestApp, ADMIN_TOKEN};

#[test]
fn the_parser_rejects_what_prometheus_would() {
    let ok = parse(
        "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 3\n\
         # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n",
    );
    assert_eq!(ok.get("a_total", &[("x", "q\"\\\n")]), Some(3.0));
    for bad in [
        "a_total 1\n",                                                       // no TYPE
        "# TYPE a counter\na_total 1\n", // OpenMetrics-style counter naming
        "# TYPE a gauge\na{x=\"1} 1\n",  // unterminated label
        "# TYPE a gauge\na 1 2 3\n",     // trailing text
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", // +Inf != count
    ] {
        assert!(
            std::panic::catch_unwind(|| parse(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// A well-formed key for `key_id` with a random secret (a valid checksum, a wrong secret).
fn key_with_wrong_secret(key_id: &str) -> String {
    let other = keymeter::auth::api_key::generate().plaintext;
    let key = forge_key(key_id, &other[21..64]);
    assert!(keymeter::auth::api_key::parse(&key).is_ok());
    key
}

// ---------------------------------------------------------------------------------------
// Access.

#[tokio::test]
async fn metrics_need_the_admin_token_and_are_prometheus_text() {
    let app = spawn_app().await;
    let res = app.get("/metrics").await;
    assert_problem(res, 401, "invalid_admin_token").await;
    let res = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("not-the-admin-token")
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_admin_token").await;

    let m = scrape(&app).await;
    assert_eq!(
        m.get(
            "keymeter_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    for (family, kind) in [
        ("keymeter_http_requests_total", "counter"),
        ("keymeter_http_request_duration_seconds", "histogram"),
        ("keymeter_auth_attempts_total", "counter"),
        ("keymeter_key_cache_lookups_total", "counter"),
        ("keymeter_db_pool_connections", "gauge"),
        ("keymeter_jobs_queue_depth", "gauge"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
}

#[tokio::test]
async fn without_an_admin_token_or_a_metrics_bind_there_are_no_metrics() {
    let app = spawn_app_with(|c| c.admin_token = None).await;
    assert_problem(app.get("/metrics").await, 404, "feature_disabled").await;
}

#[tokio::test]
async fn a_metrics_bind_serves_them_apart_and_the_public_listener_does_not() {
    let mut app = spawn_app_with(|c| {
        c.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let port = app.metrics_port.expect("a metrics listener");
    assert_ne!(port, app.port);
    let res = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;

    let url = format!("http://127.0.0.1:{port}/metrics");
    let m = scrape_url(&app.client, &url, None).await;
    assert_eq!(m.get("keymeter_db_pool_max_connections", &[]), Some(8.0));
    let res = app
        .client
        .get(format!("http://127.0.0.1:{port}/v1/account"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        404,
        "the metrics listener serves nothing else"
    );

    app.stop().await;
    assert!(
        app.client.get(&url).send().await.is_err(),
        "the metrics listener stops with the application"
    );
}

// ---------------------------------------------------------------------------------------
// What is counted.

#[tokio::test]
async fn requests_are_counted_by_route_pattern_method_and_status() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 0).await;
    let key_id = &key[8..20];
    let labels = [
        ("route", "/v1/keys/{id}"),
        ("method", "GET"),
        ("status", "200"),
    ];
    let unmatched = [("route", "unmatched"), ("method", "GET"), ("status", "404")];
    let before = scrape(&app).await;
    for _ in 0..3 {
        let res = app.get_with_key(&format!("/v1/keys/{key_id}"), &key).await;
        assert_eq!(res.status(), 200);
    }
    assert_eq!(app.get("/no/such/path-1234").await.status(), 404);
    let after = scrape(&app).await;

    let grew = |name: &str, l: &[(&str, &str)]| after.sum(name, l) - before.sum(name, l);
    assert!(grew("keymeter_http_requests_total", &labels) >= 3.0);
    assert!(grew("keymeter_http_request_duration_seconds_count", &labels) >= 3.0);
    assert!(after
        .get(
            "keymeter_http_request_duration_seconds_bucket",
            &[labels[0], labels[1], labels[2], ("le", "+Inf")]
        )
        .is_some());
    assert!(grew("keymeter_http_requests_total", &unmatched) >= 1.0);
    // Raw paths never become labels.
    for s in &after.samples {
        for v in s.labels.values() {
            assert!(
                !v.contains(key_id) && !v.contains("path-1234"),
                "raw path in {s:?}"
            );
        }
    }
}

#[tokio::test]
async fn authentication_outcomes_and_key_cache_lookups_are_counted() {
    let app = spawn_app().await;
    let (_, good) = app.create_account("internal", 0).await;
    let (revoked_account, _) = app.create_account("internal", 0).await;
    let (revoked_id, revoked) = app.create_key(revoked_account, &["read"]).await;
    let res = app
        .admin_post(&format!("/admin/keys/{revoked_id}/revoke"), json!({}))
        .await;
    assert_eq!(res.status(), 200);
    let (suspended_account, suspended) = app.create_account("internal", 0).await;
    let res = app
        .admin_post(
            &format!("/admin/accounts/{suspended_account}/suspend"),
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let before = scrape(&app).await;

    assert_eq!(app.get("/v1/account").await.status(), 401);
    for (key, outcome) in [
        ("km_live_not-a-key".to_owned(), "malformed"),
        (keymeter::auth::api_key::generate().plaintext, "unknown_key"),
        (key_with_wrong_secret(&good[8..20]), "wrong_secret"),
        (revoked.clone(), "revoked"),
        (suspended.clone(), "suspended"),
    ] {
        let res = app.get_with_key("/v1/account", &key).await;
        assert_eq!(res.status(), 401, "{outcome}");
    }
    for _ in 0..2 {
        assert_eq!(app.get_with_key("/v1/account", &good).await.status(), 200);
    }
    let after = scrape(&app).await;

    for outcome in [
        "missing",
        "malformed",
        "unknown_key",
        "wrong_secret",
        "revoked",
        "suspended",
    ] {
        let l = [("outcome", outcome)];
        let grew = after.sum("keymeter_auth_attempts_total", &l)
            - before.sum("keymeter_auth_attempts_total", &l);
        assert!(grew >= 1.0, "{outcome} grew by {grew}");
    }
    let l = [("outcome", "ok")];
    assert!(
        after.sum("keymeter_auth_attempts_total", &l)
            - before.sum("keymeter_auth_attempts_total", &l)
            >= 2.0
    );
    // The cache is this application's own: exact. The good key: one miss (the wrong-secret
    // attempt loaded its id), then two hits; unknown, revoked and suspended: one miss each.
    let lookups = |m: &Exposition, r: &str| {
        m.get("keymeter_key_cache_lookups_total", &[("result", r)])
            .expect("lookup counter")
    };
    assert_eq!(lookups(&after, "hit") - lookups(&before, "hit"), 2.0);
    assert_eq!(lookups(&after, "miss") - lookups(&before, "miss"), 4.0);
}

#[tokio::test]
async fn a_429_is_counted_by_tier() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("free", 0).await;
    let labels = [("limit", "key"), ("tier", "free")];
    let before = scrape(&app).await;
    let mut refused = 0;
    for _ in 0..6 {
        if app.get_with_key("/v1/account", &key).await.status() == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "the free tier's burst is 5");
    let after = scrape(&app).await;
    let name = "keymeter_rate_limited_requests_total";
    assert!(after.sum(name, &labels) - before.sum(name, &labels) >= 1.0);
    let status = [("status", "429")];
    assert!(
        after.sum("keymeter_http_requests_total", &status)
            - before.sum("keymeter_http_requests_total", &status)
            >= 1.0
    );
}

#[tokio::test]
async fn grants_and_charges_are_counted_in_credits() {
    let app = spawn_app().await;
    let before = scrape(&app).await;
    let (_, key) = app.create_account("internal", 1000).await;
    let charge = |amount: i64| {
        app.client
            .post(app.url("/v1/credits/charge"))
            .bearer_auth(&key)
            .json(&json!({"amount": amount}))
            .send()
    };
    assert_eq!(charge(7).await.unwrap().status(), 201);
    // Concurrent charges to one account are group-committed (credits::coalesce): counted
    // there too.
    for res in join_all((0..10).map(|_| charge(3))).await {
        assert_eq!(res.unwrap().status(), 201);
    }
    let after = scrape(&app).await;
    let grew = |name: &str, kind: &str| {
        after.sum(name, &[("kind", kind)]) - before.sum(name, &[("kind", kind)])
    };
    assert!(grew("keymeter_credits_total", "grant") >= 1000.0);
    assert!(grew("keymeter_credits_total", "charge") >= 37.0);
    assert!(grew("keymeter_credit_movements_total", "charge") >= 11.0);
}

#[tokio::test]
async fn pool_gauges_are_read_at_scrape_time() {
    let app = spawn_app().await;
    let m = scrape(&app).await;
    let max = m.get("keymeter_db_pool_max_connections", &[]).unwrap();
    assert_eq!(max, 8.0, "KEYMETER_DB_POOL_SIZE of the tests");
    let size = m.get("keymeter_db_pool_connections", &[]).unwrap();
    let available = m
        .get("keymeter_db_pool_available_connections", &[])
        .unwrap();
    let waiting = m.get("keymeter_db_pool_waiting_tasks", &[]).unwrap();
    assert!((1.0..=max).contains(&size), "size {size}");
    assert!(available <= size, "available {available}");
    assert!(waiting >= 0.0);
}

/// The backlog gauges are read from the tables at each scrape: how long the oldest job a
/// worker could take has waited, and the job-webhook outbox (pending, retrying after a failure, the
/// accounts those belong to, how overdue the most overdue delivery is). Rows are written
/// straight into this test's database, since real ones take an hour of retries to get there.
#[tokio::test]
async fn backlog_gauges_read_the_queue_and_the_webhook_outbox() {
    // b's job is claimable: idle workers look at the queue only every ten minutes here (an
    // INSERT sends no wake-up), so it is still queued when the test scrapes.
    let app = spawn_app_with(|c| {
        c.jobs.poll = std::time::Duration::from_millis(600_000);
    })
    .await;
    let m = scrape(&app).await;
    for name in [
        "keymeter_jobs_oldest_claimable_age_seconds",
        "keymeter_job_webhooks_pending",
        "keymeter_job_webhooks_retrying",
        "keymeter_job_webhooks_failing_accounts",
        "keymeter_job_webhooks_overdue_seconds",
    ] {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some("gauge"),
            "{name}"
        );
        assert_eq!(m.get(name, &[]), Some(0.0), "{name} with nothing waiting");
    }

    let (a, _) = app.create_account("free", 0).await;
    let (b, _) = app.create_account("free", 0).await;
    // `free` runs 2 jobs at a time: a has two running (on long leases), so its job queued ten
    // minutes ago waits on a's own limit and does not count; b's, queued five minutes ago, is
    // the oldest a worker could take. (Timeouts long enough that the reaper leaves them.)
    let queue = "INSERT INTO jobs (id, account_id, status, mode, url, formats, timeout_ms, cost,
                                   attempts, lease_owner, lease_expires_at, created_at)
                 SELECT gen_random_uuid(), $1, s.status, 'async', 'https://example.com/',
                        '{html}', 3600000, 1, s.attempts, s.owner, s.lease,
                        now() - $2::text::interval
                   FROM (VALUES ('running', 1, gen_random_uuid(), now() + interval '1 hour'),
                                ('running', 1, gen_random_uuid(), now() + interval '1 hour'),
                                ('queued', 0, NULL::uuid, NULL::timestamptz))
                        AS s(status, attempts, owner, lease)
                  WHERE s.status = 'queued' OR $3";
    app.db
        .execute(queue, &[&a, &"10 minutes", &true])
        .await
        .unwrap();
    app.db
        .execute(queue, &[&b, &"5 minutes", &false])
        .await
        .unwrap();
    // Finished jobs with deliveries: for a, two failing and one about to be due; for b, one
    // failing, one delivered, one given up (neither of the last two counts).
    let hooks = [
        (a, "failing", "1 hour"),
        (a, "failing", "1 hour"),
        (a, "due", "1 second"),
        (b, "failing", "1 hour"),
        (b, "delivered", "1 hour"),
        (b, "failed", "1 hour"),
    ];
    let mut due = None;
    for (account, state, next) in hooks {
        let job = uuid::Uuid::new_v4();
        app.db
            .execute(
                "INSERT INTO jobs (id, account_id, status, mode, url, formats, timeout_ms, cost,
                                   webhook_url, finished_at)
                 VALUES ($1, $2, 'succeeded', 'async', 'https://example.com/', '{html}', 1000,
                         1, 'https://hooks.example.com/', now())",
                &[&job, &account],
            )
            .await
            .unwrap();
        app.db
            .execute(
                "INSERT INTO job_webhooks (job_id, account_id, url, event_id, event_type, payload,
                                           attempts, next_attempt_at, last_error,
                                           delivered_at, failed_at)
                 VALUES ($1, $2, 'https://hooks.example.com/', gen_random_uuid(), 'job.succeeded',
                         '{}', $3, now() + $4::text::interval,
                         CASE WHEN $5 IN ('failing', 'failed') THEN 'connection refused' END,
                         CASE WHEN $5 = 'delivered' THEN now() END,
                         CASE WHEN $5 = 'failed' THEN now() END)",
                &[&job, &account, &i32::from(state != "due"), &next, &state],
            )
            .await
            .unwrap();
        if state == "due" {
            due = Some(job);
        }
    }
    // Hold the due delivery's row lock, so the server's sender (which skips locked rows)
    // cannot take it, and let it become overdue.
    app.db
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM job_webhooks WHERE job_id = '{}' FOR UPDATE",
            due.unwrap()
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;

    let m = scrape(&app).await;
    app.db.batch_execute("COMMIT").await.unwrap();
    let age = m
        .get("keymeter_jobs_oldest_claimable_age_seconds", &[])
        .unwrap();
    assert!((300.0..600.0).contains(&age), "oldest claimable age {age}");
    assert_eq!(m.get("keymeter_job_webhooks_pending", &[]), Some(4.0));
    assert_eq!(m.get("keymeter_job_webhooks_retrying", &[]), Some(3.0));
    assert_eq!(
        m.get("keymeter_job_webhooks_failing_accounts", &[]),
        Some(2.0)
    );
    let overdue = m.get("keymeter_job_webhooks_overdue_seconds", &[]).unwrap();
    assert!((1.0..60.0).contains(&overdue), "overdue {overdue}");
}

const WEBHOOK_SECRET: &str = "whsec_metrics_test_0123456789";

/// A delivery signed now, correctly or (`signed: false`) with a corrupted signature.
async fn deliver(app: &TestApp, body: &[u8], signed: bool) -> reqwest::Response {
    let t = now();
    let mut sig = signature(WEBHOOK_SECRET, t, body);
    if !signed {
        sig = sig.replace(|c: char| c.is_ascii_digit(), "0");
    }
    deliver_with(app, body, Some(format!("t={t},v1={sig}"))).await
}

#[tokio::test]
async fn webhook_events_are_counted_by_type_and_outcome() {
    let app = spawn_app_with(|c| {
        c.billing.webhook_secrets = vec![SecretString::from(WEBHOOK_SECRET.to_owned())];
    })
    .await;
    let event = json!({
        "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "type": "customer.created",
        "created": 1_700_000_000,
        "data": {"object": {"id": "cus_metrics", "object": "customer"}},
    });
    let body = serde_json::to_vec(&event).unwrap();
    let before = scrape(&app).await;
    assert_eq!(deliver(&app, &body, false).await.status(), 400);
    assert_eq!(deliver(&app, &body, true).await.status(), 200);
    assert_eq!(deliver(&app, &body, true).await.status(), 200);
    let after = scrape(&app).await;
    let name = "keymeter_stripe_webhook_events_total";
    for labels in [
        [("type", "unverified"), ("outcome", "bad_signature")],
        [("type", "other"), ("outcome", "ignored")],
        [("type", "other"), ("outcome", "duplicate")],
    ] {
        assert!(
            after.sum(name, &labels) - before.sum(name, &labels) >= 1.0,
            "{labels:?}"
        );
    }
    assert_eq!(after.sum(name, &[("type", "customer.created")]), 0.0);
}
