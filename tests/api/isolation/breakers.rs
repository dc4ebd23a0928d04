//! Circuit breakers under attack (see `tests/api/isolation.rs`): a customer chooses the URLs,
//! the timeouts and how many jobs to send, and none of that may pause a site — or the egress
//! path — for another account. Plus two smaller fences met on the way: an SSRF refusal does not
//! reveal where a name points, and a free format (price 0) works.
//!
//! Sites are real local servers (`support::upstream`): a working one (pages, slow pages,
//! failing statuses, a redirect to a name), and "dead ports" — ports held by a bound socket
//! that never listens, so a connection is refused at once. Loopback addresses are reached
//! through the scrape allow-list, exactly as tests do everywhere else.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::app::{spawn_jobs_app, tiers_file};
use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::prometheus::metrics_text;
use crate::support::upstream::{dead_port, loopback, Upstream};
use crate::support::{assert_problem, TestApp};

async fn admin_breakers(app: &TestApp) -> Value {
    app.admin_get("/admin/breakers").await.json().await.unwrap()
}

/// Shared (every-account) origin breakers that are not closed, by name.
fn shared_open(report: &Value) -> Vec<String> {
    report["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "host" && b["scope"] != "account")
        .map(|b| b["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn one_account_cannot_open_a_breaker_for_another() {
    let up = Upstream::start().await;
    let (_held, dead) = dead_port();
    let app = spawn_jobs_app(&loopback(&[up.port, dead]), |c| {
        c.jobs.breaker_failures = 3;
        c.jobs.breaker_open = Duration::from_secs(60);
        c.jobs.breaker_timeout_floor = Duration::from_millis(300);
    })
    .await;
    let (_, attacker) = app.create_account("pro", 100).await;
    let (victim_account, victim) = app.create_account("pro", 100).await;
    let dead_url = format!("http://127.0.0.1:{dead}/");

    // The attacker's jobs to a dead port on the victim's host: refunded failures, until the
    // attacker's own breaker for that origin refuses the attacker.
    for _ in 0..3 {
        let res = app.scrape(&attacker, json!({"url": dead_url})).await;
        assert_problem(res, 502, "upstream_failed").await;
    }
    let res = app.scrape(&attacker, json!({"url": dead_url})).await;
    assert!(res.headers().get("retry-after").is_some());
    let p = assert_problem(res, 503, "upstream_unavailable").await;
    assert_eq!(p["breaker"], "host", "{p}");
    // The victim's jobs to the working port of the same host still run and are charged.
    let res = app
        .scrape(&victim, json!({"url": format!("{}/", up.base)}))
        .await;
    assert_eq!(res.status(), 200, "refused for another account's dead port");
    assert_eq!(p["scope"], "account", "{p}");

    // And jobs that really time out on the working origin (a slow page, a fair budget):
    // they count against that origin — for the attacker only.
    for _ in 0..3 {
        let res = app
            .scrape(
                &attacker,
                json!({"url": format!("{}/slow/5000", up.base), "timeout_ms": 1500}),
            )
            .await;
        assert_problem(res, 504, "job_timeout").await;
    }
    let res = app
        .scrape(&attacker, json!({"url": format!("{}/", up.base)}))
        .await;
    let p = assert_problem(res, 503, "upstream_unavailable").await;
    assert_eq!(p["scope"], "account", "{p}");

    // The victim's jobs to that origin still run and are charged…
    for _ in 0..3 {
        let res = app
            .scrape(&victim, json!({"url": format!("{}/", up.base)}))
            .await;
        assert_eq!(res.status(), 200);
        let job: Value = res.json().await.unwrap();
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // …and even to the dead port its jobs are tried (and fail on their own), not refused.
    let res = app.scrape(&victim, json!({"url": dead_url})).await;
    assert_problem(res, 502, "upstream_failed").await;

    // No shared breaker opened, the egress provider's included.
    let report = admin_breakers(&app).await;
    assert!(shared_open(&report).is_empty(), "{report}");
    assert_eq!(report["data"][0]["kind"], "provider");
    assert_eq!(report["data"][0]["state"], "closed", "{report}");
    let own: Vec<&Value> = report["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["scope"] == "account")
        .collect();
    assert_eq!(own.len(), 2, "the attacker's two origins: {report}");
    assert!(own
        .iter()
        .all(|b| b["account_id"] != victim_account.to_string()));
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_short_customer_timeout_does_not_count_against_the_site() {
    let up = Upstream::start().await;
    // Even with one account enough to open the shared breaker, the default floor (5 s) keeps
    // a customer's own 200 ms timeouts from counting at all.
    let app = spawn_jobs_app(&loopback(&[up.port]), |c| {
        c.jobs.breaker_failures = 3;
        c.jobs.breaker_open = Duration::from_secs(60);
        c.jobs.breaker_min_accounts = 1;
    })
    .await;
    let (_, customer) = app.create_account("pro", 100).await;
    let (_, other) = app.create_account("pro", 100).await;
    for _ in 0..5 {
        let res = app
            .scrape(
                &customer,
                json!({"url": format!("{}/slow/2000", up.base), "timeout_ms": 200}),
            )
            .await;
        assert_problem(res, 504, "job_timeout").await;
    }
    for key in [&customer, &other] {
        let res = app
            .scrape(key, json!({"url": format!("{}/", up.base)}))
            .await;
        assert_eq!(res.status(), 200, "the site was not held responsible");
    }
    let report = admin_breakers(&app).await;
    assert!(shared_open(&report).is_empty(), "{report}");
    assert_eq!(report["tracked_hosts"], 0, "{report}");
}

#[tokio::test]
async fn a_site_down_for_everyone_still_opens_its_breaker() {
    let up = Upstream::start().await;
    let app = spawn_jobs_app(&loopback(&[up.port]), |c| {
        c.jobs.breaker_failures = 3;
        c.jobs.breaker_open = Duration::from_secs(60);
    })
    .await;
    let origin = format!("http://127.0.0.1:{}", up.port);
    // Three customers (the default KEYMETER_BREAKER_MIN_ACCOUNTS), one failing job each:
    // that is enough, with no more failures needed.
    for _ in 0..3 {
        let (_, key) = app.create_account("pro", 100).await;
        let res = app
            .scrape(&key, json!({"url": format!("{origin}/status/503")}))
            .await;
        assert_problem(res, 502, "upstream_failed").await;
    }
    // A fourth customer, who never failed, is answered at once for any page of that origin.
    let (account, fourth) = app.create_account("pro", 100).await;
    for path in ["/status/503", "/"] {
        let res = app
            .scrape(&fourth, json!({"url": format!("{origin}{path}")}))
            .await;
        assert!(res.headers().get("retry-after").is_some());
        let p = assert_problem(res, 503, "upstream_unavailable").await;
        assert_eq!(p["breaker"], "host", "{p}");
        assert_eq!(p["scope"], "shared", "{p}");
    }
    assert_eq!(
        balance(&app, account).await.credits,
        100,
        "refused before any charge"
    );
    // Operators see it by origin, in the admin report and in Prometheus.
    let report = admin_breakers(&app).await;
    assert_eq!(shared_open(&report), vec![origin.clone()], "{report}");
    let text = metrics_text(&app).await;
    let series = format!("keymeter_breaker_state{{kind=\"host\",name=\"{origin}\"}} 2");
    assert!(text.contains(&series), "{series} in /metrics");
}

#[tokio::test]
async fn breaker_metric_series_stay_bounded() {
    let up = Upstream::start().await;
    let (_held, dead) = dead_port();
    // 111 distinct hosts (127.0.0.2 … 127.0.0.112, all loopback), each a failing origin.
    let hosts: Vec<String> = (2..=112).map(|i| format!("127.0.0.{i}")).collect();
    let mut allow: Vec<String> = hosts.iter().map(|h| format!("{h}:{dead}")).collect();
    allow.extend(loopback(&[up.port]));
    let tiers = tiers_file(
        "[tiers.bulk]\nrequests_per_minute = 60000\nburst = 10000\n\
         max_concurrent_jobs = 50\nmax_queued_jobs = 1000\n",
    );
    let app = spawn_jobs_app(&allow, |c| {
        c.tiers_path = Some(tiers.clone());
        c.jobs.breaker_failures = 1;
        c.jobs.breaker_open = Duration::from_secs(60);
        c.jobs.breaker_min_accounts = 1;
    })
    .await;
    let (_, key) = app.create_account("bulk", 1000).await;
    for host in &hosts {
        let res = app
            .scrape(&key, json!({"url": format!("http://{host}:{dead}/")}))
            .await;
        assert_problem(res, 502, "upstream_failed").await;
        // Working pages in between keep the egress provider's success rate up: this test is
        // about the origins' series, not the provider.
        for _ in 0..2 {
            let res = app
                .scrape(&key, json!({"url": format!("{}/", up.base)}))
                .await;
            assert_eq!(res.status(), 200);
        }
    }
    let report = admin_breakers(&app).await;
    assert!(
        shared_open(&report).len() >= hosts.len(),
        "every failing origin's breaker is open (the cap is on series, not on breakers)"
    );
    let text = metrics_text(&app).await;
    let series = text
        .lines()
        .filter(|l| l.starts_with("keymeter_breaker_state{kind=\"host\""))
        .count();
    assert!(series > 0, "open origins are reported");
    assert!(
        series <= 100,
        "{series} host series: the label set is unbounded"
    );
}

#[tokio::test]
async fn an_ssrf_refusal_does_not_reveal_the_resolved_address() {
    let up = Upstream::start().await;
    let app = spawn_jobs_app(&loopback(&[up.port]), |_| {}).await;
    let (_, key) = app.create_account("pro", 100).await;
    let secret_parts = ["127.0.0.1", "::1", "127.0.0.0/8", "loopback"];

    // A name given directly: refused before any charge.
    let res = app
        .scrape(&key, json!({"url": "http://localhost:9/"}))
        .await;
    let p = assert_problem(res, 422, "url_not_allowed").await;
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("localhost resolves to a non-public"), "{p}");
    for part in secret_parts {
        assert!(!detail.contains(part), "{part:?} revealed: {detail}");
    }
    // The same for a job's webhook URL…
    let res = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/", up.base), "webhook_url": "http://localhost:9/hook"}),
        )
        .await;
    let p = assert_problem(res, 422, "url_not_allowed").await;
    for part in secret_parts {
        assert!(!p["detail"].as_str().unwrap().contains(part), "{p}");
    }
    // …and for a name a site redirects to: the job's stored error says no more.
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/to-localhost/{}", up.base, up.port)}),
        )
        .await;
    let p = assert_problem(res, 422, "url_not_allowed").await;
    let job = app
        .wait_for_job(&key, p["job_id"].as_str().unwrap(), &["failed"])
        .await;
    let stored = job["error"]["detail"].as_str().unwrap();
    assert!(
        stored.contains("localhost resolves to a non-public"),
        "{job}"
    );
    for part in secret_parts {
        assert!(!stored.contains(part), "{part:?} revealed: {job}");
        assert!(!p["detail"].as_str().unwrap().contains(part), "{p}");
    }
}

#[tokio::test]
async fn a_free_format_works_and_costs_nothing() {
    let up = Upstream::start().await;
    let tiers = tiers_file(
        "[tiers.freebie]\nrequests_per_minute = 600\nburst = 100\n\
         max_concurrent_jobs = 2\nmax_queued_jobs = 10\nprices = { metadata = 0 }\n",
    );
    let app = spawn_jobs_app(&loopback(&[up.port]), |c| {
        c.tiers_path = Some(tiers.clone());
    })
    .await;
    // No credits at all: the free format needs none.
    let (account, key) = app.create_account("freebie", 0).await;
    let res = app
        .scrape(&key, json!({"url": format!("{}/", up.base)}))
        .await;
    assert_eq!(res.status(), 200);
    let job: Value = res.json().await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["cost"], 0);
    assert_eq!(job["charged"], false);
    assert_eq!(job["result"]["metadata"]["title"], "Working", "{job}");

    // Queued the same way; and a free job that fails has nothing to refund.
    let res = app
        .post_json("/v1/jobs", &key, json!({"url": format!("{}/", up.base)}))
        .await;
    assert_eq!(res.status(), 202);
    let queued: Value = res.json().await.unwrap();
    app.wait_for_job(&key, queued["id"].as_str().unwrap(), &["succeeded"])
        .await;
    let res = app
        .scrape(&key, json!({"url": format!("{}/status/500", up.base)}))
        .await;
    let p = assert_problem(res, 502, "upstream_failed").await;
    assert_eq!(p["refunded"], false, "{p}");

    // A format with a price is still paid for.
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/", up.base), "formats": ["metadata", "text"]}),
        )
        .await;
    assert_problem(res, 402, "insufficient_credits").await;

    // Free jobs move no money: no ledger row at all, not even a zero one.
    let rows: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND job_id IS NOT NULL",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    assert_ledger_invariant(&app).await;
}
