//! Credits: exact under concurrency, idempotent, reported.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::db::{assert_ledger_invariant, balance, database_url};
use crate::support::{assert_problem, spawn_app, spawn_app_with, TestApp};

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

#[tokio::test]
async fn two_hundred_concurrent_charges_against_ten_credits() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 10).await;
    let results = join_all((0..200).map(|_| charge(&app, &key, 1, None))).await;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for r in results {
        let s = r.status().as_u16();
        if s == 402 {
            let p: Value = r.json().await.unwrap();
            assert_eq!(p["type"], "insufficient_credits");
            assert_eq!(p["cost"], 1);
            assert_eq!(p["balance"], 0);
        }
        *by_status.entry(s).or_default() += 1;
    }
    assert_eq!(by_status.get(&201), Some(&10), "{by_status:?}");
    assert_eq!(by_status.get(&402), Some(&190), "{by_status:?}");
    let b = balance(&app, account).await;
    assert_eq!((b.credits, b.charges), (0, 10));
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_short_balance_is_402_with_balance_and_cost_and_writes_nothing() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 3).await;
    let p = assert_problem(
        charge(&app, &key, 5, None).await,
        402,
        "insufficient_credits",
    )
    .await;
    assert_eq!(p["balance"], 3);
    assert_eq!(p["cost"], 5);
    let n: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND kind = 'charge'",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_problem(charge(&app, &key, 0, None).await, 422, "validation_failed").await;
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn an_idempotent_retry_replays_and_charges_once() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 100).await;
    let first = charge(&app, &key, 7, Some("order-1")).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let again = charge(&app, &key, 7, Some("order-1")).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    // Same key, different body.
    assert_problem(
        charge(&app, &key, 8, Some("order-1")).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    // Keys are per account: another account may use the same key.
    let (_, other) = app.create_account("internal", 10).await;
    assert_eq!(charge(&app, &other, 7, Some("order-1")).await.status(), 201);
    assert_eq!(balance(&app, account).await.credits, 93);
    // A failed request frees its key: the fixed retry runs.
    assert_problem(
        charge(&app, &key, 1000, Some("order-2")).await,
        402,
        "insufficient_credits",
    )
    .await;
    assert_eq!(
        charge(&app, &key, 1000, Some("order-2")).await.status(),
        402
    );
    assert_problem(
        app.client
            .post(app.url("/v1/credits/charge"))
            .bearer_auth(&key)
            .header("Idempotency-Key", "x".repeat(256))
            .json(&json!({"amount": 1}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn concurrent_duplicates_of_one_idempotent_request_charge_once() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 1000).await;
    for round in 0..5 {
        let idem = format!("dup-{round}");
        let results = join_all((0..20).map(|_| charge(&app, &key, 3, Some(&idem)))).await;
        let mut created = 0;
        for r in results {
            match r.status().as_u16() {
                201 => created += 1,
                409 => {
                    let p: Value = r.json().await.unwrap();
                    assert_eq!(p["type"], "idempotency_conflict");
                }
                s => panic!("unexpected status {s}"),
            }
        }
        assert!(created >= 1);
    }
    let b = balance(&app, account).await;
    assert_eq!(
        (b.credits, b.charges),
        (1000 - 15, 5),
        "one charge per idempotency key"
    );
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn grants_adjustments_the_ledger_and_usage_report() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 0).await;
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": 50, "reason": "welcome"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["kind"], "grant");
    assert_eq!(m["balance_after"], 50);
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": -60, "reason": "oops"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": -5, "reason": "correction"}),
        )
        .await;
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["kind"], "adjustment");
    assert_eq!(m["balance_after"], 45);
    for _ in 0..3 {
        assert_eq!(charge(&app, &key, 2, None).await.status(), 201);
    }

    let summary: Value = app
        .get_with_key("/v1/credits", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(summary["balance"], 39);
    assert_eq!(summary["recent"].as_array().unwrap().len(), 5);
    assert_eq!(summary["recent"][0]["kind"], "charge");

    let page: Value = app
        .get_with_key("/v1/credits/ledger?kind=charge&limit=2", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    let next = page["next_cursor"].as_str().unwrap();
    let page2: Value = app
        .get_with_key(
            &format!("/v1/credits/ledger?kind=charge&limit=2&cursor={next}"),
            &key,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page2["data"].as_array().unwrap().len(), 1);
    assert_eq!(page2["has_more"], false);
    assert_problem(
        app.get_with_key("/v1/credits/ledger?kind=bogus", &key)
            .await,
        422,
        "validation_failed",
    )
    .await;

    let usage: Value = app
        .get_with_key("/v1/usage?granularity=day", &key)
        .await
        .json()
        .await
        .unwrap();
    let today = &usage["data"][0];
    assert_eq!(today["charged"], 6);
    assert_eq!(today["refunded"], 0);
    assert_eq!(today["charges"], 3);
    assert_eq!(usage["total"]["net"], 6);
    let empty: Value = app
        .get_with_key("/v1/usage?from=2020-01-01&to=2020-01-02", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(empty["data"].as_array().unwrap().len(), 0);
    assert_problem(
        app.get_with_key("/v1/usage?granularity=week", &key).await,
        422,
        "validation_failed",
    )
    .await;
    assert_problem(
        app.get_with_key("/v1/usage?from=yesterday", &key).await,
        422,
        "validation_failed",
    )
    .await;
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn concurrent_charges_to_one_account_share_commits_and_the_ledger_still_chains() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("internal", 200).await;
    let amounts: Vec<i64> = (0..300).map(|i| 1 + (i % 3)).collect();
    let results = join_all(amounts.iter().map(|a| charge(&app, &key, *a, None))).await;
    let mut spent = 0;
    for (r, a) in results.into_iter().zip(&amounts) {
        match r.status().as_u16() {
            201 => spent += a,
            402 => {}
            s => panic!("unexpected {s}"),
        }
    }
    let rows = app
        .db
        .query(
            "SELECT delta, balance_after, xmin::text FROM credit_ledger WHERE account_id = $1 ORDER BY id",
            &[&account],
        )
        .await
        .unwrap();
    // Every row's balance_after is the previous one plus its delta: the ledger reads as if
    // each charge had been made alone.
    let mut balance = 0i64;
    let mut txids = std::collections::HashSet::new();
    for r in &rows {
        let (delta, after): (i64, i64) = (r.get(0), r.get(1));
        balance += delta;
        assert_eq!(after, balance);
        assert!(after >= 0);
        txids.insert(r.get::<_, String>(2));
    }
    assert_eq!(balance, 200 - spent);
    assert!(
        200 - spent < 3,
        "credits left unspent although charges were refused: {}",
        200 - spent
    );
    assert!(
        txids.len() < rows.len(),
        "concurrent charges were coalesced into shared transactions ({} rows, {} transactions)",
        rows.len(),
        txids.len()
    );
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn concurrent_charges_over_many_accounts_share_commits_without_overspending() {
    let app = spawn_app().await;
    let mut accounts = Vec::new();
    for _ in 0..40 {
        accounts.push(app.create_account("internal", 5).await);
    }
    // Ten charges of 1 per account, all at once and interleaved: five succeed on each.
    let calls: Vec<&(uuid::Uuid, String)> = (0..10).flat_map(|_| accounts.iter()).collect();
    let results = join_all(calls.iter().map(|(_, key)| charge(&app, key, 1, None))).await;
    let mut ok: HashMap<uuid::Uuid, usize> = HashMap::new();
    for (r, (account, _)) in results.into_iter().zip(&calls) {
        match r.status().as_u16() {
            201 => *ok.entry(*account).or_default() += 1,
            402 => {}
            s => panic!("unexpected {s}"),
        }
    }
    for (account, _) in &accounts {
        assert_eq!(ok.get(account), Some(&5), "account {account}");
        let b = balance(&app, *account).await;
        assert_eq!((b.credits, b.charges), (0, 5));
    }
    // Every account's ledger still chains row by row.
    let rows = app
        .db
        .query(
            "SELECT account_id, delta, balance_after FROM credit_ledger ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let mut running: HashMap<uuid::Uuid, i64> = HashMap::new();
    for r in &rows {
        let b = running.entry(r.get(0)).or_default();
        *b += r.get::<_, i64>(1);
        assert_eq!(r.get::<_, i64>(2), *b);
    }
    // Some transaction charged more than one account.
    let shared: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM (SELECT xmin::text FROM credit_ledger WHERE kind = 'charge'
                GROUP BY 1 HAVING count(DISTINCT account_id) > 1) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(shared > 0, "no commit was shared between accounts");
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_batch_that_fails_writes_nothing_and_leaves_its_connection_usable() {
    // Two connections, so a connection left inside a failed transaction would be met again.
    let app = spawn_app_with(|c| {
        c.database.statement_timeout = Duration::from_millis(500);
        c.database.pool_size = 2;
    })
    .await;
    let (held, held_key) = app.create_account("internal", 100).await;
    let (other, other_key) = app.create_account("internal", 100).await;
    // Another transaction holds one account's row: every charge batched with it times out.
    let (mut locker, conn) =
        tokio_postgres::connect(&database_url(&app.db_name), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    let tx = locker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", &[&held])
        .await
        .unwrap();
    let keys: Vec<&String> = (0..10).flat_map(|_| [&held_key, &other_key]).collect();
    let first = join_all(keys.iter().map(|k| charge(&app, k, 1, None))).await;
    let statuses: Vec<u16> = first.iter().map(|r| r.status().as_u16()).collect();
    assert!(
        statuses.iter().all(|s| *s == 201 || *s >= 500),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| *s >= 500),
        "the held account's charges failed: {statuses:?}"
    );
    tx.rollback().await.unwrap();
    // Every connection is usable again, and everything charged from now on counts.
    let second = join_all(keys.iter().map(|k| charge(&app, k, 1, None))).await;
    assert!(second.iter().all(|r| r.status() == 201));
    let ok_first = |key: &String| {
        keys.iter()
            .zip(&statuses)
            .filter(|(k, s)| **k == key && **s == 201)
            .count() as i64
    };
    for (account, key) in [(held, &held_key), (other, &other_key)] {
        let charged = ok_first(key) + 10;
        let b = balance(&app, account).await;
        assert_eq!(
            (b.credits, b.charges),
            (100 - charged, charged),
            "one ledger row per 201"
        );
    }
    assert_ledger_invariant(&app).await;
}
