//! Per-key spend limits and usage by key (#16 §4): every charge and refund names its key; a
//! key's limit is exact under concurrency across instances, fires its event once per
//! period, and leaves the account's other keys alone; usage splits per key, also as CSV.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::app::spawn_jobs_app;
use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::upstream::Upstream;
use crate::support::{assert_problem, spawn_app, spawn_app_on, spawn_app_with, TestApp};

async fn charge(app: &TestApp, key: &str, amount: i64, idem: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/v1/credits/charge"))
        .bearer_auth(key)
        .json(&json!({"amount": amount}));
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    req.send().await.unwrap()
}

/// A new key of the caller's account through `POST /v1/keys`: (id, key, body).
async fn new_key(app: &TestApp, caller: &str, body: Value) -> (String, String, Value) {
    let res = app.post_json("/v1/keys", caller, body).await;
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 201, "create key: {v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
        v,
    )
}

async fn patch_key(app: &TestApp, caller: &str, id: &str, body: Value) -> reqwest::Response {
    app.client
        .patch(app.url(&format!("/v1/keys/{id}")))
        .bearer_auth(caller)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn events_of(app: &TestApp, account: Uuid, type_: &str) -> Vec<Value> {
    app.db
        .query(
            "SELECT payload FROM events WHERE account_id = $1 AND type = $2 ORDER BY seq",
            &[&account, &type_],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn key_charges(app: &TestApp, key_id: &str) -> (i64, i64) {
    let r = app
        .db
        .query_one(
            "SELECT count(*), COALESCE(sum(-delta), 0)::bigint FROM credit_ledger
              WHERE key_id = $1 AND kind = 'charge'",
            &[&key_id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test]
async fn concurrent_charges_on_one_key_across_two_instances_spend_exactly_its_limit() {
    // One instance group-commits its charges, the other charges one statement at a time;
    // both decide against the same counter.
    // Both wait for a pooled connection as long as it takes: this is about exactness, and on a
    // busy machine a hundred one-at-a-time charges on one row could otherwise time out (503).
    let a = spawn_app_with(|c| c.database.pool_wait_timeout = Duration::from_secs(60)).await;
    let b = spawn_app_on(a.db_name.clone(), |c| {
        c.charge_coalescing = false;
        c.database.pool_wait_timeout = Duration::from_secs(60);
    })
    .await;
    let (account, admin_key) = a.create_account("internal", 10_000).await;
    let (capped_id, capped, created) = new_key(
        &a,
        &admin_key,
        json!({"name": "capped", "spend_limit": {"credits": 25, "period": "day"}}),
    )
    .await;
    assert_eq!(created["spend_limit"]["credits"], 25);
    assert_eq!(created["spend_limit"]["period"], "day");
    assert_eq!(created["spend_limit"]["spent"], 0);
    let (free_id, free, _) = new_key(&a, &admin_key, json!({"name": "free"})).await;

    // 200 charges of 1 credit, split over both instances, some with an Idempotency-Key.
    let results = join_all((0..200).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let idem = (i % 5 == 0).then(|| format!("cap-{i}"));
        let capped = capped.clone();
        async move { charge(app, &capped, 1, idem.as_deref()).await }
    }))
    .await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for r in results {
        let s = r.status().as_u16();
        if s == 402 {
            let p: Value = r.json().await.unwrap();
            assert_eq!(p["type"], "key_spend_limit_exceeded", "{p}");
            assert_eq!(p["key_id"], capped_id.as_str());
            assert_eq!(p["limit"], 25);
            assert_eq!(p["spent"], 25);
            assert_eq!(p["cost"], 1);
            assert_eq!(p["period"], "day");
            assert!(p["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"));
        }
        *by_status.entry(s).or_default() += 1;
    }
    assert_eq!(by_status.get(&201), Some(&25), "{by_status:?}");
    assert_eq!(by_status.get(&402), Some(&175), "{by_status:?}");
    assert_eq!(key_charges(&a, &capped_id).await, (25, 25));
    assert_eq!(balance(&a, account).await.credits, 10_000 - 25);

    let reached = events_of(&a, account, "key.spend_limit_reached").await;
    assert_eq!(reached.len(), 1, "{reached:?}");
    assert_eq!(reached[0]["key_id"], capped_id.as_str());
    assert_eq!(
        reached[0]["spend_limit"],
        json!({"credits": 25, "period": "day"})
    );
    assert_eq!(reached[0]["spent"], 25);

    // The account's other key is not limited by it, on either instance.
    for app in [&a, &b] {
        for _ in 0..30 {
            assert_eq!(charge(app, &free, 1, None).await.status(), 201);
        }
    }
    assert_eq!(key_charges(&a, &free_id).await, (60, 60));
    let view: Value = a
        .get_with_key(&format!("/v1/keys/{capped_id}"), &admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["spend_limit"]["spent"], 25);
    assert_ledger_invariant(&a).await;
}

#[tokio::test]
async fn a_new_period_resets_the_counter_and_the_event_fires_again() {
    let app = spawn_app().await;
    let (account, admin_key) = app.create_account("internal", 1_000).await;
    let (id, capped, _) = new_key(
        &app,
        &admin_key,
        json!({"spend_limit": {"credits": 10, "period": "month"}}),
    )
    .await;
    assert_eq!(charge(&app, &capped, 10, None).await.status(), 201);
    assert_problem(
        charge(&app, &capped, 1, None).await,
        402,
        "key_spend_limit_exceeded",
    )
    .await;
    // The database's clock decides the period: move the counter's period (and the event's
    // mark) a month back, as if the month had ended.
    app.db
        .execute(
            "UPDATE key_spend_limits
                SET period_start = period_start - interval '1 month',
                    reached_period = reached_period - interval '1 month'
              WHERE key_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let view: Value = app
        .get_with_key(&format!("/v1/keys/{id}"), &admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["spend_limit"]["spent"], 0, "{view}");
    assert_eq!(charge(&app, &capped, 4, None).await.status(), 201);
    assert_eq!(charge(&app, &capped, 6, None).await.status(), 201);
    assert_problem(
        charge(&app, &capped, 1, None).await,
        402,
        "key_spend_limit_exceeded",
    )
    .await;
    assert_eq!(
        events_of(&app, account, "key.spend_limit_reached")
            .await
            .len(),
        2
    );
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn patch_sets_changes_and_removes_a_limit() {
    let app = spawn_app().await;
    let (_, admin_key) = app.create_account("internal", 1_000).await;
    let (id, key, created) = new_key(&app, &admin_key, json!({"name": "k"})).await;
    assert!(created["spend_limit"].is_null());
    // Spent before the limit existed still counts in the period.
    assert_eq!(charge(&app, &key, 7, None).await.status(), 201);
    let res = patch_key(
        &app,
        &admin_key,
        &id,
        json!({"name": "renamed", "spend_limit": {"credits": 10, "period": "day"}}),
    )
    .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["name"], "renamed");
    assert_eq!(v["spend_limit"]["spent"], 7);
    let p = assert_problem(
        charge(&app, &key, 4, None).await,
        402,
        "key_spend_limit_exceeded",
    )
    .await;
    assert_eq!(p["spent"], 7);
    // Raising the credits keeps the period's count.
    let v: Value = patch_key(
        &app,
        &admin_key,
        &id,
        json!({"spend_limit": {"credits": 12, "period": "day"}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["spend_limit"]["spent"], 7);
    assert_eq!(charge(&app, &key, 4, None).await.status(), 201);
    // A name alone leaves the limit; null removes it.
    let v: Value = patch_key(&app, &admin_key, &id, json!({"name": "again"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["spend_limit"]["credits"], 12);
    let v: Value = patch_key(&app, &admin_key, &id, json!({"spend_limit": null}))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["spend_limit"].is_null());
    assert_eq!(charge(&app, &key, 100, None).await.status(), 201);
    let flag: bool = app
        .db
        .query_one(
            "SELECT key_spend_limits FROM accounts a JOIN api_keys k ON k.account_id = a.id
              WHERE k.id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !flag,
        "no limited key left: charges take the plain path again"
    );

    for bad in [
        json!({"spend_limit": {"credits": 0, "period": "day"}}),
        json!({"spend_limit": {"credits": 5, "period": "week"}}),
        json!({"spend_limit": {"credits": 5}}),
        json!({"name": ""}),
        json!({"nope": 1}),
    ] {
        assert_problem(
            patch_key(&app, &admin_key, &id, bad).await,
            422,
            "validation_failed",
        )
        .await;
    }
    assert_problem(
        patch_key(&app, &admin_key, "AAAAAAAAAAAA", json!({"name": "x"})).await,
        404,
        "not_found",
    )
    .await;
    // Another account's key is not found either.
    let (_, other) = app.create_account("internal", 0).await;
    assert_problem(
        patch_key(&app, &other, &id, json!({"spend_limit": null})).await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_limited_key_cannot_mint_or_unlock_a_bigger_spender() {
    let app = spawn_app().await;
    let (_, admin_key) = app.create_account("internal", 1_000).await;
    let (limited_id, limited, _) = new_key(
        &app,
        &admin_key,
        json!({"scopes": ["keys:manage", "read", "scrape"],
               "spend_limit": {"credits": 50, "period": "day"}}),
    )
    .await;
    // Inherited by default; a higher one, another period or none is refused.
    let (_, _, child) = new_key(&app, &limited, json!({"scopes": ["read"]})).await;
    assert_eq!(child["spend_limit"]["credits"], 50);
    for spend in [
        json!({"credits": 51, "period": "day"}),
        json!({"credits": 10, "period": "month"}),
    ] {
        assert_problem(
            app.post_json("/v1/keys", &limited, json!({"spend_limit": spend}))
                .await,
            403,
            "insufficient_scope",
        )
        .await;
    }
    assert_problem(
        patch_key(&app, &limited, &limited_id, json!({"spend_limit": null})).await,
        403,
        "insufficient_scope",
    )
    .await;
    let (_, _, small) = new_key(
        &app,
        &limited,
        json!({"spend_limit": {"credits": 5, "period": "day"}}),
    )
    .await;
    assert_eq!(small["spend_limit"]["credits"], 5);
    // Rotation carries the limit and what was spent.
    assert_eq!(charge(&app, &limited, 20, None).await.status(), 201);
    let res = app
        .post_json(
            &format!("/v1/keys/{limited_id}/rotate"),
            &admin_key,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let next: Value = res.json().await.unwrap();
    assert_eq!(next["spend_limit"]["credits"], 50);
    assert_eq!(next["spend_limit"]["spent"], 20);
}

#[tokio::test]
async fn jobs_count_against_the_key_and_their_refunds_give_back() {
    let up = Upstream::start().await;
    let app = spawn_jobs_app(&up.allow(), |_| {}).await;
    let (account, admin_key) = app.create_account("pro", 100).await;
    let (id, key, _) = new_key(
        &app,
        &admin_key,
        json!({"spend_limit": {"credits": 2, "period": "day"}}),
    )
    .await;
    // A failed job is refunded, and its credit goes back to the key's period.
    let res = app
        .scrape(&key, json!({"url": format!("{}/status/500", up.base)}))
        .await;
    let p = assert_problem(res, 502, "upstream_failed").await;
    assert_eq!(p["refunded"], true);
    let refund_key: Option<String> = app
        .db
        .query_one(
            "SELECT key_id FROM credit_ledger WHERE kind = 'refund' AND job_id = $1",
            &[&p["job_id"].as_str().unwrap().parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(refund_key.as_deref(), Some(id.as_str()));
    let spent: i64 = app
        .db
        .query_one(
            "SELECT spent FROM key_spend_limits WHERE key_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(spent, 0);
    // Two usable answers spend the limit; the third job is refused before anything is queued.
    for _ in 0..2 {
        let res = app
            .scrape(&key, json!({"url": format!("{}/page", up.base)}))
            .await;
        assert_eq!(res.status(), 200);
    }
    let jobs_before: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM jobs WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    let res = app
        .scrape(&key, json!({"url": format!("{}/page", up.base)}))
        .await;
    let p = assert_problem(res, 402, "key_spend_limit_exceeded").await;
    assert_eq!(p["cost"], 1);
    let jobs_after: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM jobs WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(jobs_before, jobs_after, "nothing queued");
    assert_eq!(
        events_of(&app, account, "key.spend_limit_reached")
            .await
            .len(),
        1
    );
    // The account's own key still runs jobs.
    let res = app
        .scrape(&admin_key, json!({"url": format!("{}/page", up.base)}))
        .await;
    assert_eq!(res.status(), 200);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn usage_breaks_down_per_key_and_exports_csv() {
    let app = spawn_app().await;
    let (account, admin_key) = app.create_account("internal", 1_000).await;
    let (a_id, a_key, _) = new_key(&app, &admin_key, json!({"name": "a"})).await;
    let (b_id, b_key, _) = new_key(&app, &admin_key, json!({"name": "b"})).await;
    for (key, amount) in [(&a_key, 3), (&a_key, 4), (&b_key, 10)] {
        assert_eq!(charge(&app, key, amount, None).await.status(), 201);
    }
    // A row from before keys were recorded.
    app.db
        .execute(
            "WITH a AS (UPDATE accounts SET credit_balance = credit_balance - 5 WHERE id = $1
                        RETURNING credit_balance)
             INSERT INTO credit_ledger (account_id, delta, balance_after, kind)
             SELECT $1, -5, credit_balance, 'charge' FROM a",
            &[&account],
        )
        .await
        .unwrap();
    let v: Value = app
        .get_with_key("/v1/usage?group_by=key", &admin_key)
        .await
        .json()
        .await
        .unwrap();
    let rows = v["data"].as_array().unwrap();
    let by_key: HashMap<Option<String>, i64> = rows
        .iter()
        .map(|r| {
            (
                r["key_id"].as_str().map(str::to_owned),
                r["charged"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_key.get(&Some(a_id.clone())), Some(&7), "{v}");
    assert_eq!(by_key.get(&Some(b_id.clone())), Some(&10), "{v}");
    assert_eq!(by_key.get(&None), Some(&5), "{v}");
    assert!(rows.iter().all(|r| r.get("key_id").is_some()));
    assert_eq!(v["total"]["charged"], 22);

    let v: Value = app
        .get_with_key(&format!("/v1/usage?key_id={a_id}"), &admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"]["charged"], 7);
    assert_eq!(v["data"][0]["charges"], 2);
    assert!(v["data"][0].get("key_id").is_none(), "not split: {v}");

    let res = app
        .get_with_key("/v1/usage?group_by=key&format=csv", &admin_key)
        .await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = res.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "start,key_id,charged,refunded,net,charges,refunds"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines
        .iter()
        .any(|l| l.contains(&format!(",{a_id},7,0,7,2,0"))));
    assert!(
        lines.iter().any(|l| l.ends_with("T00:00:00Z,,5,0,5,1,0")),
        "{csv}"
    );
    let csv = app
        .get_with_key(&format!("/v1/usage?format=csv&key_id={b_id}"), &admin_key)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        csv.lines().next(),
        Some("start,charged,refunded,net,charges,refunds")
    );
    assert!(
        csv.lines().nth(1).unwrap().ends_with(",10,0,10,1,0"),
        "{csv}"
    );

    // Bad parameters are problem+json, also when CSV was asked for.
    for (query, field) in [
        ("group_by=account&format=csv", "group_by"),
        ("key_id=short&format=csv", "key_id"),
        ("format=xml", "format"),
    ] {
        let p = assert_problem(
            app.get_with_key(&format!("/v1/usage?{query}"), &admin_key)
                .await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(p["field"], field, "{query}");
    }
}

/// One gateway authorization (`/v1/one/*` costs 1) with `key`, optionally with a request id.
async fn authz(app: &TestApp, key: &str, request_id: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .get(app.url("/v1/authz"))
        .header("X-API-Key", key)
        .header("X-Original-Method", "GET")
        .header("X-Original-URI", "/v1/one/x");
    if let Some(id) = request_id {
        req = req.header("X-Request-Id", id);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn gateway_authorizations_on_one_key_across_two_instances_spend_exactly_its_limit() {
    // As for the API's charges: one instance group-commits, the other charges one at a time.
    let a = spawn_app_with(|c| {
        crate::gateway::gateway(c);
        c.database.pool_wait_timeout = Duration::from_secs(60);
    })
    .await;
    let b = spawn_app_on(a.db_name.clone(), |c| {
        crate::gateway::gateway(c);
        c.charge_coalescing = false;
        c.database.pool_wait_timeout = Duration::from_secs(60);
    })
    .await;
    let (account, admin_key) = a.create_account("internal", 10_000).await;
    let (capped_id, capped, _) = new_key(
        &a,
        &admin_key,
        json!({"name": "capped", "scopes": ["read"], "spend_limit": {"credits": 25, "period": "day"}}),
    )
    .await;
    let (free_id, free, _) =
        new_key(&a, &admin_key, json!({"name": "free", "scopes": ["read"]})).await;

    // One with a request id first (retried below), then 200 authorizations of 1 credit,
    // split over both instances, a third of them with request ids of their own.
    let first = authz(&a, &capped, Some("cap-first")).await;
    assert_eq!(first.status(), 200);
    let first_charge = first.headers()["x-keymeter-charge"].clone();
    let results = join_all((0..200).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let id = (i % 3 == 0).then(|| format!("cap-{i}"));
        let capped = capped.clone();
        async move {
            let res = authz(app, &capped, id.as_deref()).await;
            (id, res)
        }
    }))
    .await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (id, r) in results {
        let s = r.status().as_u16();
        match s {
            200 => assert!(r.headers().get("x-keymeter-replayed").is_none(), "{id:?}"),
            402 => {
                let header: Value =
                    serde_json::from_str(r.headers()["x-keymeter-problem"].to_str().unwrap())
                        .unwrap();
                let p = assert_problem(r, 402, "key_spend_limit_exceeded").await;
                assert_eq!(header, p);
                assert_eq!(p["key_id"], capped_id.as_str());
                assert_eq!(p["limit"], 25);
                assert_eq!(p["spent"], 25);
                assert_eq!(p["cost"], 1);
                assert_eq!(p["period"], "day");
            }
            _ => panic!("authz answered {s}"),
        }
        *by_status.entry(s).or_default() += 1;
    }
    assert_eq!(by_status.get(&200), Some(&24), "{by_status:?}");
    assert_eq!(by_status.get(&402), Some(&176), "{by_status:?}");
    assert_eq!(key_charges(&a, &capped_id).await, (25, 25));
    assert_eq!(balance(&a, account).await.credits, 10_000 - 25);
    let reached = events_of(&a, account, "key.spend_limit_reached").await;
    assert_eq!(reached.len(), 1, "{reached:?}");
    assert_eq!(reached[0]["key_id"], capped_id.as_str());
    assert_eq!(reached[0]["spent"], 25);

    // At its limit, a proxy's retry of a request id already charged is still the one charge
    // (a replay, on either instance), not a refusal.
    for app in [&a, &b] {
        let res = authz(app, &capped, Some("cap-first")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-keymeter-replayed"], "true");
        assert_eq!(res.headers()["x-keymeter-charge"], first_charge);
    }
    // A refund in the period gives its credit back to the key: exactly one more call fits.
    let res = authz(&b, &free, None).await;
    assert_eq!(res.status(), 200, "the account's other key is not limited");
    let capped_charge: i64 =
        a.db.query_one(
            "SELECT max(id) FROM credit_ledger WHERE key_id = $1 AND kind = 'charge'",
            &[&capped_id],
        )
        .await
        .unwrap()
        .get(0);
    let res = a
        .client
        .post(a.url("/v1/gateway/refunds"))
        .bearer_auth(crate::gateway::SERVICE_TOKEN)
        .json(&json!({"charge": capped_charge}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let view: Value = a
        .get_with_key(&format!("/v1/keys/{capped_id}"), &admin_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["spend_limit"]["spent"], 24);
    assert_eq!(authz(&b, &capped, None).await.status(), 200);
    assert_eq!(authz(&a, &capped, None).await.status(), 402);
    assert_eq!(key_charges(&a, &free_id).await, (1, 1));
    assert_eq!(
        events_of(&a, account, "key.spend_limit_reached")
            .await
            .len(),
        1,
        "once per period"
    );
    assert_ledger_invariant(&a).await;
}
