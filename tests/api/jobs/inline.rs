//! Sync jobs started by their own request (the fast path of `POST /v1/scrape`): inserted
//! running and leased to the request's instance in the transaction that charges them. They
//! must keep every guarantee of a queued job: the tier's running limit across instances, the
//! shutdown hand-off, and recovery when the instance dies.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{jobs_app, tiers_file};
use crate::support::app::allow_scraping;
use crate::support::db::{assert_ledger_invariant, balance, create_database, movements};
use crate::support::upstream::Upstream;
use crate::support::{spawn_app_on, ADMIN_TOKEN};

/// Whether the job was started by its request: the row was inserted running, so it started
/// in the transaction that created it (`now()` is the transaction's start, so both are equal);
/// a claimed job starts in a later transaction.
async fn started_inline(db: &tokio_postgres::Client, id: &str) -> bool {
    db.query_one(
        "SELECT started_at = created_at FROM jobs WHERE id = $1",
        &[&id.parse::<Uuid>().unwrap()],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn a_sync_job_with_a_free_slot_starts_in_its_request_and_settles_once() {
    let up = Upstream::start().await;
    let app = jobs_app(&up, |_| {}).await;
    let (account, key) = app.create_account("pro", 10).await;
    let res = app
        .scrape(&key, json!({"url": format!("{}/page", up.base)}))
        .await;
    assert_eq!(res.status(), 200);
    let job: Value = res.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["attempts"], 1);
    assert!(started_inline(&app.db, id).await, "{job}");
    assert_eq!(movements(&app, id).await, (1, 0));
    assert_eq!(balance(&app, account).await.credits, 9);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn the_running_limit_is_exact_with_sync_jobs_started_on_two_instances() {
    let up = Upstream::start().await;
    let tiers = tiers_file("pair", 2, 100);
    let a = jobs_app(&up, |c| c.tiers_path = Some(tiers.clone())).await;
    let b = spawn_app_on(a.db_name.clone(), |c| {
        allow_scraping(c, &up.allow());
        c.tiers_path = Some(tiers.clone());
    })
    .await;
    let (account, key) = a.create_account("pair", 100).await;
    // Twelve at once, half through each instance: each sees the other's running jobs.
    let body = json!({"url": format!("{}/slow/600", up.base), "timeout_ms": 30000});
    let answers = join_all((0..12).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.scrape(&key, body.clone())
    }))
    .await;
    let mut ids = Vec::new();
    for res in answers {
        assert_eq!(res.status(), 200);
        let job: Value = res.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        up.max_in_flight(),
        2,
        "exactly the tier's 2 jobs at once, never more"
    );
    let mut inline = 0;
    for id in &ids {
        inline += usize::from(started_inline(&a.db, id).await);
        assert_eq!(movements(&a, id).await, (1, 0));
    }
    assert!(inline >= 2, "the first two found free slots ({inline})");
    assert!(inline < 12, "the others waited in the queue ({inline})");
    assert_eq!(balance(&a, account).await.credits, 88);
    assert_ledger_invariant(&a).await;
    let _ = std::fs::remove_file(tiers);
}

