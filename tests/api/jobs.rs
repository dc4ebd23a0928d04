//! Scrape jobs against real local upstreams: results per format, charge/refund per outcome
//! (checked in the ledger), SSRF refusals before charging, the breaker opening and
//! recovering, the concurrency limit and queue cap, idempotent creation, signed webhooks
//! with retries, cancellation, graceful shutdown, and an instance killed mid-job.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use keymeter::config::Config;
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use crate::support::app::{allow_scraping, spawn_jobs_app};
use crate::support::db::{assert_ledger_invariant, balance, create_database, movements};
use crate::support::prometheus::metrics_text;
use crate::support::upstream::Upstream;
use crate::support::{assert_problem, spawn_app_on, TestApp, ADMIN_TOKEN};

mod inline;

/// An app whose SSRF guard lets `up` through (see [`spawn_jobs_app`]), with `customise`.
async fn jobs_app(up: &Upstream, customise: impl FnOnce(&mut Config)) -> TestApp {
    spawn_jobs_app(&up.allow(), customise).await
}

#[tokio::test]
async fn a_sync_scrape_returns_every_format_and_is_charged_once() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (account, key) = app.create_account("pro", 100).await;
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/page", up.base),
               "formats": ["metadata", "text", "markdown", "links", "html"]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let job: Value = res.json().await.unwrap();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["cost"], 5);
    assert_eq!(job["charged"], true);
    assert_eq!(job["refunded"], false);
    let r = &job["result"];
    assert_eq!(r["metadata"]["title"], "Known Page");
    assert_eq!(r["metadata"]["description"], "A page with known metadata.");
    assert_eq!(r["metadata"]["status_code"], 200);
    assert_eq!(r["metadata"]["language"], "en");
    assert_eq!(r["metadata"]["canonical"], format!("{}/canonical", up.base));
    assert_eq!(r["metadata"]["open_graph"]["title"], "OG Known");
    assert_eq!(
        r["metadata"]["open_graph"]["image"],
        format!("{}/img.png", up.base)
    );
    assert!(r["text"].as_str().unwrap().contains("Readable text here."));
    assert!(r["markdown"].as_str().unwrap().contains("Hello"));
    assert!(r["markdown"].as_str().unwrap().contains("**text**"));
    assert_eq!(
        r["links"],
        json!([format!("{}/a", up.base), "https://example.org/x"])
    );
    assert!(r["html"].as_str().unwrap().contains("<h1>Hello</h1>"));
    assert!(job["timings"]["total_ms"].as_i64().is_some());

    assert_eq!(balance(&app, account).await.credits, 95);
    let id = job["id"].as_str().unwrap();
    assert_eq!(movements(&app, id).await, (1, 0));
    // The job is durable and visible like any other.
    let listed: Value = app
        .get_with_key("/v1/jobs?status=succeeded", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["id"], job["id"]);
    assert!(
        listed["data"][0]["result"].is_null(),
        "lists leave results out"
    );
    let one: Value = app
        .get_with_key(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["result"], job["result"]);
    // Default format is metadata only, costing 1.
    let res = app
        .scrape(&key, json!({"url": format!("{}/page", up.base)}))
        .await;
    let job: Value = res.json().await.unwrap();
    assert_eq!(job["formats"], json!(["metadata"]));
    assert!(job["result"].get("html").is_none());
    assert_eq!(balance(&app, account).await.credits, 94);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn usable_answers_are_kept_and_every_failure_is_refunded() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (account, key) = app.create_account("pro", 100).await;
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("{}/status/404", up.base), 200, ""),
        (format!("{}/status/410", up.base), 200, ""),
        (format!("{}/status/500", up.base), 502, "upstream_failed"),
        (format!("{}/status/403", up.base), 502, "upstream_failed"),
        (format!("{}/status/429", up.base), 502, "upstream_failed"),
        (
            format!("http://127.0.0.1:{}/", up.reset_port),
            502,
            "upstream_failed",
        ),
        (format!("{}/to-private", up.base), 422, "url_not_allowed"),
        (format!("{}/to-metadata", up.base), 422, "url_not_allowed"),
    ];
    let mut kept = 0;
    for (url, status, type_) in &cases {
        let res = app.scrape(&key, json!({"url": url})).await;
        assert_eq!(res.status(), *status, "{url}");
        if *status == 200 {
            let job: Value = res.json().await.unwrap();
            assert_eq!(job["status"], "succeeded");
            assert_eq!(movements(&app, job["id"].as_str().unwrap()).await, (1, 0));
            kept += 1;
        } else {
            let p = assert_problem(res, *status, type_).await;
            assert_eq!(p["refunded"], true, "{url}: {p}");
            let id = p["job_id"].as_str().unwrap().to_owned();
            assert_eq!(movements(&app, &id).await, (1, 1), "{url}");
            let job = app.wait_for_job(&key, &id, &["failed"]).await;
            assert_eq!(job["refunded"], true);
        }
    }
    // A timeout (the page is slower than the job allows) is refunded too.
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/slow/3000", up.base), "timeout_ms": 300}),
        )
        .await;
    let p = assert_problem(res, 504, "job_timeout").await;
    assert_eq!(p["refunded"], true);
    assert_eq!(balance(&app, account).await.credits, 100 - kept);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn refused_urls_and_bad_input_cost_nothing_and_queue_nothing() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (account, key) = app.create_account("pro", 10).await;
    for url in [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://100.64.0.1/",
        "http://localhost:1/",
    ] {
        let res = app.scrape(&key, json!({"url": url})).await;
        assert_problem(res, 422, "url_not_allowed").await;
    }
    for body in [
        json!({"url": "ftp://example.com/"}),
        json!({"url": "not a url"}),
        json!({"url": format!("{}/page", up.base), "formats": ["pdf"]}),
        json!({"url": format!("{}/page", up.base), "timeout_ms": 60001}),
        json!({"url": format!("{}/page", up.base), "headers": {"Host": "evil"}}),
        json!({"url": format!("{}/page", up.base), "webhook_url": "http://x"}),
        json!({"url": format!("{}/page", up.base), "unknown": 1}),
    ] {
        let res = app.scrape(&key, body.clone()).await;
        let status = res.status().as_u16();
        assert!(status == 422 || status == 400, "{body}: {status}");
    }
    // Short of credits: 402, nothing queued.
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/page", up.base),
               "formats": ["metadata", "text", "markdown", "links", "html"]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/page", up.base),
                   "formats": ["metadata", "text", "markdown", "links", "html", "html"]}),
        )
        .await;
    assert_eq!(res.status(), 202, "duplicate formats count once");
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/page", up.base), "formats": ["metadata", "text"]}),
        )
        .await;
    assert_problem(res, 402, "insufficient_credits").await;
    let jobs: i64 = app
        .db
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs, 2);
    assert!(balance(&app, account).await.credits >= 0);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn the_breaker_opens_answers_without_charging_and_recovers() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |c| {
        c.jobs.breaker_failures = 3;
        c.jobs.breaker_open = Duration::from_secs(1);
    })
    .await;
    let (account, key) = app.create_account("pro", 100).await;
    let url = format!("{}/health-toggle", up.base);
    up.set_failing(true);
    for _ in 0..3 {
        let res = app.scrape(&key, json!({"url": url})).await;
        assert_problem(res, 502, "upstream_failed").await;
    }
    let jobs_before: i64 = app
        .db
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    let hits_before = up.hits("/health-toggle");
    let res = app.scrape(&key, json!({"url": url})).await;
    assert!(res.headers().get("retry-after").is_some());
    let p = assert_problem(res, 503, "upstream_unavailable").await;
    assert_eq!(p["breaker"], "host");
    // Refused before anything was queued or charged, and the upstream was not called.
    let jobs_after: i64 = app
        .db
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs_after, jobs_before);
    assert_eq!(up.hits("/health-toggle"), hits_before);
    assert_eq!(balance(&app, account).await.credits, 100);
    // Async jobs are refused the same way.
    let res = app.post_json("/v1/jobs", &key, json!({"url": url})).await;
    assert_problem(res, 503, "upstream_unavailable").await;
    // Operators see it.
    let breakers: Value = app.admin_get("/admin/breakers").await.json().await.unwrap();
    let open = breakers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "host")
        .expect("the host breaker is listed");
    assert_eq!(open["state"], "open");
    // Per origin (scheme, host, port); one account's failures open a breaker for that
    // account only.
    assert_eq!(open["name"], up.base);
    assert_eq!(open["scope"], "account");
    assert_eq!(p["scope"], "account");
    // …and so does Prometheus (counters are process-wide, so only presence is checked).
    let text = metrics_text(&app).await;
    for series in [
        "keymeter_breaker_rejections_total{kind=\"host\"}",
        "keymeter_job_transitions_total{state=\"failed\"}",
        "keymeter_jobs_queue_depth ",
        "keymeter_job_duration_seconds_count{outcome=\"failed\"}",
    ] {
        assert!(text.contains(series), "{series} in /metrics");
    }
    // The breaker is per host: the same server under another name still answers.
    let res = app
        .scrape(
            &key,
            json!({"url": format!("http://localhost:{}/page", up.port)}),
        )
        .await;
    assert_eq!(res.status(), 200);

    // The upstream recovers; after the open period a probe closes the breaker.
    up.set_failing(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = app.scrape(&key, json!({"url": url})).await;
    assert_eq!(res.status(), 200);
    let res = app.scrape(&key, json!({"url": url})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 97);
    assert_ledger_invariant(&app).await;
}

