//! Stripe billing: deliveries built from Stripe's published fixtures and signed the way
//! Stripe signs them (HMAC-SHA256 of "t.body", computed here independently of the server's
//! verifier); Checkout against a local Stripe-API server that records what it receives.

use futures_util::future::join_all;
use keymeter::config::{Pack, Plan};
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::stripe::{
    deliver_with, event, fixture, form, local_stripe, now, signature, stand_in, LocalStripe,
};
use crate::support::{assert_problem, spawn_app_with, TestApp};

const OLD_SECRET: &str = "whsec_test_old_0123456789";
const NEW_SECRET: &str = "whsec_test_new_9876543210";

/// Delivers `e` signed with the current secret.
async fn deliver(app: &TestApp, e: &Value) -> reqwest::Response {
    crate::support::stripe::deliver(app, NEW_SECRET, e).await
}

/// Billing with two webhook secrets (a rotation under way), two credit packs and two plans;
/// the Stripe API at `stripe_base` when given.
async fn billing_app(stripe_base: Option<String>) -> TestApp {
    spawn_app_with(move |c| {
        c.billing.webhook_secrets = vec![
            SecretString::from(OLD_SECRET.to_owned()),
            SecretString::from(NEW_SECRET.to_owned()),
        ];
        c.billing.secret_key = Some(SecretString::from("sk_test_keymeter".to_owned()));
        c.billing.packs = vec![
            pack("small", "price_small", 100),
            pack("large", "price_large", 1000),
        ];
        c.billing.plans = vec![
            plan("pro", "price_pro", "pro", 5000),
            plan("biz", "price_biz", "business", 20000),
        ];
        if let Some(b) = stripe_base {
            c.billing.api_base = b;
        }
    })
    .await
}

/// [`billing_app`] with the local Stripe stand-in, which a session keymeter did not record is
/// retrieved from.
async fn billing_app_with_stripe() -> (TestApp, LocalStripe) {
    let stripe = stand_in().await;
    (billing_app(Some(stripe.base.clone())).await, stripe)
}

/// A paid pack session Stripe knows, selling one `price`.
fn known_paid_session(stripe: &LocalStripe, account: Uuid, pack: &str, price: &str) -> Value {
    let s = paid_session(account, pack);
    stripe.knows_session(&s, price, 1);
    s
}

fn pack(name: &str, price_id: &str, credits: i64) -> Pack {
    Pack {
        name: name.to_owned(),
        price_id: price_id.to_owned(),
        credits,
    }
}

fn plan(name: &str, price_id: &str, tier: &str, monthly_credits: i64) -> Plan {
    Plan {
        name: name.to_owned(),
        price_id: price_id.to_owned(),
        tier: tier.to_owned(),
        monthly_credits,
    }
}

fn paid_session(account: Uuid, pack: &str) -> Value {
    let mut s = fixture("checkout.session");
    s["id"] = json!(format!("cs_test_{}", Uuid::new_v4().simple()));
    s["mode"] = json!("payment");
    s["payment_status"] = json!("paid");
    s["status"] = json!("complete");
    s["client_reference_id"] = json!(account.to_string());
    s["metadata"] = json!({"account_id": account.to_string(), "pack": pack});
    s["payment_intent"] = json!(format!("pi_{}", Uuid::new_v4().simple()));
    s
}

