//! Applying verified Stripe events, exactly once.
//!
//! The event id is inserted into `stripe_events` first, in the same transaction as every
//! effect: a redelivery (or a concurrent duplicate, which waits on the unique index) finds it
//! and changes nothing; a failure rolls everything back, the endpoint answers 5xx and Stripe
//! retries. Subscription states carry the time of the event that set them and an older event
//! is never applied over a newer one, so out-of-order deliveries are safe.
//!
//! The raw body is verified by our own [`signature`] check (any `v1` under any configured
//! secret, for rotations) and only then parsed: the envelope (id, type, time) for every
//! event, and, for the types keymeter acts on, the object into stripe-rust's typed event.
//! An event type keymeter does not act on is recorded and ignored without being typed, so a
//! shape Stripe adds later can never make a delivery fail.

mod payments;
mod plans;
mod recharge;

use deadpool_postgres::{Pool, Transaction};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use stripe_webhook::{EventObject, Webhook};
use uuid::Uuid;

use super::stripe_api::StripeApi;
use super::{signature, Error};
use crate::accounts;
use crate::config::BillingSettings;
use crate::metrics;
use crate::tiers::Tiers;

#[derive(Debug, PartialEq, Eq)]
pub enum Processed {
    Applied(&'static str),
    Duplicate,
}

/// The event types keymeter acts on; every other type is recorded and ignored.
pub const HANDLED: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "invoice.paid",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "checkout.session.expired",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.requires_action",
];

/// A verified delivery: the envelope every event has, and the typed object for the types
/// keymeter acts on (`None` for the others).
pub struct Delivery {
    pub id: String,
    pub kind: String,
    pub created: i64,
    pub object: Option<EventObject>,
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

fn invalid(detail: &'static str) -> Error {
    Error::InvalidEvent(detail)
}

/// A webhook delivery's event, once its raw body has been verified against `secrets`
/// (`Stripe-Signature`, any `v1` under any secret, [`signature::TOLERANCE_SECS`]) and only
/// then parsed. Every refusal is counted in the webhook metrics; nothing is written.
pub fn verified_event(
    secrets: &[SecretString],
    signature_header: &str,
    body: &[u8],
    now: i64,
) -> Result<Delivery, Error> {
    let Some(first_secret) = secrets.first() else {
        return Err(Error::WebhooksNotConfigured);
    };
    if let Err(e) = signature::verify(signature_header, body, secrets, now) {
        tracing::warn!(reason = %e, "refused a webhook delivery");
        metrics::webhook_event("unverified", "bad_signature");
        return Err(Error::InvalidSignature(e));
    }
    let event: Value = serde_json::from_slice(body).map_err(|e| {
        metrics::webhook_event("unknown", "invalid");
        Error::InvalidJson(e.to_string())
    })?;
    let envelope = || -> Result<(String, String, i64), Error> {
        let id = text(&event, &["id"]).ok_or_else(|| invalid("no id"))?;
        let kind = text(&event, &["type"]).ok_or_else(|| invalid("no type"))?;
        let created = event
            .get("created")
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid("no created time"))?;
        event
            .get("data")
            .and_then(|d| d.get("object"))
            .filter(|o| o.is_object())
            .ok_or_else(|| invalid("no data.object"))?;
        Ok((id.to_owned(), kind.to_owned(), created))
    };
    let (id, kind, created) = envelope().inspect_err(|_| {
        metrics::webhook_event("unknown", "invalid");
    })?;
    if !HANDLED.contains(&kind.as_str()) {
        return Ok(Delivery {
            id,
            kind,
            created,
            object: None,
        });
    }
    // stripe-rust parses a body only behind its own verifier (or `Webhook::insecure`, which
    // logs a warning on every call in a release build). The body is verified above; it is
    // handed over with a signature made here for the crate's check, which therefore always
    // passes: the decision stays with ours, which accepts several `v1` and secrets.
    let raw = std::str::from_utf8(body).map_err(|e| Error::InvalidJson(e.to_string()))?;
    let secret = first_secret.expose_secret();
    let typed =
        Webhook::construct_event_with_timestamp(raw, &signature::sign(secret, now, body), secret, now)
            .map_err(|e| {
                tracing::warn!(event_id = %id, event_type = %kind, error = %e, "a signed event did not parse as its type");
                metrics::webhook_event(&kind, "invalid");
                invalid("its object does not have the shape of its type")
            })?;
    Ok(Delivery {
        id,
        kind,
        created,
        object: Some(typed.data.object),
    })
}

