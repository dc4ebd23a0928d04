//! Auto-recharge (issue 15 §3), the credit events of the billing paths, and the one open
//! plan checkout: against the local Stripe stand-in (which answers the PaymentIntent calls
//! and counts them) with signed webhook deliveries built from Stripe's fixtures.

use std::time::Duration;

use futures_util::future::join_all;
use keymeter::config::{Pack, Plan};
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::stripe::{event, fixture, now, stand_in, LocalStripe, PiAnswer};
use crate::support::{assert_problem, spawn_app_on, spawn_app_with, TestApp};

const SECRET: &str = "whsec_test_recharge_0123456789";

fn configure(c: &mut keymeter::config::Config, base: &str) {
    c.billing.webhook_secrets = vec![SecretString::from(SECRET.to_owned())];
    c.billing.secret_key = Some(SecretString::from("sk_test_keymeter".to_owned()));
    c.billing.api_base = base.to_owned();
    c.billing.packs = vec![Pack {
        name: "small".into(),
        price_id: "price_small".into(),
        credits: 100,
    }];
    c.billing.plans = vec![Plan {
        name: "pro".into(),
        price_id: "price_pro".into(),
        tier: "pro".into(),
        monthly_credits: 5000,
    }];
}

async fn app_with_stripe() -> (TestApp, LocalStripe) {
    let stripe = stand_in().await;
    let base = stripe.base.clone();
    (spawn_app_with(move |c| configure(c, &base)).await, stripe)
}