#[tokio::test]
async fn a_paid_checkout_buys_the_configured_credits_exactly_once() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    let e = event(
        "checkout.session.completed",
        known_paid_session(&stripe, account, "small", "price_small"),
        now(),
    );
    let res = deliver(&app, &e).await;
    assert_eq!(res.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 100);
    // Redelivered: 200, nothing changes.
    let res = deliver(&app, &e).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["duplicate"], true);
    assert_eq!(balance(&app, account).await.credits, 100);
    let row = app
        .db
        .query_one(
            "SELECT kind, delta, stripe_event_id FROM credit_ledger WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "purchase");
    assert_eq!(row.get::<_, i64>(1), 100);
    assert_eq!(row.get::<_, String>(2), e["id"].as_str().unwrap());

    // Metadata alone cannot name the amount: an unknown price credits nothing.
    let e = event(
        "checkout.session.completed",
        known_paid_session(&stripe, account, "galactic", "price_galactic"),
        now(),
    );
    assert_eq!(deliver(&app, &e).await.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 100);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn concurrent_deliveries_of_one_event_credit_once() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    let e = event(
        "checkout.session.completed",
        known_paid_session(&stripe, account, "large", "price_large"),
        now(),
    );
    let results = join_all((0..12).map(|_| deliver(&app, &e))).await;
    assert!(results.iter().all(|r| r.status() == 200));
    assert_eq!(balance(&app, account).await.credits, 1000);
    let n: i64 = app
        .db
        .query_one("SELECT count(*) FROM stripe_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn delayed_payments_credit_when_they_succeed() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    let mut s = known_paid_session(&stripe, account, "small", "price_small");
    s["payment_status"] = json!("unpaid");
    assert_eq!(
        deliver(&app, &event("checkout.session.completed", s.clone(), now()))
            .await
            .status(),
        200
    );
    assert_eq!(balance(&app, account).await.credits, 0);
    s["payment_status"] = json!("paid");
    let e = event("checkout.session.async_payment_succeeded", s.clone(), now());
    assert_eq!(deliver(&app, &e).await.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 100);
    // A different event for the same session does not fulfil it twice.
    let e2 = event("checkout.session.async_payment_succeeded", s, now());
    assert_eq!(deliver(&app, &e2).await.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 100);
}

#[tokio::test]
async fn forged_stale_and_unsigned_deliveries_are_refused_and_write_nothing() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    let e = event(
        "checkout.session.completed",
        known_paid_session(&stripe, account, "large", "price_large"),
        now(),
    );
    let body = serde_json::to_vec(&e).unwrap();
    let t = now();
    let mut tampered = e.clone();
    tampered["data"]["object"]["metadata"]["pack"] = json!("large");
    tampered["id"] = json!("evt_tampered");
    let tampered_body = serde_json::to_vec(&tampered).unwrap();
    for (b, header) in [
        (body.clone(), None),
        (body.clone(), Some("garbage".to_owned())),
        (
            body.clone(),
            Some(format!("t={t},v1={}", signature("whsec_forger", t, &body))),
        ),
        (
            body.clone(),
            Some(format!(
                "t={},v1={}",
                t - 301,
                signature(NEW_SECRET, t - 301, &body)
            )),
        ),
        (
            body.clone(),
            Some(format!(
                "t={},v1={}",
                t + 301,
                signature(NEW_SECRET, t + 301, &body)
            )),
        ),
        (
            tampered_body,
            Some(format!("t={t},v1={}", signature(NEW_SECRET, t, &body))),
        ),
    ] {
        let res = deliver_with(&app, &b, header).await;
        let p = assert_problem(res, 400, "invalid_signature").await;
        assert_eq!(p["detail"], "The signature could not be verified.");
    }
    let n: i64 = app
        .db
        .query_one("SELECT count(*) FROM stripe_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(balance(&app, account).await.credits, 0);

    // While a secret rolls: the old secret still verifies, and a match on any v1 passes.
    let header = format!(
        "t={t},v1={},v1={}",
        signature("whsec_unrelated", t, &body),
        signature(OLD_SECRET, t, &body)
    );
    assert_eq!(deliver_with(&app, &body, Some(header)).await.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 1000);
}

fn plan_invoice(customer: &str, subscription: &str, price: &str, account: Uuid) -> Value {
    let mut inv = fixture("invoice");
    inv["id"] = json!(format!("in_{}", Uuid::new_v4().simple()));
    inv["customer"] = json!(customer);
    inv["status"] = json!("paid");
    inv["billing_reason"] = json!("subscription_cycle");
    inv["amount_paid"] = json!(2000);
    inv["parent"] = json!({
        "type": "subscription_details",
        "quote_details": null,
        "subscription_details": {"subscription": subscription, "metadata": {"account_id": account.to_string(), "plan": "pro"}}
    });
    inv["lines"]["data"][0]["pricing"] = json!({"type": "price_details", "price_details": {"price": price, "product": "prod_x"}, "unit_amount_decimal": "2000"});
    inv
}

fn subscription(id: &str, customer: &str, price: &str, status: &str) -> Value {
    let mut s = fixture("subscription");
    s["id"] = json!(id);
    s["customer"] = json!(customer);
    s["status"] = json!(status);
    s["items"]["data"][0]["price"]["id"] = json!(price);
    s
}

#[tokio::test]
async fn plans_move_tiers_and_old_deliveries_never_overwrite_newer_ones() {
    let app = billing_app(None).await;
    let (account, _) = app.create_account("free", 0).await;
    let sub = "sub_test_plan";
    let t0 = now() - 100;
    // invoice.paid: the period's credits and the plan's tier.
    let e = event(
        "invoice.paid",
        plan_invoice("cus_unknown", sub, "price_pro", account),
        t0,
    );
    let res = deliver(&app, &e).await;
    assert_eq!(res.status(), 200);
    let b = balance(&app, account).await;
    assert_eq!((b.credits, b.tier.as_str()), (5000, "pro"));

    // Upgrade to biz at t0+10, cancellation at t0+20 …
    let up = event(
        "customer.subscription.updated",
        subscription(sub, "cus_unknown", "price_biz", "active"),
        t0 + 10,
    );
    let del = event(
        "customer.subscription.deleted",
        subscription(sub, "cus_unknown", "price_biz", "canceled"),
        t0 + 20,
    );
    // … delivered out of order: the cancellation first, then the older upgrade.
    assert_eq!(deliver(&app, &del).await.status(), 200);
    assert_eq!(balance(&app, account).await.tier, "free");
    let res = deliver(&app, &up).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["outcome"], "stale_ignored");
    assert_eq!(balance(&app, account).await.tier, "free");
    // A late invoice.paid from before the cancellation credits but does not restore the tier.
    let late = event(
        "invoice.paid",
        plan_invoice("cus_unknown", sub, "price_pro", account),
        t0 + 5,
    );
    assert_eq!(deliver(&app, &late).await.status(), 200);
    let b = balance(&app, account).await;
    assert_eq!((b.credits, b.tier.as_str()), (10000, "free"));
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_refund_claws_back_credits_even_below_zero_and_charges_stop() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, key) = app.create_account("internal", 0).await;
    let session = known_paid_session(&stripe, account, "small", "price_small");
    let pi = session["payment_intent"].as_str().unwrap().to_owned();
    assert_eq!(
        deliver(&app, &event("checkout.session.completed", session, now()))
            .await
            .status(),
        200
    );
    // Spend most of it.
    let res = app
        .post_json("/v1/credits/charge", &key, json!({"amount": 80}))
        .await;
    assert_eq!(res.status(), 201);
    // Half refunded, then all of it (Stripe reports the cumulative amount).
    let mut charge = fixture("charge");
    charge["payment_intent"] = json!(pi);
    charge["amount"] = json!(2000);
    charge["amount_refunded"] = json!(1000);
    charge["refunded"] = json!(false);
    assert_eq!(
        deliver(&app, &event("charge.refunded", charge.clone(), now()))
            .await
            .status(),
        200
    );
    assert_eq!(balance(&app, account).await.credits, -30);
    charge["amount_refunded"] = json!(2000);
    charge["refunded"] = json!(true);
    assert_eq!(
        deliver(&app, &event("charge.refunded", charge, now()))
            .await
            .status(),
        200
    );
    assert_eq!(balance(&app, account).await.credits, -80);
    let kinds: Vec<(String, i64)> = app
        .db
        .query(
            "SELECT kind, delta FROM credit_ledger WHERE account_id = $1 ORDER BY id",
            &[&account],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("purchase".to_owned(), 100),
            ("charge".to_owned(), -80),
            ("clawback".to_owned(), -50),
            ("clawback".to_owned(), -50)
        ]
    );
    let p = assert_problem(
        app.post_json("/v1/credits/charge", &key, json!({"amount": 1}))
            .await,
        402,
        "insufficient_credits",
    )
    .await;
    assert_eq!(p["balance"], -80);
    // Balance = Σ deltas still holds (negative balances are allowed only after a clawback).
    let sum: i64 = app
        .db
        .query_one(
            "SELECT sum(delta)::bigint FROM credit_ledger WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, -80);
}