#[tokio::test]
async fn a_sync_job_running_at_shutdown_is_handed_off_and_finished_elsewhere() {
    let up = Upstream::start().await;
    let mut a = jobs_app(&up, |c| {
        c.shutdown_timeout = Duration::from_secs(1);
        c.shutdown_job_grace = Duration::from_secs(1);
    })
    .await;
    let (account, key) = a.create_account("pro", 100).await;
    let request = {
        let (client, url, key) = (a.client.clone(), a.url("/v1/scrape"), key.clone());
        let body = json!({"url": format!("{}/slow/5000", up.base), "timeout_ms": 20000});
        tokio::spawn(async move { client.post(url).bearer_auth(key).json(&body).send().await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits("/slow/5000") == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.stop().await;
    let res = request.await.unwrap().expect("answered, not cut off");
    assert_eq!(res.status(), 202);
    let job: Value = res.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["status"], "running", "handed off while it ran here");
    assert!(started_inline(&a.db, &id).await);
    let row =
        a.db.query_one(
            "SELECT status, lease_owner IS NULL, attempts FROM jobs WHERE id = $1",
            &[&id.parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "queued",
        "put back at the grace's end"
    );
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
async fn a_sync_job_started_on_an_instance_that_dies_is_recovered_charged_once() {
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
        .json(&json!({"email": "inline-kill@example.com", "tier": "pro", "credits": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let account: Uuid = created["account_id"].as_str().unwrap().parse().unwrap();
    let request = {
        let (client, url, key) = (client.clone(), format!("{base}/v1/scrape"), key.clone());
        let body = json!({"url": format!("{}/slow/2500", up.base), "timeout_ms": 20000});
        tokio::spawn(async move { client.post(url).bearer_auth(key).json(&body).send().await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits("/slow/2500") == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(request.await.unwrap().is_err(), "its request died with it");

    let b = spawn_app_on(db, |c| {
        allow_scraping(c, &up.allow());
        c.jobs.lease = Duration::from_secs(1);
    })
    .await;
    let id: Uuid =
        b.db.query_one("SELECT id FROM jobs WHERE mode = 'sync'", &[])
            .await
            .unwrap()
            .get(0);
    let id = id.to_string();
    assert!(
        started_inline(&b.db, &id).await,
        "the dead instance started it itself"
    );
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
async fn one_accounts_sync_flood_leaves_the_instances_inline_slots_to_other_accounts() {
    use keymeter::jobs::runner::MAX_INLINE_PER_ACCOUNT;
    let up = Upstream::start().await;
    // Both accounts' running limits are far above the instance's per-account share, so only
    // that share decides what runs inline.
    let tiers = tiers_file("wide", 500, 1000);
    let app = jobs_app(&up, |c| c.tiers_path = Some(tiers.clone())).await;
    let (_, flooder) = app.create_account("wide", 10_000).await;
    let (victim, key) = app.create_account("wide", 10).await;
    let flood = MAX_INLINE_PER_ACCOUNT + 8;
    let body = json!({"url": format!("{}/slow/6000", up.base), "timeout_ms": 30000});
    let requests: Vec<_> = (0..flood)
        .map(|_| {
            let (client, url, key, body) = (
                app.client.clone(),
                app.url("/v1/scrape"),
                flooder.clone(),
                body.clone(),
            );
            tokio::spawn(async move { client.post(url).bearer_auth(key).json(&body).send().await })
        })
        .collect();
    // Wait until the flood holds every inline slot it may have: with the test app's four
    // workers running queued ones, that many at the upstream at once means all its share.
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.hits("/slow/6000") < MAX_INLINE_PER_ACCOUNT + 4 {
        assert!(Instant::now() < deadline, "the flood never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let res = app
        .scrape(&key, json!({"url": format!("{}/page", up.base)}))
        .await;
    let took = started.elapsed();
    assert_eq!(res.status(), 200);
    let job: Value = res.json().await.unwrap();
    assert!(
        started_inline(&app.db, job["id"].as_str().unwrap()).await,
        "the other account's sync job still started in its request: {job}"
    );
    assert!(
        took < Duration::from_millis(4000),
        "answered before any of the flood's jobs ended ({took:?})"
    );
    assert_eq!(balance(&app, victim).await.credits, 9);
    let mut inline = 0;
    for r in requests {
        let res = r.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        let job: Value = res.json().await.unwrap();
        inline += usize::from(started_inline(&app.db, job["id"].as_str().unwrap()).await);
    }
    assert_eq!(
        inline, MAX_INLINE_PER_ACCOUNT,
        "one account runs at most its share inline; the rest went through the queue"
    );
    assert_ledger_invariant(&app).await;
    let _ = std::fs::remove_file(tiers);
}