async fn deliver(app: &TestApp, e: &Value) -> Value {
    let res = crate::support::stripe::deliver(app, SECRET, e).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// The account's Stripe customer, as checkout would have made it.
async fn customer(app: &TestApp, account: Uuid) {
    app.db
        .execute(
            "INSERT INTO billing_customers (account_id, customer_id) VALUES ($1, 'cus_local_1')",
            &[&account],
        )
        .await
        .unwrap();
}

/// A card saved the way a customer saves one without buying: a setup-mode Checkout Session
/// completes, and Stripe's copy of it names the card.
async fn save_card(app: &TestApp, stripe: &LocalStripe, account: Uuid) {
    let mut s = fixture("checkout.session");
    s["id"] = json!(format!("cs_test_{}", Uuid::new_v4().simple()));
    s["mode"] = json!("setup");
    s["status"] = json!("complete");
    s["payment_status"] = json!("no_payment_required");
    s["customer"] = json!("cus_local_1");
    s["client_reference_id"] = json!(account.to_string());
    s["payment_intent"] = Value::Null;
    s["setup_intent"] = json!("seti_local_1");
    stripe.knows_session_with_card(&s, "pm_card_saved");
    let ack = deliver(app, &event("checkout.session.completed", s, now())).await;
    assert_eq!(ack["outcome"], "payment_method_saved", "{ack}");
}

async fn put(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.client
        .put(app.url("/v1/billing/auto-recharge"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn charge(app: &TestApp, key: &str, amount: i64) -> reqwest::Response {
    app.post_json("/v1/credits/charge", key, json!({"amount": amount}))
        .await
}

/// Waits (up to 10 s) until the stand-in has had `n` PaymentIntent requests, then a little
/// longer so that any extra one would have arrived too; returns how many it had.
async fn payment_intent_requests(stripe: &LocalStripe, n: usize) -> usize {
    for _ in 0..100 {
        if stripe.requests_to("/v1/payment_intents").len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stripe.requests_to("/v1/payment_intents").len()
}

async fn settings(app: &TestApp, key: &str) -> Value {
    let res = app.get_with_key("/v1/billing/auto-recharge", key).await;
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn count(app: &TestApp, sql: &str, account: Uuid) -> i64 {
    app.db.query_one(sql, &[&account]).await.unwrap().get(0)
}

/// An account with `credits`, a saved card and auto-recharge on: below 100, buy `small`.
async fn recharging_account(
    app: &TestApp,
    stripe: &LocalStripe,
    credits: i64,
    max_per_month: i32,
) -> (Uuid, String) {
    let (account, key) = app.create_account("internal", credits).await;
    customer(app, account).await;
    save_card(app, stripe, account).await;
    let res = put(
        app,
        &key,
        json!({"enabled": true, "threshold": 100, "pack": "small", "max_per_month": max_per_month}),
    )
    .await;
    assert_eq!(res.status(), 200);
    (account, key)
}

#[tokio::test]
async fn enabling_auto_recharge_needs_a_saved_card_and_valid_settings() {
    let (app, stripe) = app_with_stripe().await;
    let (account, key) = app.create_account("internal", 500).await;
    let body = json!({"enabled": true, "threshold": 100, "pack": "small", "max_per_month": 3});
    assert_problem(
        put(&app, &key, body.clone()).await,
        409,
        "payment_method_required",
    )
    .await;
    let p = assert_problem(
        put(
            &app,
            &key,
            json!({"enabled": true, "threshold": 100, "pack": "huge", "max_per_month": 3}),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(p["field"], "pack");
    for bad in [
        json!({"enabled": true, "threshold": -1, "pack": "small", "max_per_month": 3}),
        json!({"enabled": true, "threshold": 100, "pack": "small", "max_per_month": 0}),
        json!({"enabled": true, "threshold": 100}),
        json!({"enabled": true, "threshold": 100, "pack": "small", "max_per_month": 3, "x": 1}),
    ] {
        assert_problem(put(&app, &key, bad).await, 422, "validation_failed").await;
    }
    // Nothing was stored by the refusals.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM billing_auto_recharge WHERE account_id = $1",
            account
        )
        .await,
        0
    );

    // A pack bought through keymeter's Checkout asks Stripe to keep the card...
    let res = app
        .post_json(
            "/v1/billing/checkout",
            &key,
            json!({"pack": "small", "success_url": "https://e.com/ok", "cancel_url": "https://e.com/no"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let session: Value = res.json().await.unwrap();
    let sent = crate::support::stripe::form(&stripe.requests_to("/v1/checkout/sessions")[0].2);
    assert_eq!(
        sent.get("payment_intent_data[setup_future_usage]")
            .map(String::as_str),
        Some("off_session")
    );
    // ...and once paid, the card Stripe's copy of the session names is kept.
    let mut s = fixture("checkout.session");
    s["id"] = session["id"].clone();
    s["mode"] = json!("payment");
    s["payment_status"] = json!("paid");
    s["status"] = json!("complete");
    s["customer"] = json!("cus_local_1");
    s["client_reference_id"] = json!(account.to_string());
    s["payment_intent"] = json!(format!("pi_{}", Uuid::new_v4().simple()));
    stripe.knows_session_with_card(&s, "pm_from_pack");
    let ack = deliver(&app, &event("checkout.session.completed", s, now())).await;
    assert_eq!(ack["outcome"], "credits_purchased");
    assert_eq!(settings(&app, &key).await["payment_method_saved"], true);
    let pm: String = app
        .db
        .query_one(
            "SELECT payment_method FROM billing_customers WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pm, "pm_from_pack");

    let res = put(&app, &key, body).await;
    assert_eq!(res.status(), 200);
    let s: Value = res.json().await.unwrap();
    assert_eq!(s["enabled"], true);
    assert_eq!(s["threshold"], 100);
    assert_eq!(s["max_per_month"], 3);

    // A card can also be saved without buying: a Checkout Session in setup mode.
    let res = app
        .post_json(
            "/v1/billing/auto-recharge/setup",
            &key,
            json!({"success_url": "https://e.com/ok", "cancel_url": "https://e.com/no"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let setup = crate::support::stripe::form(&stripe.requests_to("/v1/checkout/sessions")[1].2);
    assert_eq!(setup.get("mode").map(String::as_str), Some("setup"));
    assert_eq!(setup.get("currency").map(String::as_str), Some("usd"));
    assert_eq!(
        setup.get("customer").map(String::as_str),
        Some("cus_local_1")
    );
}

#[tokio::test]
async fn concurrent_charges_on_two_instances_start_exactly_one_recharge_credited_once() {
    let stripe = stand_in().await;
    let base = stripe.base.clone();
    let a = spawn_app_with({
        let base = base.clone();
        move |c| configure(c, &base)
    })
    .await;
    let b = spawn_app_on(a.db_name.clone(), move |c| configure(c, &base)).await;
    let (account, key) = recharging_account(&a, &stripe, 300, 5).await;
    // 60 charges of 5 over both instances: the balance crosses 100 once, on one of them.
    let results = join_all((0..60).map(|i| {
        let (app, key) = (if i % 2 == 0 { &a } else { &b }, key.clone());
        async move { charge(app, &key, 5).await.status().as_u16() }
    }))
    .await;
    assert!(results.iter().all(|s| *s == 201), "{results:?}");
    assert_eq!(balance(&a, account).await.credits, 0);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);

    let (_, idem, form) = stripe.requests_to("/v1/payment_intents")[0].clone();
    let f = crate::support::stripe::form(&form);
    assert_eq!(f.get("confirm").map(String::as_str), Some("true"));
    assert_eq!(f.get("off_session").map(String::as_str), Some("true"));
    assert_eq!(
        f.get("payment_method").map(String::as_str),
        Some("pm_card_saved")
    );
    assert_eq!(f.get("amount").map(String::as_str), Some("1000"));
    // The idempotency key names the charge's ledger row that crossed the threshold.
    let idem = idem.unwrap();
    let entry: i64 = idem.rsplit('-').next().unwrap().parse().unwrap();
    assert_eq!(idem, format!("keymeter-recharge-{account}-{entry}"));
    let crossed: i64 = a
        .db
        .query_one(
            "SELECT balance_after FROM credit_ledger WHERE id = $1 AND account_id = $2 AND kind = 'charge'",
            &[&entry, &account],
        )
        .await
        .unwrap()
        .get(0);
    assert!(crossed < 100, "{crossed}");

    // Stripe reports it paid, twice (and to both instances): credited once.
    let pi = stripe.payment_intents().pop().unwrap();
    let e = event("payment_intent.succeeded", pi.clone(), now());
    assert_eq!(deliver(&a, &e).await["outcome"], "auto_recharged");
    assert_eq!(deliver(&b, &e).await["duplicate"], true);
    let again = event("payment_intent.succeeded", pi, now());
    assert_eq!(deliver(&b, &again).await["outcome"], "already_recharged");
    assert_eq!(balance(&a, account).await.credits, 100);
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND kind = 'auto_recharge'",
            account
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM events WHERE account_id = $1 AND type = 'credits.granted' AND payload->>'source' = 'auto_recharge'",
            account
        )
        .await,
        1
    );
    let s = settings(&a, &key).await;
    assert_eq!(s["in_flight"], false);
    assert_eq!(s["recharges_this_month"], 1);
    let summary: Value = a
        .get_with_key("/v1/billing", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(summary["purchases"][0]["kind"], "auto_recharge");
    assert_ledger_invariant(&a).await;
}

#[tokio::test]
async fn cool_down_and_max_per_month_hold() {
    let (app, stripe) = app_with_stripe().await;
    let (account, key) = recharging_account(&app, &stripe, 110, 2).await;
    assert_eq!(charge(&app, &key, 20).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    let pi = stripe.payment_intents().pop().unwrap();
    deliver(&app, &event("payment_intent.succeeded", pi, now())).await;
    assert_eq!(balance(&app, account).await.credits, 190);

    // Below the threshold again within the cool-down: no second recharge.
    assert_eq!(charge(&app, &key, 100).await.status(), 201);
    assert_eq!(charge(&app, &key, 1).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 2).await, 1);

    // Ten minutes later (moved back in the database), the next charge recharges — this
    // one with an Idempotency-Key, the single-statement charge rather than the lane.
    let pass_ten_minutes = "UPDATE billing_auto_recharge SET last_started_at = last_started_at - interval '11 minutes' WHERE account_id = $1";
    app.db.execute(pass_ten_minutes, &[&account]).await.unwrap();
    app.db
        .execute(
            "UPDATE accounts SET recharge_after = recharge_after - interval '11 minutes' WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    let res = app
        .client
        .post(app.url("/v1/credits/charge"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "cool-down-over")
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 2).await, 2);
    let pi = stripe.payment_intents().pop().unwrap();
    deliver(&app, &event("payment_intent.succeeded", pi, now())).await;

    // Two this month is the cap: ten more minutes later, nothing.
    assert_eq!(charge(&app, &key, 150).await.status(), 201);
    app.db.execute(pass_ten_minutes, &[&account]).await.unwrap();
    app.db
        .execute(
            "UPDATE accounts SET recharge_after = least(recharge_after, now()) WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    assert_eq!(charge(&app, &key, 1).await.status(), 201);
    assert_eq!(charge(&app, &key, 1).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 3).await, 2);
    assert_eq!(settings(&app, &key).await["recharges_this_month"], 2);
    // The cap held the signal back to next month: charges no longer wake anyone.
    let held: bool = app
        .db
        .query_one(
            "SELECT recharge_after >= date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month' - interval '1 day' FROM accounts WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert!(held);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_declined_or_unauthenticated_recharge_turns_auto_recharge_off_with_the_reason() {
    // Stripe refuses the off-session confirmation: the bank wants the customer.
    let (app, stripe) = app_with_stripe().await;
    *stripe.pi_answer.lock().unwrap() = PiAnswer::Declined("authentication_required", None);
    let (account, key) = recharging_account(&app, &stripe, 120, 5).await;
    assert_eq!(charge(&app, &key, 30).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    let mut summary = Value::Null;
    for _ in 0..50 {
        summary = app
            .get_with_key("/v1/billing", &key)
            .await
            .json()
            .await
            .unwrap();
        if summary["auto_recharge"]["enabled"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary["auto_recharge"]["enabled"], false, "{summary}");
    assert_eq!(
        summary["auto_recharge"]["disabled_reason"],
        "authentication_required"
    );
    assert_eq!(balance(&app, account).await.credits, 90);
    // Off: further charges start nothing.
    assert_eq!(charge(&app, &key, 1).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 2).await, 1);

    // Accepted at first, then failed by webhook (an asynchronous decline).
    let (app, stripe) = app_with_stripe().await;
    *stripe.pi_answer.lock().unwrap() = PiAnswer::Processing;
    let (account, key) = recharging_account(&app, &stripe, 120, 5).await;
    assert_eq!(charge(&app, &key, 30).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    let mut pi = stripe.payment_intents().pop().unwrap();
    pi["status"] = json!("requires_payment_method");
    pi["last_payment_error"] = json!({"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"});
    let e = event("payment_intent.payment_failed", pi.clone(), now());
    assert_eq!(deliver(&app, &e).await["outcome"], "auto_recharge_disabled");
    let s = settings(&app, &key).await;
    assert_eq!(s["enabled"], false);
    assert_eq!(s["disabled_reason"], "card_declined: insufficient_funds");
    assert_eq!(s["in_flight"], false);
    assert_eq!(balance(&app, account).await.credits, 90);
    // Enabling again clears the reason.
    let res = put(&app, &key, json!({"enabled": true})).await;
    assert_eq!(res.status(), 200);
    let s: Value = res.json().await.unwrap();
    assert_eq!(s["enabled"], true);
    assert_eq!(s["disabled_reason"], Value::Null);

    // Stripe answers requires_action at once (the bank wants the customer): off too.
    let (app, stripe) = app_with_stripe().await;
    *stripe.pi_answer.lock().unwrap() = PiAnswer::RequiresAction;
    let (_, key) = recharging_account(&app, &stripe, 120, 5).await;
    assert_eq!(charge(&app, &key, 30).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    let mut s = Value::Null;
    for _ in 0..50 {
        s = settings(&app, &key).await;
        if s["enabled"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s["disabled_reason"], "authentication_required", "{s}");

    // requires_action as a webhook turns it off too.
    let (app, stripe) = app_with_stripe().await;
    *stripe.pi_answer.lock().unwrap() = PiAnswer::Processing;
    let (_, key) = recharging_account(&app, &stripe, 120, 5).await;
    assert_eq!(charge(&app, &key, 30).await.status(), 201);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    let pi = stripe.payment_intents().pop().unwrap();
    deliver(&app, &event("payment_intent.requires_action", pi, now())).await;
    assert_eq!(
        settings(&app, &key).await["disabled_reason"],
        "authentication_required"
    );
}

#[tokio::test]
async fn purchases_and_clawbacks_record_their_credit_events_once() {
    let (app, stripe) = app_with_stripe().await;
    let (account, _) = app.create_account("internal", 0).await;
    let mut s = fixture("checkout.session");
    s["id"] = json!(format!("cs_test_{}", Uuid::new_v4().simple()));
    s["mode"] = json!("payment");
    s["payment_status"] = json!("paid");
    s["status"] = json!("complete");
    s["client_reference_id"] = json!(account.to_string());
    let pi = format!("pi_{}", Uuid::new_v4().simple());
    s["payment_intent"] = json!(pi);
    stripe.knows_session(&s, "price_small", 1);
    let e = event("checkout.session.completed", s, now());
    deliver(&app, &e).await;
    deliver(&app, &e).await;
    let granted = app
        .db
        .query(
            "SELECT payload FROM events WHERE account_id = $1 AND type = 'credits.granted'",
            &[&account],
        )
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    let p: Value = granted[0].get(0);
    let entry: i64 = app
        .db
        .query_one(
            "SELECT id FROM credit_ledger WHERE account_id = $1 AND kind = 'purchase'",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(p["amount"], 100);
    assert_eq!(p["source"], "purchase");
    assert_eq!(p["ledger_entry"], entry);

    // A partial refund, then a dispute: one clawed_back event each, with its ledger row.
    let mut charge_obj = fixture("charge");
    charge_obj["payment_intent"] = json!(pi);
    charge_obj["amount"] = json!(1000);
    charge_obj["amount_refunded"] = json!(500);
    let e = event("charge.refunded", charge_obj, now());
    deliver(&app, &e).await;
    deliver(&app, &e).await;
    let mut d = fixture("dispute");
    d["payment_intent"] = json!(pi);
    d["status"] = json!("needs_response");
    deliver(&app, &event("charge.dispute.created", d, now())).await;
    let clawed = app
        .db
        .query(
            "SELECT payload->>'source', (payload->>'amount')::bigint, (payload->>'ledger_entry')::bigint
               FROM events WHERE account_id = $1 AND type = 'credits.clawed_back' ORDER BY seq",
            &[&account],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64)> = clawed.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![("refund".to_owned(), 50), ("dispute".to_owned(), 50)]
    );
    for r in &clawed {
        let id: i64 = r.get(2);
        let kind: String = app
            .db
            .query_one("SELECT kind FROM credit_ledger WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert!(kind == "clawback" || kind == "dispute", "{kind}");
    }
    assert_eq!(balance(&app, account).await.credits, 0);
}

#[tokio::test]
async fn racing_plan_checkouts_open_exactly_one_session() {
    let stripe = stand_in().await;
    let base = stripe.base.clone();
    let a = spawn_app_with({
        let base = base.clone();
        move |c| configure(c, &base)
    })
    .await;
    let b = spawn_app_on(a.db_name.clone(), move |c| configure(c, &base)).await;
    let (account, key) = a.create_account("internal", 0).await;
    customer(&a, account).await;
    let body =
        json!({"plan": "pro", "success_url": "https://e.com/ok", "cancel_url": "https://e.com/no"});
    let results = join_all((0..10).map(|i| {
        let (app, key, body) = (if i % 2 == 0 { &a } else { &b }, key.clone(), body.clone());
        async move { app.post_json("/v1/billing/checkout", &key, body).await }
    }))
    .await;
    let mut created = 0;
    for r in results {
        match r.status().as_u16() {
            201 => created += 1,
            _ => {
                let p = assert_problem(r, 409, "plan_active").await;
                assert!(p["checkout"].is_string(), "{p}");
            }
        }
    }
    assert_eq!(created, 1);
    assert_eq!(stripe.requests_to("/v1/checkout/sessions").len(), 1);
    let (session,): (String,) =
        a.db.query_one(
            "SELECT session_id FROM billing_checkouts WHERE account_id = $1 AND plan_open",
            &[&account],
        )
        .await
        .map(|r| (r.get(0),))
        .unwrap();
    assert!(session.starts_with("cs_local_"), "{session}");

    // Abandoned: once Stripe expires the session, a new plan checkout may open.
    let mut s = fixture("checkout.session");
    s["id"] = json!(session);
    s["mode"] = json!("subscription");
    s["status"] = json!("expired");
    s["payment_status"] = json!("unpaid");
    let ack = deliver(&a, &event("checkout.session.expired", s, now())).await;
    assert_eq!(ack["outcome"], "plan_checkout_closed");
    let res = b.post_json("/v1/billing/checkout", &key, body).await;
    assert_eq!(res.status(), 201);
}

/// One gateway authorization of `/v1/search/*` (2 credits); its charge id when allowed.
/// The charge id of an allowed authorization, or the refusal's status and body (so a failed
/// assertion says why a call was refused).
async fn authz(app: &TestApp, key: &str) -> Result<i64, String> {
    let res = app
        .client
        .get(app.url("/v1/authz"))
        .header("X-API-Key", key)
        .header("X-Original-Method", "GET")
        .header("X-Original-URI", "/v1/search/x")
        .send()
        .await
        .unwrap();
    if res.status() != 200 {
        return Err(format!(
            "{} {}",
            res.status(),
            res.text().await.unwrap_or_default()
        ));
    }
    Ok(res.headers()["x-keymeter-charge"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap())
}

#[tokio::test]
async fn gateway_charges_crossing_the_threshold_start_exactly_one_recharge() {
    let stripe = stand_in().await;
    let base = stripe.base.clone();
    let a = spawn_app_with({
        let base = base.clone();
        move |c| {
            configure(c, &base);
            crate::gateway::gateway(c);
        }
    })
    .await;
    let b = spawn_app_on(a.db_name.clone(), move |c| {
        configure(c, &base);
        crate::gateway::gateway(c);
        c.charge_coalescing = false;
    })
    .await;
    let (account, key) = recharging_account(&a, &stripe, 300, 5).await;
    // 150 authorizations of 2 over both instances: the balance crosses 100 once.
    let results = join_all((0..150).map(|i| authz(if i % 2 == 0 { &a } else { &b }, &key))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(balance(&a, account).await.credits, 0);
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    // Its idempotency key names the gateway charge that crossed.
    let (_, idem, _) = stripe.requests_to("/v1/payment_intents")[0].clone();
    let entry: i64 = idem.unwrap().rsplit('-').next().unwrap().parse().unwrap();
    assert!(results.contains(&Ok(entry)), "{entry}");
    let row =
        a.db.query_one(
            "SELECT l.balance_after, g.route FROM credit_ledger l
               JOIN gateway_charges g ON g.ledger_id = l.id
              WHERE l.id = $1 AND l.account_id = $2",
            &[&entry, &account],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) < 100);
    assert_eq!(row.get::<_, String>(1), "GET /v1/search/*");

    assert_ledger_invariant(&a).await;
}

#[tokio::test]
async fn a_lone_gateway_charge_crossing_the_threshold_starts_the_recharge() {
    let stripe = stand_in().await;
    let base = stripe.base.clone();
    // One statement per charge: the crossing is noticed by the charge statement itself.
    let app = spawn_app_with(move |c| {
        configure(c, &base);
        crate::gateway::gateway(c);
        c.charge_coalescing = false;
    })
    .await;
    let (account, key) = recharging_account(&app, &stripe, 102, 5).await;
    assert!(authz(&app, &key).await.is_ok(), "102 → 100: not below");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(stripe.requests_to("/v1/payment_intents").is_empty());
    let crossed = authz(&app, &key).await.expect("allowed");
    assert_eq!(payment_intent_requests(&stripe, 1).await, 1);
    let (_, idem, _) = stripe.requests_to("/v1/payment_intents")[0].clone();
    assert_eq!(
        idem.unwrap(),
        format!("keymeter-recharge-{account}-{crossed}")
    );
    assert_eq!(balance(&app, account).await.credits, 98);
    assert_ledger_invariant(&app).await;
}
