//! Expiring credit grants (issue 16 §3): spent first, earliest expiry first; the unspent
//! rest leaves with one `expiry` row and a `credits.expired` event; exact when charges race
//! the expiry on two instances.

use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::{assert_problem, spawn_app_on, spawn_app_with, TestApp};

const FAST_SWEEP: Duration = Duration::from_millis(100);

fn in_secs(s: f64) -> String {
    (Utc::now() + chrono::Duration::milliseconds((s * 1000.0) as i64))
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn grant(app: &TestApp, account: uuid::Uuid, amount: i64, expires_at: Option<String>) {
    let mut body = json!({"amount": amount, "reason": "promotion"});
    if let Some(at) = expires_at {
        body["expires_at"] = json!(at);
    }
    let res = app
        .admin_post(&format!("/admin/accounts/{account}/credits"), body)
        .await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
}

async fn charge(app: &TestApp, key: &str, amount: i64) -> u16 {
    app.post_json("/v1/credits/charge", key, json!({"amount": amount}))
        .await
        .status()
        .as_u16()
}

async fn credits(app: &TestApp, key: &str) -> Value {
    let res = app.get_with_key("/v1/credits", key).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Waits until every open grant of the account that expires within the next 10 s has
/// expired and been swept.
async fn wait_for_expiry(app: &TestApp, account: uuid::Uuid) {
    let target: Option<chrono::DateTime<Utc>> = app
        .db
        .query_one(
            "SELECT max(expires_at) FROM credit_grants
              WHERE account_id = $1 AND expired_at IS NULL
                AND expires_at < now() + interval '10 seconds'",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    let Some(target) = target else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM credit_grants
                  WHERE account_id = $1 AND expired_at IS NULL AND expires_at <= $2",
                &[&account, &target],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the grant never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn expiry_rows(app: &TestApp, account: uuid::Uuid) -> Vec<(i64, i64)> {
    app.db
        .query(
            "SELECT id, delta FROM credit_ledger WHERE account_id = $1 AND kind = 'expiry' ORDER BY id",
            &[&account],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn expired_events(app: &TestApp, account: uuid::Uuid) -> Vec<Value> {
    app.db
        .query(
            "SELECT payload FROM events WHERE account_id = $1 AND type = 'credits.expired' ORDER BY seq",
            &[&account],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn expiring_credits_are_spent_first_earliest_expiry_first_and_the_rest_expires() {
    let app = spawn_app_with(|c| c.expiry_sweep_every = FAST_SWEEP).await;
    // 100 credits that never expire, then a grant for an hour and one for two seconds.
    let (account, key) = app.create_account("internal", 100).await;
    grant(&app, account, 50, Some(in_secs(3600.0))).await;
    grant(&app, account, 40, Some(in_secs(2.0))).await;
    assert_eq!(charge(&app, &key, 30).await, 201);

    let c = credits(&app, &key).await;
    assert_eq!(c["balance"], 160);
    let grants = c["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 2, "{c}");
    assert_eq!(
        (&grants[0]["amount"], &grants[0]["remaining"]),
        (&json!(40), &json!(10))
    );
    assert_eq!(
        (&grants[1]["amount"], &grants[1]["remaining"]),
        (&json!(50), &json!(50))
    );
    assert!(grants[0]["expires_at"].is_string());

    wait_for_expiry(&app, account).await;
    let rows = expiry_rows(&app, account).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, -10, "only the unspent rest leaves");
    let events = expired_events(&app, account).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["expired"], 10);
    assert_eq!(events[0]["amount"], 40);
    assert_eq!(events[0]["balance"], 150);
    assert_eq!(balance(&app, account).await.credits, 150);

    // The hour-long grant is next in line: 60 takes its 50, then 10 of the rest.
    assert_eq!(charge(&app, &key, 60).await, 201);
    let c = credits(&app, &key).await;
    assert_eq!(c["grants"][0]["remaining"], 0, "{c}");
    assert_eq!(c["balance"], 90);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_grant_spent_before_it_expires_leaves_nothing_to_expire() {
    let app = spawn_app_with(|c| c.expiry_sweep_every = FAST_SWEEP).await;
    let (account, key) = app.create_account("internal", 5).await;
    grant(&app, account, 20, Some(in_secs(1.5))).await;
    assert_eq!(charge(&app, &key, 22).await, 201);
    wait_for_expiry(&app, account).await;
    assert!(expiry_rows(&app, account).await.is_empty());
    assert!(expired_events(&app, account).await.is_empty());
    assert_eq!(balance(&app, account).await.credits, 3);
    assert_eq!(credits(&app, &key).await["grants"], json!([]));
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn charges_racing_the_expiry_on_two_instances_never_overspend_nor_expire_spent_credits() {
    let a = spawn_app_with(|c| c.expiry_sweep_every = FAST_SWEEP).await;
    let b = spawn_app_on(a.db_name.clone(), |c| c.expiry_sweep_every = FAST_SWEEP).await;
    let (account, key) = a.create_account("internal", 100_000).await;
    grant(&a, account, 100_000, Some(in_secs(1.5))).await;

    // 8 tasks per instance, each charging 1–3 credits every ~20 ms for 3 s: the expiry
    // lands in the middle of them.
    let started = Instant::now();
    let tasks = (0..16).map(|t| {
        let (app, key) = (if t % 2 == 0 { &a } else { &b }, key.clone());
        async move {
            let mut spent = 0i64;
            let mut n = 0i64;
            while started.elapsed() < Duration::from_secs(3) {
                let amount = 1 + (n + t) % 3;
                assert_eq!(charge(app, &key, amount).await, 201);
                spent += amount;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            spent
        }
    });
    let spent: i64 = join_all(tasks).await.into_iter().sum();
    wait_for_expiry(&a, account).await;

    // Charges spend the expiring grant first, so what leaves at expiry is exactly the grant
    // less what was charged before the expiry row (in ledger order, which is the order of
    // the account's row lock).
    let rows = expiry_rows(&a, account).await;
    let expiry_id = rows.first().map_or(i64::MAX, |r| r.0);
    let charged_before: i64 =
        a.db.query_one(
            "SELECT COALESCE(-sum(delta), 0)::bigint FROM credit_ledger
              WHERE account_id = $1 AND kind = 'charge' AND id < $2",
            &[&account, &expiry_id],
        )
        .await
        .unwrap()
        .get(0);
    let expected = (100_000 - charged_before).max(0);
    assert!(
        charged_before > 0 && expected > 0,
        "the race did not happen: {charged_before} charged before the expiry"
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(-rows[0].1, expected);
    let events = expired_events(&a, account).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["expired"], expected);
    let final_balance = balance(&a, account).await.credits;
    assert_eq!(final_balance, 200_000 - spent - expected);
    let (expiring, closed): (i64, i64) = {
        let r = a
            .db
            .query_one(
                "SELECT expiring_credits,
                        (SELECT count(*) FROM credit_grants WHERE account_id = $1 AND expired_at IS NOT NULL)
                   FROM accounts WHERE id = $1",
                &[&account],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((expiring, closed), (0, 1));
    assert_ledger_invariant(&a).await;
}

#[tokio::test]
async fn an_expiry_in_the_past_or_on_an_adjustment_is_refused() {
    let app = spawn_app_with(|c| c.expiry_sweep_every = FAST_SWEEP).await;
    let (account, _) = app.create_account("internal", 5).await;
    let path = format!("/admin/accounts/{account}/credits");
    for body in [
        json!({"amount": 10, "reason": "late", "expires_at": in_secs(-60.0)}),
        json!({"amount": -1, "reason": "down", "expires_at": in_secs(60.0)}),
    ] {
        assert_problem(app.admin_post(&path, body).await, 422, "validation_failed").await;
    }
    assert_eq!(balance(&app, account).await.credits, 5);
    let grants: i64 = app
        .db
        .query_one("SELECT count(*) FROM credit_grants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(grants, 0);
}

#[tokio::test]
async fn signup_credits_with_a_ttl_are_an_expiring_grant() {
    let app = spawn_app_with(|c| {
        c.signup_credits = 25;
        c.signup_credits_ttl = Some(Duration::from_secs(7 * 86_400));
    })
    .await;
    let res = app
        .signup("trial@example.com", "correct horse battery")
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let key = body["api_key"]["key"].as_str().unwrap().to_owned();
    let c = credits(&app, &key).await;
    assert_eq!(c["balance"], 25);
    let g = &c["grants"][0];
    assert_eq!((&g["amount"], &g["remaining"]), (&json!(25), &json!(25)));
    let at: chrono::DateTime<Utc> = g["expires_at"].as_str().unwrap().parse().unwrap();
    let days = (at - Utc::now()).num_hours() as f64 / 24.0;
    assert!((6.9..=7.0).contains(&days), "{days}");
}

#[tokio::test]
async fn the_cli_grants_expiring_credits_with_expires_at() {
    use crate::support::db::database_url;
    use crate::support::process::{keymeter, run_to_end};

    let app = spawn_app_with(|c| c.expiry_sweep_every = FAST_SWEEP).await;
    let (account, key) = app.create_account("internal", 0).await;
    let account_arg = account.to_string();
    let at = in_secs(3600.0);
    let cli = |expires_at: String| {
        let mut c = keymeter();
        c.args([
            "admin",
            "grant-credits",
            "--account",
            &account_arg,
            "--amount",
            "30",
            "--reason",
            "trial",
            "--expires-at",
            &expires_at,
        ])
        .env("DATABASE_URL", database_url(&app.db_name));
        run_to_end(c, Duration::from_secs(30))
    };
    let (code, out, err) = cli(at.clone());
    assert_eq!(code, 0, "{out} {err}");
    let c = credits(&app, &key).await;
    assert_eq!(c["balance"], 30);
    let g = &c["grants"][0];
    assert_eq!((&g["amount"], &g["remaining"]), (&json!(30), &json!(30)));
    let want: chrono::DateTime<Utc> = at.parse().unwrap();
    let got: chrono::DateTime<Utc> = g["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(got, want);

    let (code, _, err) = cli(in_secs(-10.0));
    assert_ne!(code, 0);
    assert!(err.contains("expires_at"), "{err}");
    assert_eq!(balance(&app, account).await.credits, 30);
}

/// Gateway mode's authorizations are charged through the credits lane like every charge
/// (tagged as gateway charges); they too spend expiring credits first, alone and in a batch,
/// so an expiry never takes credits that were granted without one (nor bought ones).
#[tokio::test]
async fn gateway_charges_spend_expiring_credits_first() {
    let app = spawn_app_with(|c| {
        crate::gateway::gateway(c);
        c.expiry_sweep_every = FAST_SWEEP;
    })
    .await;
    let authz = |key: String| {
        let req = app
            .client
            .get(app.url("/v1/authz"))
            .header("X-API-Key", key)
            .header("X-Original-Method", "GET")
            .header("X-Original-URI", "/v1/search/x");
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Alone: one charge of 2 against 2 expiring credits.
    let (lone, lone_key) = app.create_account("pro", 10).await;
    grant(&app, lone, 2, Some(in_secs(3.0))).await;
    assert_eq!(authz(lone_key.clone()).await, 200);
    // Together: 8 concurrent charges of 2 against 16 expiring credits.
    let (many, many_key) = app.create_account("pro", 10).await;
    grant(&app, many, 16, Some(in_secs(3.0))).await;
    let statuses = join_all((0..8).map(|_| authz(many_key.clone()))).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    wait_for_expiry(&app, lone).await;
    wait_for_expiry(&app, many).await;
    // Everything expiring was spent: nothing left to expire, the plain 10 untouched.
    assert_eq!(balance(&app, lone).await.credits, 10);
    assert_eq!(balance(&app, many).await.credits, 10);
    assert_ledger_invariant(&app).await;
}