/// A tiers file with one generous tier `name` that runs `running` jobs and queues `queued`.
fn tiers_file(name: &str, running: u32, queued: u32) -> String {
    crate::support::app::tiers_file(&format!(
        "[tiers.{name}]\nrequests_per_minute = 6000\nburst = 1000\n\
         max_concurrent_jobs = {running}\nmax_queued_jobs = {queued}\n"
    ))
}

#[tokio::test]
async fn the_concurrency_limit_holds_and_the_queue_cap_answers_queue_full() {
    let up = Upstream::start().await;
    let tiers = tiers_file("tiny", 2, 3);
    let app = jobs_app(&up, |c| c.tiers_path = Some(tiers.clone())).await;
    let (account, key) = app.create_account("tiny", 100).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let res = app
            .post_json(
                "/v1/jobs",
                &key,
                json!({"url": format!("{}/slow/1500", up.base), "timeout_ms": 20000}),
            )
            .await;
        match res.status().as_u16() {
            202 => {
                assert!(res.headers().get("location").is_some());
                let job: Value = res.json().await.unwrap();
                accepted.push(job["id"].as_str().unwrap().to_owned());
            }
            429 => {
                assert!(res.headers().get("retry-after").is_some());
                let p = assert_problem(res, 429, "queue_full").await;
                assert_eq!(p["max_queued_jobs"], 3);
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // At most 2 running + 3 queued fit before any job finishes.
    assert!(accepted.len() <= 5, "{} accepted", accepted.len());
    assert!(refused >= 5);
    assert_eq!(
        balance(&app, account).await.credits,
        100 - accepted.len() as i64
    );
    for id in &accepted {
        let job = app.wait_for_job(&key, id, &["succeeded"]).await;
        assert_eq!(job["refunded"], false);
    }
    assert!(
        up.max_in_flight() <= 2,
        "never more than the tier's 2 jobs at once, saw {}",
        up.max_in_flight()
    );
    assert_eq!(up.max_in_flight(), 2);
    assert_ledger_invariant(&app).await;
    let _ = std::fs::remove_file(tiers);
}

/// Submissions racing for the last places of a queue: a job created in one pipelined flight
/// (no `Idempotency-Key`) reserves its cost before the insert finds the queue full, so the
/// refusal must roll that reservation back although the COMMIT was already sent. With an
/// `Idempotency-Key` the job takes the ordinary transaction. Either way exactly the tier's
/// 2 running + 3 queued are accepted (no job can end meanwhile) and only they are charged.
#[tokio::test]
async fn racing_submissions_at_the_queue_cap_charge_exactly_the_jobs_accepted() {
    let up = Upstream::start().await;
    let tiers = tiers_file("tiny", 2, 3);
    let app = jobs_app(&up, |c| c.tiers_path = Some(tiers.clone())).await;
    let (account, key) = app.create_account("tiny", 100).await;
    let body = json!({"url": format!("{}/slow/8000", up.base), "timeout_ms": 20000});
    let requests = (0..30).map(|i| {
        let (app, key, body) = (&app, &key, body.clone());
        async move {
            let mut req = app
                .client
                .post(app.url("/v1/jobs"))
                .bearer_auth(key)
                .json(&body);
            if i % 3 == 0 {
                req = req.header("Idempotency-Key", format!("race-{i}"));
            }
            req.send().await.unwrap()
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let mut accepted = 0;
    for res in answers {
        match res.status().as_u16() {
            202 => accepted += 1,
            429 => {
                let p = assert_problem(res, 429, "queue_full").await;
                assert_eq!(p["max_queued_jobs"], 3);
                let detail = p["detail"].as_str().unwrap_or_default();
                assert!(detail.contains("already has 3 queued jobs"), "{p}");
            }
            other => panic!("unexpected {other}: {}", res.text().await.unwrap()),
        }
    }
    assert_eq!(accepted, 5, "2 running + 3 queued");
    let row = app
        .db
        .query_one(
            "SELECT (SELECT count(*) FROM jobs),
                    (SELECT count(*) FROM credit_ledger WHERE kind = 'charge'),
                    (SELECT count(*) FROM credit_ledger c
                      WHERE kind = 'charge' AND NOT EXISTS
                            (SELECT 1 FROM jobs j WHERE j.id = c.job_id))",
            &[],
        )
        .await
        .unwrap();
    let (jobs, charges, orphans): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((jobs, charges, orphans), (5, 5, 0));
    assert_eq!(balance(&app, account).await.credits, 95);
    assert_ledger_invariant(&app).await;
    let _ = std::fs::remove_file(tiers);
}

/// One account flooding submissions at its queue cap shares the create lane's flights with
/// another account's sync scrapes: each refusal rolls back the flight it was in, and the
/// other account's jobs in that flight must still be created (once, charged once) and run.
#[tokio::test]
async fn an_account_flooding_at_its_queue_cap_leaves_another_accounts_jobs_whole() {
    let up = Upstream::start().await;
    let tiers = crate::support::app::tiers_file(
        "[tiers.tiny]\nrequests_per_minute = 6000\nburst = 1000\n\
         max_concurrent_jobs = 2\nmax_queued_jobs = 3\n\
         [tiers.roomy]\nrequests_per_minute = 6000\nburst = 1000\n\
         max_concurrent_jobs = 50\nmax_queued_jobs = 1000\n",
    );
    let app = jobs_app(&up, |c| c.tiers_path = Some(tiers.clone())).await;
    let (flooder, flooder_key) = app.create_account("tiny", 100).await;
    let (other, other_key) = app.create_account("roomy", 100).await;
    let slow = json!({"url": format!("{}/slow/8000", up.base), "timeout_ms": 20000});
    let page = json!({"url": format!("{}/page", up.base)});
    let requests = (0..60).map(|i| {
        let (app, flooder_key, other_key) = (&app, &flooder_key, &other_key);
        let (slow, page) = (slow.clone(), page.clone());
        async move {
            if i % 3 == 0 {
                ("other", app.scrape(other_key, page).await)
            } else {
                (
                    "flooder",
                    app.post_json("/v1/jobs", flooder_key, slow).await,
                )
            }
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let (mut flooder_accepted, mut other_succeeded) = (0, 0);
    for (who, res) in answers {
        match (who, res.status().as_u16()) {
            ("other", 200) => other_succeeded += 1,
            ("flooder", 202) => flooder_accepted += 1,
            ("flooder", 429) => {
                assert_problem(res, 429, "queue_full").await;
            }
            (who, status) => panic!("{who}: unexpected {status}: {}", res.text().await.unwrap()),
        }
    }
    assert_eq!(other_succeeded, 20, "every job of the other account ran");
    assert_eq!(flooder_accepted, 5, "2 running + 3 queued");
    assert_eq!(balance(&app, other).await.credits, 80);
    assert_eq!(balance(&app, flooder).await.credits, 95);
    let orphans: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM credit_ledger c
              WHERE kind = 'charge' AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = c.job_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "no charge without its job");
    assert_ledger_invariant(&app).await;
    let _ = std::fs::remove_file(tiers);
}

#[tokio::test]
async fn job_creation_is_idempotent() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (account, key) = app.create_account("pro", 100).await;
    let body = json!({"url": format!("{}/page", up.base), "formats": ["text"]});
    let post = |path: &'static str, idem: &'static str| {
        app.client
            .post(app.url(path))
            .bearer_auth(&key)
            .header("Idempotency-Key", idem)
            .json(&body)
            .send()
    };
    let first = post("/v1/jobs", "job-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = post("/v1/jobs", "job-1").await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.headers()["location"],
        format!("/v1/jobs/{}", first["id"].as_str().unwrap())
    );
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);

    let sync1 = post("/v1/scrape", "sync-1").await.unwrap();
    assert_eq!(sync1.status(), 200);
    let sync1: Value = sync1.json().await.unwrap();
    let sync2 = post("/v1/scrape", "sync-1").await.unwrap();
    assert_eq!(sync2.status(), 200);
    let sync2: Value = sync2.json().await.unwrap();
    assert_eq!(sync1["id"], sync2["id"]);
    assert_eq!(sync2["result"]["text"], sync1["result"]["text"]);

    // The same key with another body is refused.
    let other = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "job-1")
        .json(&json!({"url": format!("{}/page", up.base)}))
        .send()
        .await
        .unwrap();
    assert_problem(other, 422, "idempotency_key_reused").await;
    app.wait_for_job(&key, first["id"].as_str().unwrap(), &["succeeded"])
        .await;
    let jobs: i64 = app
        .db
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs, 2);
    assert_eq!(balance(&app, account).await.credits, 98);
    assert_ledger_invariant(&app).await;
}

fn verify(secret: &str, header: &str, body: &str) -> bool {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_owned()),
            Some(("v1", v)) => sigs.push(v.to_owned()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let expected = hex::encode(mac.finalize().into_bytes());
    sigs.contains(&expected)
}

#[tokio::test]
async fn finished_jobs_are_posted_to_the_webhook_signed_and_retried() {
    let up = Upstream::start().await;
    up.fail_next_hooks(1);
    let app = jobs_app(&up, |c| {
        c.jobs.webhook_retry_base = Duration::from_millis(100);
    })
    .await;
    let (_, key) = app.create_account("pro", 100).await;
    let account: Value = app
        .get_with_key("/v1/account", &key)
        .await
        .json()
        .await
        .unwrap();
    let secret = account["webhook_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let res = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/page", up.base),
                   "webhook_url": format!("{}/hook", up.base)}),
        )
        .await;
    assert_eq!(res.status(), 202);
    let job: Value = res.json().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while up.hooks().len() < 2 {
        assert!(Instant::now() < deadline, "the webhook was not retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hooks = up.hooks();
    for hook in &hooks {
        let (headers, body) = (&hook.headers, &hook.body);
        let sig = &headers["keymeter-signature"];
        assert!(verify(&secret, sig, body), "signature verifies: {sig}");
        assert!(!verify("whsec_wrong", sig, body));
        let event: Value = serde_json::from_str(body).unwrap();
        assert_eq!(event["type"], "job.succeeded");
        assert_eq!(event["data"]["id"], job["id"]);
        assert_eq!(event["data"]["result"]["metadata"]["title"], "Known Page");
        assert_eq!(headers["keymeter-event-id"], event["id"].as_str().unwrap());
    }
    // One event, delivered twice (the first answer was a 500): the same id both times.
    assert_eq!(hooks[0].body, hooks[1].body);
    loop {
        let delivered: Option<chrono::DateTime<chrono::Utc>> = app
            .db
            .query_one("SELECT delivered_at FROM job_webhooks", &[])
            .await
            .unwrap()
            .get(0);
        if delivered.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the delivery was never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A webhook URL at a private address is refused up front.
    let res = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/page", up.base), "webhook_url": "http://10.1.2.3/hook"}),
        )
        .await;
    assert_problem(res, 422, "url_not_allowed").await;
}

#[tokio::test]
async fn a_queued_job_can_be_cancelled_and_is_refunded() {
    let up = Upstream::start().await;
    let tiers = tiers_file("single", 1, 10);
    let app = jobs_app(&up, |c| c.tiers_path = Some(tiers.clone())).await;
    let (account, key) = app.create_account("single", 100).await;
    let running = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/slow/2000", up.base)}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let running_id = running["id"].as_str().unwrap().to_owned();
    app.wait_for_job(&key, &running_id, &["running"]).await;
    let queued = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/page", up.base), "formats": ["metadata", "text"]}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let queued_id = queued["id"].as_str().unwrap().to_owned();
    assert_eq!(queued["status"], "queued");
    assert_eq!(balance(&app, account).await.credits, 97);
    let del = |id: String| {
        app.client
            .delete(app.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(&key)
            .send()
    };
    let res = del(queued_id.clone()).await.unwrap();
    assert_eq!(res.status(), 200);
    let cancelled: Value = res.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["refunded"], true);
    assert_eq!(balance(&app, account).await.credits, 99);
    assert_eq!(movements(&app, &queued_id).await, (1, 1));
    let again = del(queued_id.clone()).await.unwrap();
    assert_problem(again, 409, "job_not_cancellable").await;
    let running_del = del(running_id.clone()).await.unwrap();
    assert_problem(running_del, 409, "job_not_cancellable").await;
    let unknown = del(Uuid::now_v7().to_string()).await.unwrap();
    assert_problem(unknown, 404, "not_found").await;
    app.wait_for_job(&key, &running_id, &["succeeded"]).await;
    assert_eq!(balance(&app, account).await.credits, 99);
    assert_ledger_invariant(&app).await;
    let _ = std::fs::remove_file(tiers);
}

#[tokio::test]
async fn a_50_mib_body_is_cut_at_the_cap() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (_, key) = app.create_account("pro", 100).await;
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/big", up.base), "formats": ["metadata", "html"]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let job: Value = res.json().await.unwrap();
    assert_eq!(job["result"]["metadata"]["truncated"], true);
    assert_eq!(job["result"]["metadata"]["title"], "Big");
    assert!(job["result"]["html"].as_str().unwrap().len() <= 5 * 1024 * 1024);
}

#[tokio::test]
async fn graceful_shutdown_puts_unfinished_jobs_back_for_another_instance() {
    let up = Upstream::start().await;
    let mut a = jobs_app(&up, |c| {
        // The jobs' grace is no longer than the drain unless set.
        c.shutdown_timeout = Duration::from_secs(1);
        c.shutdown_job_grace = Duration::from_secs(1);
    })
    .await;
    let (account, key) = a.create_account("pro", 100).await;
    let job: Value = a
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/slow/4000", up.base), "timeout_ms": 20000}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    a.wait_for_job(&key, &id, &["running"]).await;
    a.stop().await;
    let row =
        a.db.query_one(
            "SELECT status, lease_owner IS NULL, attempts FROM jobs WHERE id = $1",
            &[&id.parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "queued", "left claimable");
    assert!(row.get::<_, bool>(1));
    assert_eq!(
        row.get::<_, i32>(2),
        0,
        "the interrupted attempt does not count"
    );
    let b = spawn_app_on(a.db_name.clone(), |c| allow_scraping(c, &up.allow())).await;
    let done = b.wait_for_job(&key, &id, &["succeeded"]).await;
    assert_eq!(done["refunded"], false);
    assert_eq!(movements(&b, &id).await, (1, 0));
    assert_eq!(balance(&b, account).await.credits, 99);
    assert_ledger_invariant(&b).await;
}

#[tokio::test]
async fn a_sync_scrape_still_waiting_at_shutdown_is_answered_with_its_job() {
    let up = Upstream::start().await;
    // A tier that runs one job at a time, busy with a long job: the sync scrape has no free
    // slot to start in at once, so it queues behind it and cannot end before the drain
    // times out.
    let tiers = tiers_file("single", 1, 10);
    let mut a = jobs_app(&up, |c| {
        c.shutdown_timeout = Duration::from_secs(2);
        c.shutdown_job_grace = Duration::from_secs(2);
        c.jobs.workers = 1;
        c.tiers_path = Some(tiers.clone());
    })
    .await;
    let (account, key) = a.create_account("single", 100).await;
    let long: Value = a
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": format!("{}/slow/8000", up.base), "timeout_ms": 30000}),
        )
        .await
        .json()
        .await
        .unwrap();
    let long_id = long["id"].as_str().unwrap().to_owned();
    a.wait_for_job(&key, &long_id, &["running"]).await;
    let request = {
        let (client, url, key) = (a.client.clone(), a.url("/v1/scrape"), key.clone());
        let body = json!({"url": format!("{}/slow/200", up.base), "timeout_ms": 30000});
        tokio::spawn(async move { client.post(url).bearer_auth(key).json(&body).send().await })
    };
    // Until the scrape's job is queued.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .db
        .query_one("SELECT count(*) FROM jobs WHERE mode = 'sync'", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the sync job was never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    a.stop().await;
    let res = request.await.unwrap().expect("answered, not cut off");
    assert_eq!(res.status(), 202);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let job: Value = res.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    assert_eq!(job["status"], "queued");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "stopped in {:?}",
        started.elapsed()
    );
    // Another instance runs both to their ends, each charged once.
    let b = spawn_app_on(a.db_name.clone(), |c| {
        allow_scraping(c, &up.allow());
        c.tiers_path = Some(tiers.clone());
    })
    .await;
    let done = b.wait_for_job(&key, &id, &["succeeded"]).await;
    assert_eq!(done["refunded"], false);
    b.wait_for_job(&key, &long_id, &["succeeded"]).await;
    assert_eq!(movements(&b, &id).await, (1, 0));
    assert_eq!(movements(&b, &long_id).await, (1, 0));
    assert_eq!(balance(&b, account).await.credits, 98);
    assert_ledger_invariant(&b).await;
    let _ = std::fs::remove_file(tiers);
}

#[tokio::test]
async fn an_instance_killed_mid_job_leaves_it_to_another_charged_once() {
    let up = Upstream::start().await;
    let db = create_database().await;
    let allow_list = format!("127.0.0.1:{}", up.port);
    let (mut child, port, _logs) = crate::support::process::start_server(
        &db,
        &[
            ("KEYMETER_SCRAPE_ALLOW", &allow_list),
            ("KEYMETER_JOB_LEASE_SECS", "1"),
            ("KEYMETER_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let created: Value = client
        .post(format!("{base}/admin/accounts"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"email": "kill@example.com", "tier": "pro", "credits": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let account: Uuid = created["account_id"].as_str().unwrap().parse().unwrap();
    let job: Value = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .json(&json!({"url": format!("{}/slow/2500", up.base), "timeout_ms": 20000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    // Wait until the first instance is running it, then kill it without warning.
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits("/slow/2500") == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let b = spawn_app_on(db, |c| {
        allow_scraping(c, &up.allow());
        c.jobs.lease = Duration::from_secs(1);
    })
    .await;
    let done = b.wait_for_job(&key, &id, &["succeeded", "failed"]).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    assert_eq!(
        movements(&b, &id).await,
        (1, 0),
        "charged once, not refunded"
    );
    assert_eq!(balance(&b, account).await.credits, 9);
    assert_eq!(up.hits("/slow/2500"), 2);
    assert_ledger_invariant(&b).await;
}

#[tokio::test]
async fn finished_jobs_past_their_retention_are_deleted_and_the_ledger_stays() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (account, key) = app.create_account("pro", 10).await;
    let res = app
        .scrape(&key, json!({"url": format!("{}/status/500", up.base)}))
        .await;
    let id: Uuid = assert_problem(res, 502, "upstream_failed").await["job_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let res = app
        .scrape(&key, json!({"url": format!("{}/page", up.base)}))
        .await;
    assert_eq!(res.status(), 200);
    app.db
        .execute(
            "UPDATE jobs SET finished_at = now() - interval '31 days' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let pool = app.pool();
    let deleted = keymeter::jobs::queue::purge(&pool, Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let left: i64 = app
        .db
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    assert_eq!(
        movements(&app, &id.to_string()).await,
        (1, 1),
        "the ledger keeps them"
    );
    assert_eq!(balance(&app, account).await.credits, 9);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn concurrent_jobs_on_a_small_balance_never_overspend_and_settle_exactly() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |c| c.jobs.breaker_failures = 1000).await;
    let (account, key) = app.create_account("business", 20).await;
    let requests = (0..40).map(|i| {
        let path = if i % 2 == 0 { "/page" } else { "/status/500" };
        let body = json!({"url": format!("{}{path}", up.base)});
        let (app, key) = (&app, &key);
        async move {
            if i % 4 < 2 {
                app.scrape(key, body).await.status().as_u16()
            } else {
                app.post_json("/v1/jobs", key, body).await.status().as_u16()
            }
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| [200, 202, 402, 502].contains(s)),
        "{statuses:?}"
    );
    // Wait for the async ones.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = app
        .db
        .query_one(
            "SELECT count(*),
                    count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status = 'failed'),
                    (SELECT count(*) FROM credit_ledger WHERE kind = 'charge'),
                    (SELECT count(*) FROM credit_ledger WHERE kind = 'refund')
               FROM jobs",
            &[],
        )
        .await
        .unwrap();
    let (jobs, succeeded, failed, charges, refunds): (i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(jobs, succeeded + failed);
    assert_eq!(charges, jobs, "every job charged once");
    assert_eq!(refunds, failed, "every failed job refunded once");
    assert_eq!(balance(&app, account).await.credits, 20 - succeeded);
    assert!(succeeded <= 20);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_sync_job_may_not_outlast_the_servers_request_timeout() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |c| c.request_timeout = Duration::from_secs(10)).await;
    let (account, key) = app.create_account("pro", 10).await;
    let body = json!({"url": format!("{}/page", up.base), "timeout_ms": 20000});
    let res = app.scrape(&key, body.clone()).await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert_eq!(p["field"], "timeout_ms");
    assert_eq!(
        balance(&app, account).await.credits,
        10,
        "refused before charging"
    );
    // An async job is not bound by the request timeout.
    let res = app.post_json("/v1/jobs", &key, body).await;
    assert_eq!(res.status(), 202);
    let res = app
        .scrape(
            &key,
            json!({"url": format!("{}/page", up.base), "timeout_ms": 7000}),
        )
        .await;
    assert_eq!(res.status(), 200);
}