#[tokio::test]
async fn other_event_types_are_recorded_and_ignored() {
    let app = billing_app(None).await;
    let e = fixture("event"); // plan.created, as Stripe publishes it
    let mut e = e;
    e["created"] = json!(now());
    let res = deliver(&app, &e).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["outcome"], "ignored");
    let outcome: String = app
        .db
        .query_one(
            "SELECT outcome FROM stripe_events WHERE id = $1",
            &[&e["id"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "ignored");
}

#[tokio::test]
async fn checkout_creates_a_session_on_stripe_with_the_expected_fields() {
    let (base, recorded) = local_stripe().await;
    let app = billing_app(Some(base)).await;
    let (account, key) = app.create_account("pro", 0).await;
    let res = app
        .client
        .post(app.url("/v1/billing/checkout"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "buy-1")
        .json(&json!({"pack": "small", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("cs_local_"));
    assert_eq!(body["url"], "https://checkout.stripe.com/c/pay/cs_local");
    // Replayed from our idempotency record: Stripe is not called again.
    let again = app
        .client
        .post(app.url("/v1/billing/checkout"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "buy-1")
        .json(&json!({"pack": "small", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let plan = app
        .post_json(
            "/v1/billing/checkout",
            &key,
            json!({"plan": "pro", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"}),
        )
        .await;
    assert_eq!(plan.status(), 201);

    let rec = recorded.lock().unwrap().clone();
    let paths: Vec<&str> = rec.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/v1/customers",
            "/v1/checkout/sessions",
            "/v1/checkout/sessions"
        ],
        "one customer, reused"
    );
    let customer = form(&rec[0].2);
    assert_eq!(customer["metadata[account_id]"], account.to_string());
    assert!(
        rec[0].1.is_some(),
        "customer creation carries an idempotency key"
    );
    let pack = form(&rec[1].2);
    assert_eq!(pack["mode"], "payment");
    assert_eq!(pack["customer"], "cus_local_1");
    assert_eq!(pack["client_reference_id"], account.to_string());
    assert_eq!(pack["line_items[0][price]"], "price_small");
    assert_eq!(pack["line_items[0][quantity]"], "1");
    assert_eq!(pack["metadata[pack]"], "small");
    assert_eq!(pack["success_url"], "https://example.com/ok");
    assert_eq!(
        rec[1].1.as_deref(),
        Some(format!("keymeter-checkout-{account}-buy-1").as_str())
    );
    let sub = form(&rec[2].2);
    assert_eq!(sub["mode"], "subscription");
    assert_eq!(sub["line_items[0][price]"], "price_pro");
    assert_eq!(sub["metadata[plan]"], "pro");

    // Bad input: 422, Stripe not called.
    let res = app
        .post_json(
            "/v1/billing/checkout",
            &key,
            json!({"pack": "nope", "success_url": "https://e.com", "cancel_url": "https://e.com"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .post_json("/v1/billing/checkout", &key, json!({"pack": "small", "plan": "pro", "success_url": "https://e.com", "cancel_url": "https://e.com"}))
        .await;
    assert_problem(res, 422, "validation_failed").await;
    assert_eq!(recorded.lock().unwrap().len(), 3);

    // The summary shows the customer.
    let summary: Value = app
        .get_with_key("/v1/billing", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(summary["stripe_customer"], "cus_local_1");
    assert_eq!(summary["tier"], "pro");
}

async fn ledger_kinds(app: &TestApp, account: Uuid) -> Vec<(String, i64)> {
    app.db
        .query(
            "SELECT kind, delta FROM credit_ledger WHERE account_id = $1 ORDER BY id",
            &[&account],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn outcome_of(app: &TestApp, e: &Value) -> Value {
    let res = deliver(app, e).await;
    assert_eq!(res.status(), 200);
    res.json::<Value>().await.unwrap()["outcome"].clone()
}

#[tokio::test]
async fn a_second_plan_checkout_is_refused_while_one_is_live() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, key) = app.create_account("free", 0).await;
    let order = json!({"plan": "pro", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"});
    assert_eq!(
        app.post_json("/v1/billing/checkout", &key, order.clone())
            .await
            .status(),
        201
    );
    // The first plan is paid: the subscription is live.
    let sub = format!("sub_{}", Uuid::new_v4().simple());
    let e = event(
        "invoice.paid",
        plan_invoice("cus_local_1", &sub, "price_pro", account),
        now(),
    );
    assert_eq!(outcome_of(&app, &e).await, "plan_period_paid");
    let sessions_before = stripe.requests_to("/v1/checkout/sessions").len();
    let p = assert_problem(
        app.post_json("/v1/billing/checkout", &key, order.clone())
            .await,
        409,
        "plan_active",
    )
    .await;
    assert_eq!(p["subscription"], sub.as_str());
    // Biz is refused too (a change goes through the portal); Stripe was not asked.
    let biz = json!({"plan": "biz", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"});
    assert_problem(
        app.post_json("/v1/billing/checkout", &key, biz).await,
        409,
        "plan_active",
    )
    .await;
    assert_eq!(
        stripe.requests_to("/v1/checkout/sessions").len(),
        sessions_before
    );
    // Packs stay on sale.
    let pack = json!({"pack": "small", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"});
    assert_eq!(
        app.post_json("/v1/billing/checkout", &key, pack)
            .await
            .status(),
        201
    );
    // Once the plan is cancelled, a new one can be bought.
    let del = event(
        "customer.subscription.deleted",
        subscription(&sub, "cus_local_1", "price_pro", "canceled"),
        now() + 1,
    );
    assert_eq!(outcome_of(&app, &del).await, "tier_reset");
    assert_eq!(
        app.post_json("/v1/billing/checkout", &key, order)
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn deleting_a_subscription_that_is_not_the_current_plan_changes_nothing() {
    let app = billing_app(None).await;
    let (account, _) = app.create_account("free", 0).await;
    let t0 = now() - 100;
    let current = format!("sub_{}", Uuid::new_v4().simple());
    let stray = format!("sub_{}", Uuid::new_v4().simple());
    let e = event(
        "invoice.paid",
        plan_invoice("cus_unknown", &current, "price_biz", account),
        t0,
    );
    assert_eq!(outcome_of(&app, &e).await, "plan_period_paid");
    assert_eq!(balance(&app, account).await.tier, "business");
    // A second subscription of the same account (e.g. opened on Stripe's dashboard) pays
    // and then ends: its credits were paid for, but the tier stays the current plan's.
    let mut inv = plan_invoice("cus_unknown", &stray, "price_pro", account);
    inv["parent"]["subscription_details"]["metadata"]["plan"] = json!("pro");
    assert_eq!(
        outcome_of(&app, &event("invoice.paid", inv, t0 + 1)).await,
        "plan_period_paid"
    );
    assert_eq!(balance(&app, account).await.tier, "business");
    let mut sub = subscription(&stray, "cus_unknown", "price_pro", "canceled");
    sub["metadata"] = json!({"account_id": account.to_string()});
    let del = event("customer.subscription.deleted", sub, t0 + 2);
    assert_eq!(outcome_of(&app, &del).await, "not_current_plan");
    let b = balance(&app, account).await;
    assert_eq!(b.tier, "business");
    let summary: (String, String) = app
        .db
        .query_one(
            "SELECT subscription_id, status FROM billing_subscriptions WHERE account_id = $1 AND current",
            &[&account],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(summary, (current.clone(), "active".to_owned()));
    // The current plan's own cancellation does reset the tier.
    let del = event(
        "customer.subscription.deleted",
        subscription(&current, "cus_unknown", "price_biz", "canceled"),
        t0 + 3,
    );
    assert_eq!(outcome_of(&app, &del).await, "tier_reset");
    assert_eq!(balance(&app, account).await.tier, "free");
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn an_invoice_credits_once_and_zero_or_proration_invoices_credit_nothing() {
    let app = billing_app(None).await;
    let (account, _) = app.create_account("free", 0).await;
    let sub = format!("sub_{}", Uuid::new_v4().simple());
    let inv = plan_invoice("cus_unknown", &sub, "price_pro", account);
    // Two different events about one invoice (e.g. invoice.paid sent again under a new
    // event id): one grant.
    assert_eq!(
        outcome_of(&app, &event("invoice.paid", inv.clone(), now())).await,
        "plan_period_paid"
    );
    assert_eq!(
        outcome_of(&app, &event("invoice.paid", inv.clone(), now())).await,
        "invoice_already_credited"
    );
    assert_eq!(balance(&app, account).await.credits, 5000);
    // A $0 invoice (trial, full discount) credits nothing but keeps the plan's tier.
    let mut free = plan_invoice("cus_unknown", &sub, "price_pro", account);
    free["amount_paid"] = json!(0);
    assert_eq!(
        outcome_of(&app, &event("invoice.paid", free, now())).await,
        "plan_invoice_without_credits"
    );
    // A proration invoice (a plan change mid-period) credits nothing either.
    let mut proration = plan_invoice("cus_unknown", &sub, "price_pro", account);
    proration["billing_reason"] = json!("subscription_update");
    assert_eq!(
        outcome_of(&app, &event("invoice.paid", proration, now())).await,
        "plan_invoice_without_credits"
    );
    let b = balance(&app, account).await;
    assert_eq!((b.credits, b.tier.as_str()), (5000, "pro"));
    let n: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM billing_invoices WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    // The next renewal credits again.
    let renewal = plan_invoice("cus_unknown", &sub, "price_pro", account);
    assert_eq!(
        outcome_of(&app, &event("invoice.paid", renewal, now())).await,
        "plan_period_paid"
    );
    assert_eq!(balance(&app, account).await.credits, 10000);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn an_unrecorded_session_is_fulfilled_only_from_what_stripe_says_was_bought() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    // Metadata claims the large pack; Stripe's line items say two small ones.
    let s = paid_session(account, "large");
    stripe.knows_session(&s, "price_small", 2);
    let e = event("checkout.session.completed", s.clone(), now());
    assert_eq!(outcome_of(&app, &e).await, "credits_purchased");
    assert_eq!(balance(&app, account).await.credits, 200);
    let retrievals = stripe.requests_to(&format!(
        "/v1/checkout/sessions/{}",
        s["id"].as_str().unwrap()
    ));
    assert_eq!(retrievals.len(), 1);
    assert!(
        retrievals[0].2.contains("line_items"),
        "retrieved with its line items: {}",
        retrievals[0].2
    );
    // A session Stripe does not know: nothing, whatever its metadata says.
    let e = event(
        "checkout.session.completed",
        paid_session(account, "large"),
        now(),
    );
    assert_eq!(outcome_of(&app, &e).await, "unmatched");
    // Paid according to the event, unpaid according to Stripe: nothing.
    let s = paid_session(account, "large");
    let mut unpaid = s.clone();
    unpaid["payment_status"] = json!("unpaid");
    stripe.knows_session(&unpaid, "price_large", 1);
    let e = event("checkout.session.completed", s, now());
    assert_eq!(outcome_of(&app, &e).await, "unmatched");
    assert_eq!(balance(&app, account).await.credits, 200);
    // A session keymeter created is fulfilled from its own record, without asking Stripe.
    let (buyer, buyer_key) = app.create_account("free", 0).await;
    let res = app
        .post_json(
            "/v1/billing/checkout",
            &buyer_key,
            json!({"pack": "large", "success_url": "https://example.com/ok", "cancel_url": "https://example.com/no"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut s = paid_session(buyer, "small");
    s["id"] = json!(id);
    let e = event("checkout.session.completed", s, now());
    assert_eq!(outcome_of(&app, &e).await, "credits_purchased");
    assert_eq!(balance(&app, buyer).await.credits, 1000);
    assert!(stripe
        .requests_to(&format!("/v1/checkout/sessions/{id}"))
        .is_empty());
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_dispute_claws_back_once_and_a_won_dispute_restores() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    let session = known_paid_session(&stripe, account, "large", "price_large");
    let pi = session["payment_intent"].as_str().unwrap().to_owned();
    let e = event("checkout.session.completed", session, now());
    assert_eq!(outcome_of(&app, &e).await, "credits_purchased");
    let mut dispute = fixture("dispute");
    dispute["payment_intent"] = json!(pi);
    dispute["status"] = json!("needs_response");
    let created = event("charge.dispute.created", dispute.clone(), now());
    assert_eq!(outcome_of(&app, &created).await, "credits_disputed");
    assert_eq!(balance(&app, account).await.credits, 0);
    // Another event about the same dispute, and the refund Stripe may report later for the
    // same charge, take nothing more.
    let again = event("charge.dispute.created", dispute.clone(), now());
    assert_eq!(outcome_of(&app, &again).await, "nothing_to_claw_back");
    let mut charge = fixture("charge");
    charge["payment_intent"] = json!(pi);
    charge["amount"] = json!(2000);
    charge["amount_refunded"] = json!(2000);
    charge["refunded"] = json!(true);
    let refunded = event("charge.refunded", charge, now());
    assert_eq!(outcome_of(&app, &refunded).await, "nothing_to_claw_back");
    assert_eq!(balance(&app, account).await.credits, 0);
    // Won: the credits come back, once.
    dispute["status"] = json!("won");
    let won = event("charge.dispute.closed", dispute.clone(), now());
    assert_eq!(outcome_of(&app, &won).await, "credits_restored");
    let won_again = event("charge.dispute.closed", dispute, now());
    assert_eq!(outcome_of(&app, &won_again).await, "nothing_to_restore");
    assert_eq!(balance(&app, account).await.credits, 1000);
    assert_eq!(
        ledger_kinds(&app, account).await,
        vec![
            ("purchase".to_owned(), 1000),
            ("dispute".to_owned(), -1000),
            ("dispute_won".to_owned(), 1000),
        ]
    );
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn a_lost_dispute_keeps_the_credits_taken() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (account, _) = app.create_account("free", 0).await;
    let session = known_paid_session(&stripe, account, "small", "price_small");
    let pi = session["payment_intent"].as_str().unwrap().to_owned();
    deliver(&app, &event("checkout.session.completed", session, now())).await;
    let mut dispute = fixture("dispute");
    dispute["payment_intent"] = json!(pi);
    assert_eq!(
        outcome_of(
            &app,
            &event("charge.dispute.created", dispute.clone(), now())
        )
        .await,
        "credits_disputed"
    );
    dispute["status"] = json!("lost");
    assert_eq!(
        outcome_of(&app, &event("charge.dispute.closed", dispute, now())).await,
        "dispute_not_won"
    );
    assert_eq!(balance(&app, account).await.credits, 0);
}

#[tokio::test]
async fn the_portal_opens_a_stripe_session_for_the_accounts_customer() {
    let (app, stripe) = billing_app_with_stripe().await;
    let (_, key) = app.create_account("free", 0).await;
    let res = app
        .post_json(
            "/v1/billing/portal",
            &key,
            json!({"return_url": "https://example.com/account"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "billing_portal_session");
    assert!(body["id"].as_str().unwrap().starts_with("bps_local_"));
    assert_eq!(body["url"], "https://billing.stripe.com/p/session/local");
    // The customer was created first, then the portal session opened for it.
    assert_eq!(stripe.requests_to("/v1/customers").len(), 1);
    let portal = stripe.requests_to("/v1/billing_portal/sessions");
    assert_eq!(portal.len(), 1);
    let f = form(&portal[0].2);
    assert_eq!(f["customer"], "cus_local_1");
    assert_eq!(f["return_url"], "https://example.com/account");
    // A second portal session reuses the customer.
    let res = app
        .post_json(
            "/v1/billing/portal",
            &key,
            json!({"return_url": "https://example.com/account"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert_eq!(stripe.requests_to("/v1/customers").len(), 1);
    // A bad URL: 422, Stripe not called.
    let res = app
        .post_json(
            "/v1/billing/portal",
            &key,
            json!({"return_url": "javascript:alert(1)"}),
        )
        .await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert_eq!(p["field"], "return_url");
    assert_eq!(stripe.requests_to("/v1/billing_portal/sessions").len(), 2);
}
