//! Applying verified Stripe events, exactly once.
//!
//! The event id is inserted into `stripe_events` first, in the same transaction as every
//! effect: a redelivery (or a concurrent duplicate, which waits on the unique index) finds it
//! and changes nothing; a failure rolls everything back, the endpoint answers 5xx and Stripe
//! retries. Subscription states carry the time of the event that set them and an older event
//! is never applied over a newer one, so out-of-order deliveries are safe.

use deadpool_postgres::{Pool, Transaction};
use serde_json::Value;
use uuid::Uuid;

use secrecy::SecretString;

use super::{signature, Error};
use crate::accounts;
use crate::config::BillingSettings;
use crate::credits::ledger::{self, Kind};
use crate::metrics;
use crate::tiers::{Tiers, DEFAULT_TIER};

#[derive(Debug, PartialEq, Eq)]
pub enum Processed {
    Applied(&'static str),
    Duplicate,
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
) -> Result<Value, Error> {
    if secrets.is_empty() {
        return Err(Error::WebhooksNotConfigured);
    }
    if let Err(e) = signature::verify(signature_header, body, secrets, now) {
        tracing::warn!(reason = %e, "refused a webhook delivery");
        metrics::webhook_event("unverified", "bad_signature");
        return Err(Error::InvalidSignature(e));
    }
    serde_json::from_slice(body).map_err(|e| {
        metrics::webhook_event("unknown", "invalid");
        Error::InvalidJson(e.to_string())
    })
}

pub async fn process(
    db: &Pool,
    billing: &BillingSettings,
    tiers: &Tiers,
    event: &Value,
) -> Result<Processed, Error> {
    let id = text(event, &["id"]).ok_or_else(|| invalid("no id"))?;
    let kind = text(event, &["type"]).ok_or_else(|| invalid("no type"))?;
    let created = event
        .get("created")
        .and_then(Value::as_i64)
        .ok_or_else(|| invalid("no created time"))?;
    let object = event
        .get("data")
        .and_then(|d| d.get("object"))
        .filter(|o| o.is_object())
        .ok_or_else(|| invalid("no data.object"))?;

    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let fresh = tx
        .query_opt(
            "INSERT INTO stripe_events (id, type, created, outcome) VALUES ($1, $2, $3, 'processing')
             ON CONFLICT (id) DO NOTHING RETURNING 1",
            &[&id, &kind, &created],
        )
        .await?;
    if fresh.is_none() {
        return Ok(Processed::Duplicate);
    }
    let ctx = Ctx {
        tx: &tx,
        billing,
        tiers,
        event_id: id,
        created,
    };
    let (account, outcome) = match kind {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            ctx.checkout_paid(kind, object).await?
        }
        "invoice.paid" => ctx.invoice_paid(object).await?,
        "customer.subscription.updated"
        | "customer.subscription.deleted"
        | "customer.subscription.created" => ctx.subscription_changed(kind, object).await?,
        "charge.refunded" => ctx.charge_refunded(object).await?,
        _ => (None, "ignored"),
    };
    tx.execute(
        "UPDATE stripe_events SET outcome = $2, account_id = $3 WHERE id = $1",
        &[&id, &outcome, &account],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(event_id = id, event_type = kind, outcome, account_id = ?account, "stripe event processed");
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

    /// A pack bought through Checkout, once paid (card payments arrive paid with
    /// `completed`; delayed methods with `async_payment_succeeded`).
    async fn checkout_paid(&self, kind: &str, s: &Value) -> Result<Outcome, Error> {
        let session_id = text(s, &["id"]).ok_or_else(|| invalid("session without id"))?;
        let paid = text(s, &["payment_status"]) == Some("paid");
        if kind == "checkout.session.completed" && !paid {
            return Ok((None, "awaiting_payment"));
        }
        let mode = text(s, &["mode"]).unwrap_or("payment");
        let reference = text(s, &["client_reference_id"]).and_then(|r| r.parse::<Uuid>().ok());
        if mode == "subscription" {
            // Credits and the tier come with invoice.paid; remember whose subscription it is.
            let account = match reference {
                Some(a) if self.account_exists(a).await? => a,
                _ => return Ok((None, "unmatched")),
            };
            if let Some(sub) = text(s, &["subscription"]) {
                self.tx
                    .execute(
                        "INSERT INTO billing_subscriptions (subscription_id, account_id, plan, status, last_event_created)
                         VALUES ($1, $2, $3, 'incomplete', 0) ON CONFLICT (subscription_id) DO NOTHING",
                        &[&sub, &account, &text(s, &["metadata", "plan"])],
                    )
                    .await?;
            }
            return Ok((Some(account), "subscription_started"));
        }
        let mut known = self
            .tx
            .query_opt(
                "SELECT 1 FROM billing_checkouts WHERE session_id = $1",
                &[&session_id],
            )
            .await?
            .is_some();
        if !known {
            // A session keymeter did not record (e.g. created while our insert failed):
            // accept it only for an existing account and a pack our configuration knows.
            let pack = text(s, &["metadata", "pack"]).and_then(|p| self.billing.pack(p));
            match (reference, pack) {
                (Some(a), Some(p)) if self.account_exists(a).await? => {
                    self.tx
                        .execute(
                            "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits)
                             VALUES ($1, $2, 'payment', $3, $4) ON CONFLICT (session_id) DO NOTHING",
                            &[&session_id, &a, &p.name, &p.credits],
                        )
                        .await?;
                    known = true;
                }
                _ => {}
            }
        }
        if !known {
            return Ok((reference, "unmatched"));
        }
        let row = self
            .tx
            .query_opt(
                "UPDATE billing_checkouts SET fulfilled_at = now(), payment_intent = $2
                  WHERE session_id = $1 AND fulfilled_at IS NULL AND mode = 'payment'
              RETURNING account_id, credits, item",
                &[&session_id, &text(s, &["payment_intent"])],
            )
            .await?;
        let Some(row) = row else {
            return Ok((reference, "already_fulfilled"));
        };
        let (account, credits, item): (Uuid, i64, String) = (row.get(0), row.get(1), row.get(2));
        ledger::credit(
            self.tx,
            account,
            credits,
            Kind::Purchase,
            Some(&format!("pack {item}")),
            Some(self.event_id),
        )
        .await?;
        Ok((Some(account), "credits_purchased"))
    }

    /// A paid plan invoice: the period's credits and the plan's tier.
    async fn invoice_paid(&self, inv: &Value) -> Result<Outcome, Error> {
        let invoice_id = text(inv, &["id"]).ok_or_else(|| invalid("invoice without id"))?;
        let plan = inv
            .get("lines")
            .and_then(|l| l.get("data"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|line| {
                text(line, &["pricing", "price_details", "price"])
                    .or_else(|| text(line, &["price", "id"]))
                    .or_else(|| text(line, &["plan", "id"]))
            })
            .find_map(|price| self.billing.plan_by_price(price));
        let Some(plan) = plan else {
            return Ok((None, "not_a_plan_invoice"));
        };
        let subscription = text(inv, &["subscription"])
            .or_else(|| text(inv, &["parent", "subscription_details", "subscription"]));
        let mut account = self.account_by_customer(text(inv, &["customer"])).await?;
        if account.is_none() {
            if let Some(sub) = subscription {
                account = self
                    .tx
                    .query_opt(
                        "SELECT account_id FROM billing_subscriptions WHERE subscription_id = $1",
                        &[&sub],
                    )
                    .await?
                    .map(|r| r.get(0));
            }
        }
        if account.is_none() {
            if let Some(a) = text(
                inv,
                &["parent", "subscription_details", "metadata", "account_id"],
            )
            .and_then(|a| a.parse::<Uuid>().ok())
            {
                if self.account_exists(a).await? {
                    account = Some(a);
                }
            }
        }
        let Some(account) = account else {
            return Ok((None, "unmatched"));
        };
        if plan.monthly_credits > 0 {
            ledger::credit(
                self.tx,
                account,
                plan.monthly_credits,
                Kind::Purchase,
                Some(&format!("plan {} period", plan.name)),
                Some(self.event_id),
            )
            .await?;
        }
        // Recorded like a checkout, so a refund of this invoice's charge can be clawed back.
        self.tx
            .execute(
                "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits, payment_intent, fulfilled_at)
                 VALUES ($1, $2, 'subscription', $3, $4, $5, now()) ON CONFLICT (session_id) DO NOTHING",
                &[&invoice_id, &account, &plan.name, &plan.monthly_credits, &text(inv, &["payment_intent"])],
            )
            .await?;
        // The tier follows the plan unless a newer event already ended the subscription.
        let ended_later = match subscription {
            Some(sub) => self
                .tx
                .query_opt(
                    "SELECT 1 FROM billing_subscriptions
                      WHERE subscription_id = $1 AND status = 'canceled' AND last_event_created > $2",
                    &[&sub, &self.created],
                )
                .await?
                .is_some(),
            None => false,
        };
        if !ended_later {
            self.apply_tier(account, &plan.tier).await?;
            if let Some(sub) = subscription {
                self.record_subscription(sub, account, Some(&plan.name), "active")
                    .await?;
            }
        }
        Ok((Some(account), "plan_period_paid"))
    }

    async fn record_subscription(
        &self,
        sub: &str,
        account: Uuid,
        plan: Option<&str>,
        status: &str,
    ) -> Result<(), Error> {
        self.tx
            .execute(
                "INSERT INTO billing_subscriptions (subscription_id, account_id, plan, status, last_event_created)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (subscription_id) DO UPDATE
                    SET plan = COALESCE(EXCLUDED.plan, billing_subscriptions.plan), status = EXCLUDED.status,
                        last_event_created = EXCLUDED.last_event_created, updated_at = now()
                  WHERE billing_subscriptions.last_event_created <= EXCLUDED.last_event_created",
                &[&sub, &account, &plan, &status, &self.created],
            )
            .await?;
        Ok(())
    }

    async fn apply_tier(&self, account: Uuid, tier: &str) -> Result<(), Error> {
        let tier = if self.tiers.get(tier).is_some() {
            tier
        } else {
            DEFAULT_TIER
        };
        let current = accounts::get(self.tx, account)
            .await?
            .ok_or(Error::AccountNotFound)?;
        if current.tier != tier {
            accounts::set_tier(self.tx, self.tiers, account, tier).await?;
        }
        Ok(())
    }

    /// Plan changes and cancellations. An event older than the state we hold is ignored.
    async fn subscription_changed(&self, kind: &str, sub: &Value) -> Result<Outcome, Error> {
        let sub_id = text(sub, &["id"]).ok_or_else(|| invalid("subscription without id"))?;
        let status = if kind == "customer.subscription.deleted" {
            "canceled"
        } else {
            text(sub, &["status"]).unwrap_or("active")
        };
        let existing = self
            .tx
            .query_opt(
                "SELECT account_id, status, last_event_created FROM billing_subscriptions
                  WHERE subscription_id = $1 FOR UPDATE",
                &[&sub_id],
            )
            .await?;
        let mut account: Option<Uuid> = existing.as_ref().map(|r| r.get(0));
        if let Some(r) = &existing {
            let (held_status, held_at): (String, i64) = (r.get(1), r.get(2));
            let older = held_at > self.created;
            // Same second: cancellation is final, nothing at that instant may undo it.
            let undoes_cancel =
                held_at == self.created && held_status == "canceled" && status != "canceled";
            if older || undoes_cancel {
                return Ok((account, "stale_ignored"));
            }
        }
        if account.is_none() {
            account = self.account_by_customer(text(sub, &["customer"])).await?;
        }
        if account.is_none() {
            if let Some(a) =
                text(sub, &["metadata", "account_id"]).and_then(|a| a.parse::<Uuid>().ok())
            {
                if self.account_exists(a).await? {
                    account = Some(a);
                }
            }
        }
        let Some(account) = account else {
            return Ok((None, "unmatched"));
        };
        let plan = sub
            .get("items")
            .and_then(|i| i.get("data"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|item| text(item, &["price", "id"]).or_else(|| text(item, &["plan", "id"])))
            .find_map(|price| self.billing.plan_by_price(price));
        self.record_subscription(sub_id, account, plan.map(|p| p.name.as_str()), status)
            .await?;
        match status {
            "active" | "trialing" => {
                if let Some(p) = plan {
                    self.apply_tier(account, &p.tier).await?;
                    return Ok((Some(account), "tier_set"));
                }
                Ok((Some(account), "no_plan_matched"))
            }
            "canceled" | "unpaid" | "incomplete_expired" => {
                self.apply_tier(account, DEFAULT_TIER).await?;
                Ok((Some(account), "tier_reset"))
            }
            // past_due, incomplete, paused: keep the tier while Stripe retries the payment.
            _ => Ok((Some(account), "status_recorded")),
        }
    }

    /// A refunded payment takes back the credits it bought, in proportion to the refunded
    /// amount (refunds are cumulative in `amount_refunded`, so only the difference is new).
    async fn charge_refunded(&self, charge: &Value) -> Result<Outcome, Error> {
        let Some(pi) = text(charge, &["payment_intent"]) else {
            return Ok((None, "unmatched"));
        };
        let amount = charge.get("amount").and_then(Value::as_i64).unwrap_or(0);
        let refunded = charge
            .get("amount_refunded")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if amount <= 0 || refunded <= 0 {
            return Ok((None, "nothing_refunded"));
        }
        let row = self
            .tx
            .query_opt(
                "SELECT session_id, account_id, credits, clawed_back FROM billing_checkouts
                  WHERE payment_intent = $1 AND fulfilled_at IS NOT NULL
                  ORDER BY created_at LIMIT 1 FOR UPDATE",
                &[&pi],
            )
            .await?;
        let Some(row) = row else {
            return Ok((None, "unmatched"));
        };
        let (session, account, credits, clawed): (String, Uuid, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let target = ((credits as i128 * refunded.min(amount) as i128) / amount as i128) as i64;
        let claw = target - clawed;
        if claw <= 0 {
            return Ok((Some(account), "nothing_to_claw_back"));
        }
        ledger::clawback(
            self.tx,
            account,
            claw,
            &format!("refund of {session}"),
            self.event_id,
        )
        .await?;
        self.tx
            .execute(
                "UPDATE billing_checkouts SET clawed_back = $2 WHERE session_id = $1",
                &[&session, &target],
            )
            .await?;
        Ok((Some(account), "credits_clawed_back"))
    }
}