/// Applies `event` once. `api` is Stripe, for what an event alone cannot prove (a Checkout
/// Session keymeter did not create is fulfilled only from Stripe's own copy of it); it is
/// asked before the transaction opens, so no database connection waits on Stripe.
pub async fn process(
    db: &Pool,
    api: Option<&StripeApi>,
    billing: &BillingSettings,
    tiers: &Tiers,
    event: &Delivery,
) -> Result<Processed, Error> {
    let (retrieved, card) = match &event.object {
        Some(
            EventObject::CheckoutSessionCompleted(s)
            | EventObject::CheckoutSessionAsyncPaymentSucceeded(s),
        ) => (
            payments::retrieve_if_unknown(db, api, s).await?,
            payments::saved_card(db, api, s).await?,
        ),
        _ => (None, None),
    };
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let fresh = tx
        .query_opt(
            "INSERT INTO stripe_events (id, type, created, outcome) VALUES ($1, $2, $3, 'processing')
             ON CONFLICT (id) DO NOTHING RETURNING 1",
            &[&event.id, &event.kind, &event.created],
        )
        .await?;
    if fresh.is_none() {
        return Ok(Processed::Duplicate);
    }
    let ctx = Ctx {
        tx: &tx,
        billing,
        tiers,
        event_id: &event.id,
        created: event.created,
    };
    let kind = event.kind.as_str();
    let (account, outcome) = match &event.object {
        Some(
            EventObject::CheckoutSessionCompleted(s)
            | EventObject::CheckoutSessionAsyncPaymentSucceeded(s),
        ) => {
            let saved_for = ctx.save_card(s, card.as_deref()).await?;
            if matches!(s.mode, stripe_shared::CheckoutSessionMode::Setup) {
                (
                    saved_for,
                    if saved_for.is_some() {
                        "payment_method_saved"
                    } else {
                        "unmatched"
                    },
                )
            } else {
                ctx.checkout_paid(kind, s, retrieved.as_ref()).await?
            }
        }
        Some(EventObject::CheckoutSessionExpired(s)) => {
            // An abandoned plan checkout no longer holds the account's one open plan checkout.
            let closed = tx
                .query_opt(
                    "UPDATE billing_checkouts SET plan_open = false WHERE session_id = $1 AND plan_open
                     RETURNING account_id",
                    &[&s.id.as_str()],
                )
                .await?;
            match closed {
                Some(r) => (Some(r.get(0)), "plan_checkout_closed"),
                None => (None, "ignored"),
            }
        }
        Some(EventObject::PaymentIntentSucceeded(pi)) => ctx.recharge_succeeded(pi).await?,
        Some(
            EventObject::PaymentIntentPaymentFailed(pi)
            | EventObject::PaymentIntentRequiresAction(pi),
        ) => ctx.recharge_failed(kind, pi).await?,
        Some(EventObject::InvoicePaid(inv)) => ctx.invoice_paid(inv).await?,
        Some(
            EventObject::CustomerSubscriptionCreated(sub)
            | EventObject::CustomerSubscriptionUpdated(sub)
            | EventObject::CustomerSubscriptionDeleted(sub),
        ) => ctx.subscription_changed(kind, sub).await?,
        Some(EventObject::ChargeRefunded(charge)) => ctx.charge_refunded(charge).await?,
        Some(EventObject::ChargeDisputeCreated(d)) => ctx.dispute_created(d).await?,
        Some(EventObject::ChargeDisputeClosed(d)) => ctx.dispute_closed(d).await?,
        _ => (None, "ignored"),
    };
    tx.execute(
        "UPDATE stripe_events SET outcome = $2, account_id = $3 WHERE id = $1",
        &[&event.id, &outcome, &account],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(event_id = %event.id, event_type = kind, outcome, account_id = ?account, "stripe event processed");
    Ok(Processed::Applied(outcome))
}

struct Ctx<'a, 'b> {
    tx: &'a Transaction<'b>,
    billing: &'a BillingSettings,
    tiers: &'a Tiers,
    event_id: &'a str,
    created: i64,
}

type Outcome = (Option<Uuid>, &'static str);

impl Ctx<'_, '_> {
    async fn account_exists(&self, id: Uuid) -> Result<bool, Error> {
        Ok(accounts::get(self.tx, id).await?.is_some())
    }

    /// An account named by a reference or metadata value, if it parses and exists.
    async fn existing_account(&self, reference: Option<&str>) -> Result<Option<Uuid>, Error> {
        match reference.and_then(|a| a.parse::<Uuid>().ok()) {
            Some(a) if self.account_exists(a).await? => Ok(Some(a)),
            _ => Ok(None),
        }
    }

    async fn account_by_customer(&self, customer: Option<&str>) -> Result<Option<Uuid>, Error> {
        let Some(c) = customer else { return Ok(None) };
        Ok(self
            .tx
            .query_opt(
                "SELECT account_id FROM billing_customers WHERE customer_id = $1",
                &[&c],
            )
            .await?
            .map(|r| r.get(0)))
    }
}
