//! Low-balance alerts (issue 16 §2): `balance.low` once per crossing of the threshold,
//! `balance.depleted` once at zero, exact across instances.

use std::collections::HashMap;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::app::spawn_jobs_app;
use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::upstream::Upstream;
use crate::support::{assert_problem, spawn_app, spawn_app_on, spawn_app_with, TestApp};

async fn charge(app: &TestApp, key: &str, amount: i64) -> u16 {
    app.post_json("/v1/credits/charge", key, json!({"amount": amount}))
        .await
        .status()
        .as_u16()
}

/// A charge through the single-statement path (an idempotent charge is never batched).
async fn charge_alone(app: &TestApp, key: &str, amount: i64) -> u16 {
    app.client
        .post(app.url("/v1/credits/charge"))
        .bearer_auth(key)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&json!({"amount": amount}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn put_threshold(app: &TestApp, key: &str, threshold: Value) -> reqwest::Response {
    app.client
        .put(app.url("/v1/account/alerts"))
        .bearer_auth(key)
        .json(&json!({"low_balance_threshold": threshold}))
        .send()
        .await
        .unwrap()
}

/// The account's events of `kind`, oldest first: their payloads.
async fn events_of(app: &TestApp, account: uuid::Uuid, kind: &str) -> Vec<Value> {
    app.db
        .query(
            "SELECT payload FROM events WHERE account_id = $1 AND type = $2 ORDER BY seq",
            &[&account, &kind],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn two_hundred_concurrent_charges_on_two_instances_fire_one_balance_low_then_it_re_arms() {
    let a = spawn_app().await;
    let b = spawn_app_on(a.db_name.clone(), |_| {}).await;
    let (account, key) = a.create_account("internal", 300).await;
    let res = put_threshold(&a, &key, json!(150)).await;
    assert_eq!(res.status(), 200);

    // 300 → 100, a credit at a time, half through each instance: one charge crosses 150.
    let results = join_all((0..200).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        charge(app, &key, 1)
    }))
    .await;
    assert!(results.iter().all(|s| *s == 201), "{results:?}");
    assert_eq!(balance(&a, account).await.credits, 100);
    let low = events_of(&a, account, "balance.low").await;
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0]["balance"], 149);
    assert_eq!(low[0]["threshold"], 150);
    assert!(events_of(&a, account, "balance.depleted").await.is_empty());

    // Below the threshold already: more charges fire nothing.
    assert_eq!(charge_alone(&b, &key, 1).await, 201);
    assert_eq!(events_of(&a, account, "balance.low").await.len(), 1);

    // A top-up back to >= 150 re-arms it; the next crossing (single-statement path) fires.
    let res = a
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": 51, "reason": "top-up"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(balance(&a, account).await.credits, 150);
    assert_eq!(charge_alone(&a, &key, 2).await, 201);
    let low = events_of(&a, account, "balance.low").await;
    assert_eq!(low.len(), 2, "{low:?}");
    assert_eq!(low[1]["balance"], 148);

    // 148 left; 200 concurrent charges of 1 on both instances: depleted exactly once.
    let results = join_all((0..200).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        charge(app, &key, 1)
    }))
    .await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for s in results {
        *by_status.entry(s).or_default() += 1;
    }
    assert_eq!(by_status.get(&201), Some(&148), "{by_status:?}");
    assert_eq!(balance(&a, account).await.credits, 0);
    let depleted = events_of(&a, account, "balance.depleted").await;
    assert_eq!(depleted.len(), 1, "{depleted:?}");
    assert_eq!(depleted[0]["balance"], 0);
    assert_eq!(events_of(&a, account, "balance.low").await.len(), 2);
    assert_ledger_invariant(&a).await;
}

#[tokio::test]
async fn a_job_reservation_that_crosses_the_threshold_fires_balance_low() {
    // A job's reservation is a charge in the statement every charge uses.
    let up = Upstream::start().await;
    let app = spawn_jobs_app(&up.allow(), |_| {}).await;
    let (account, key) = app.create_account("internal", 12).await;
    assert_eq!(put_threshold(&app, &key, json!(10)).await.status(), 200);
    let res = app
        .post_json(
            "/v1/jobs",
            &key,
            json!({"url": up.url("/page"), "formats": ["text", "links", "html"]}),
        )
        .await;
    assert_eq!(res.status(), 202, "{:?}", res.text().await);
    let low = events_of(&app, account, "balance.low").await;
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0]["balance"], 9);
}

#[tokio::test]
async fn the_threshold_defaults_to_the_tier_and_can_be_set_and_reset() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("pro", 50).await;
    let get = |key: String| {
        let app = &app;
        async move {
            let res = app.get_with_key("/v1/account/alerts", &key).await;
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()
        }
    };
    let s = get(key.clone()).await;
    assert_eq!(s["low_balance_threshold"], 100, "the pro tier's default");
    assert_eq!(s["low_balance_threshold_source"], "tier");
    assert_eq!(s["below_threshold"], true);

    let res = put_threshold(&app, &key, json!(20)).await;
    assert_eq!(res.status(), 200);
    let s: Value = res.json().await.unwrap();
    assert_eq!(s["low_balance_threshold"], 20);
    assert_eq!(s["low_balance_threshold_source"], "account");
    assert_eq!(s["below_threshold"], false);
    assert_eq!(get(key.clone()).await["low_balance_threshold"], 20);

    let s: Value = put_threshold(&app, &key, Value::Null)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(s["low_balance_threshold"], 100);
    assert_eq!(s["low_balance_threshold_source"], "tier");

    for bad in [
        json!(-1),
        json!(1_000_000_000_000_001_i64),
        json!("ten"),
        json!(1.5),
    ] {
        let p = assert_problem(
            put_threshold(&app, &key, bad).await,
            422,
            "validation_failed",
        )
        .await;
        assert!(p["detail"].is_string());
    }
    let res = app
        .client
        .put(app.url("/v1/account/alerts"))
        .bearer_auth(&key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "validation_failed").await;

    // `billing` scope only.
    let account: uuid::Uuid = app
        .get_with_key("/v1/account", &key)
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, read_only) = app.create_key(account, &["read", "scrape"]).await;
    let res = put_threshold(&app, &read_only, json!(5)).await;
    assert_problem(res, 403, "insufficient_scope").await;
    let res = app.get_with_key("/v1/account/alerts", &read_only).await;
    assert_problem(res, 403, "insufficient_scope").await;
}

/// One gateway authorization of `/v1/one/*` (1 credit).
async fn authz(app: &TestApp, key: &str) -> u16 {
    app.client
        .get(app.url("/v1/authz"))
        .header("X-API-Key", key)
        .header("X-Original-Method", "GET")
        .header("X-Original-URI", "/v1/one/x")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn concurrent_gateway_charges_on_two_instances_fire_one_balance_low_and_one_depleted() {
    // One instance group-commits, the other charges one statement at a time.
    let a = spawn_app_with(|c| {
        crate::gateway::gateway(c);
        c.database.pool_wait_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let b = spawn_app_on(a.db_name.clone(), |c| {
        crate::gateway::gateway(c);
        c.charge_coalescing = false;
        c.database.pool_wait_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let (account, key) = a.create_account("internal", 300).await;
    assert_eq!(put_threshold(&a, &key, json!(150)).await.status(), 200);

    // 300 → 100 in 200 authorizations of 1 over both instances: one crosses 150.
    let results = join_all((0..200).map(|i| authz(if i % 2 == 0 { &a } else { &b }, &key))).await;
    assert!(results.iter().all(|s| *s == 200), "{results:?}");
    assert_eq!(balance(&a, account).await.credits, 100);
    let low = events_of(&a, account, "balance.low").await;
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0]["balance"], 149);
    assert_eq!(low[0]["threshold"], 150);
    assert_eq!(low[0]["cause"], "charge");
    assert!(events_of(&a, account, "balance.depleted").await.is_empty());

    // 150 more against the 100 left: 100 allowed, the balance reaches 0 once.
    let results = join_all((0..150).map(|i| authz(if i % 2 == 0 { &a } else { &b }, &key))).await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for s in results {
        *by_status.entry(s).or_default() += 1;
    }
    assert_eq!(by_status.get(&200), Some(&100), "{by_status:?}");
    assert_eq!(by_status.get(&402), Some(&50), "{by_status:?}");
    let depleted = events_of(&a, account, "balance.depleted").await;
    assert_eq!(depleted.len(), 1, "{depleted:?}");
    assert_eq!(events_of(&a, account, "balance.low").await.len(), 1);

    // A top-up re-arms it; the next crossing, by a lone gateway charge, fires again.
    let res = a
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": 150, "reason": "top-up"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(authz(&b, &key).await, 200);
    let low = events_of(&a, account, "balance.low").await;
    assert_eq!(low.len(), 2, "{low:?}");
    assert_eq!(low[1]["balance"], 149);
    assert_ledger_invariant(&a).await;
}
