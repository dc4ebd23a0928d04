//! Auto-recharge: when a charge takes the balance below the account's threshold, buy its
//! chosen pack with the card it saved, off-session, through Stripe.
//!
//! **The trigger costs the charge nothing.** Enabling writes the threshold into
//! `accounts.recharge_below`; the charge statements compare their `balance_after` with it on
//! the row they update anyway and NOTIFY only when it is crossed (`credits::recharge_signal`).
//! The notification is delivered at the charge's commit to every instance's LISTEN
//! connection, and [`Recharger`] takes it from there, off every response path.
//!
//! **Exactly one recharge, whatever the instances.** Every instance that hears a crossing
//! tries to *claim* it with one conditional UPDATE of the account's `billing_auto_recharge`
//! row: enabled, balance still below the threshold, nothing in flight, the cool-down
//! ([`COOL_DOWN_SQL`]) over and `max_per_month` not reached this (UTC) month. Row locking
//! lets one claim through; the others find the claim made and change nothing. Only the
//! winner calls Stripe, with an idempotency key derived from the ledger row that crossed
//! (`keymeter-recharge-<account>-<entry>`), so a retry of that recharge cannot charge twice.
//! A claim still in flight after an hour (an instance died between the claim and Stripe's
//! answer) no longer blocks the next one; its own intent, should it succeed, still grants.
//! A claim that fails holds the signal back (`accounts.recharge_after`) until a claim could
//! succeed, so a burst of charges below the threshold wakes the recharger once.
//!
//! **Credits come with the webhook.** `payment_intent.succeeded` for a recharge grants its
//! pack's credits once (ledger kind `auto_recharge`, the recharge row's status and the event
//! id both guard it), recorded like a purchase so a refund or dispute can take them back.
//! `payment_intent.payment_failed`, a `requires_action` outcome, or Stripe declining the card
//! (`authentication_required`, `card_declined`…) turn auto-recharge off with the reason
//! shown in `GET /v1/billing` and `GET /v1/billing/auto-recharge`; enabling it again clears it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::stripe_api::{NewRecharge, RechargeAnswer, StripeApi};
use super::Error;
use crate::config::BillingSettings;
use crate::credits::recharge_signal;
use crate::db::listen::Subscription;

/// The least time between two recharges of one account (Firecrawl's and Lago's top-ups
/// wait too: a card declined in a loop, or a runaway client, cannot buy pack after pack).
pub const COOL_DOWN_SQL: &str = "interval '10 minutes'";
/// The largest threshold accepted.
pub const MAX_THRESHOLD: i64 = 1_000_000_000_000;
/// The most recharges a month a setting may allow.
pub const MAX_PER_MONTH: i32 = 1000;
/// Recharges one instance runs against Stripe at once (one per account at most).
const CONCURRENT_RECHARGES: usize = 8;

/// An account's auto-recharge, as `GET`/`PUT /v1/billing/auto-recharge` show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Settings {
    #[schema(value_type = String, example = "auto_recharge")]
    pub object: &'static str,
    pub enabled: bool,
    /// A charge leaving the balance below this starts a recharge.
    pub threshold: Option<i64>,
    /// The pack bought (`KEYMETER_CREDIT_PACKS`).
    pub pack: Option<String>,
    /// At most this many recharges per calendar month (UTC).
    pub max_per_month: Option<i32>,
    /// Whether a card is saved for off-session payments (needed to enable).
    pub payment_method_saved: bool,
    /// Why keymeter turned auto-recharge off (a declined or unauthenticated payment), until
    /// it is enabled again.
    pub disabled_reason: Option<String>,
    pub disabled_at: Option<DateTime<Utc>>,
    /// Recharges started this calendar month (UTC).
    pub recharges_this_month: i32,
    pub last_started_at: Option<DateTime<Utc>>,
    /// A recharge was started and Stripe's answer has not arrived yet.
    pub in_flight: bool,
}

/// A `PUT`: `enabled`, and any of the others (missing ones keep their stored values; all
/// three are needed to enable).
#[derive(Debug, Clone)]
pub struct Update {
    pub enabled: bool,
    pub threshold: Option<i64>,
    pub pack: Option<String>,
    pub max_per_month: Option<i32>,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> Error {
    Error::InvalidSetting {
        field,
        detail: detail.into(),
    }
}

/// The account's settings (disabled, with nothing stored, when it never set any).
pub async fn get(db: &impl GenericClient, account_id: Uuid) -> Result<Settings, Error> {
    let saved = db
        .query_opt(
            "SELECT payment_method IS NOT NULL FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .is_some_and(|r| r.get(0));
    let row = db
        .query_opt(
            "SELECT enabled, threshold, pack, max_per_month, disabled_reason, disabled_at,
                    CASE WHEN month = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM') THEN month_count ELSE 0 END,
                    last_started_at, in_flight IS NOT NULL
               FROM billing_auto_recharge WHERE account_id = $1",
            &[&account_id],
        )
        .await?;
    Ok(match row {
        Some(r) => Settings {
            object: "auto_recharge",
            enabled: r.get(0),
            threshold: Some(r.get(1)),
            pack: Some(r.get(2)),
            max_per_month: Some(r.get(3)),
            payment_method_saved: saved,
            disabled_reason: r.get(4),
            disabled_at: r.get(5),
            recharges_this_month: r.get(6),
            last_started_at: r.get(7),
            in_flight: r.get(8),
        },
        None => Settings {
            object: "auto_recharge",
            enabled: false,
            threshold: None,
            pack: None,
            max_per_month: None,
            payment_method_saved: saved,
            disabled_reason: None,
            disabled_at: None,
            recharges_this_month: 0,
            last_started_at: None,
            in_flight: false,
        },
    })
}

/// Applies a `PUT`. Enabling needs a saved card ([`Error::PaymentMethodRequired`]) and a
/// configured pack; it clears a previous `disabled_reason` and arms the charge statements'
/// test. A crossing already past (the balance below the new threshold now) waits for the
/// next charge.
pub async fn set(
    db: &Pool,
    billing: &BillingSettings,
    account_id: Uuid,
    update: Update,
) -> Result<Settings, Error> {
    if let Some(t) = update.threshold {
        if !(0..=MAX_THRESHOLD).contains(&t) {
            return Err(invalid(
                "threshold",
                format!("threshold must be between 0 and {MAX_THRESHOLD}."),
            ));
        }
    }
    if let Some(m) = update.max_per_month {
        if !(1..=MAX_PER_MONTH).contains(&m) {
            return Err(invalid(
                "max_per_month",
                format!("max_per_month must be between 1 and {MAX_PER_MONTH}."),
            ));
        }
    }
    if let Some(p) = &update.pack {
        if billing.pack(p).is_none() {
            return Err(Error::UnknownPack {
                name: p.clone(),
                available: billing
                    .packs
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let stored = tx
        .query_opt(
            "SELECT threshold, pack, max_per_month FROM billing_auto_recharge
              WHERE account_id = $1 FOR UPDATE",
            &[&account_id],
        )
        .await?;
    let threshold = update.threshold.or(stored.as_ref().map(|r| r.get(0)));
    let pack: Option<String> = update.pack.or(stored.as_ref().map(|r| r.get(1)));
    let max = update.max_per_month.or(stored.as_ref().map(|r| r.get(2)));
    let (Some(threshold), Some(pack), Some(max)) = (threshold, pack, max) else {
        if update.enabled {
            return Err(invalid(
                "threshold",
                "threshold, pack and max_per_month are all needed to enable auto-recharge.",
            ));
        }
        // Disabling what was never set: nothing to store.
        drop(tx);
        return get(&client, account_id).await;
    };
    if update.enabled {
        let saved = tx
            .query_opt(
                "SELECT 1 FROM billing_customers WHERE account_id = $1 AND payment_method IS NOT NULL",
                &[&account_id],
            )
            .await?
            .is_some();
        if !saved {
            return Err(Error::PaymentMethodRequired);
        }
    }
    tx.execute(
        "INSERT INTO billing_auto_recharge (account_id, enabled, threshold, pack, max_per_month)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (account_id) DO UPDATE
            SET enabled = EXCLUDED.enabled, threshold = EXCLUDED.threshold, pack = EXCLUDED.pack,
                max_per_month = EXCLUDED.max_per_month, updated_at = now(),
                disabled_reason = CASE WHEN EXCLUDED.enabled THEN NULL ELSE billing_auto_recharge.disabled_reason END,
                disabled_at = CASE WHEN EXCLUDED.enabled THEN NULL ELSE billing_auto_recharge.disabled_at END",
        &[&account_id, &update.enabled, &threshold, &pack, &max],
    )
    .await?;
    let below: Option<i64> = update.enabled.then_some(threshold);
    tx.execute(
        "UPDATE accounts SET recharge_below = $2 WHERE id = $1",
        &[&account_id, &below],
    )
    .await?;
    tx.commit().await?;
    get(&client, account_id).await
}

/// Turns auto-recharge off for `why`, on the caller's transaction: the recharge `id` (if
/// any) failed, nothing is in flight, and the charge statements stop testing the account.
pub(super) async fn disable(
    tx: &impl GenericClient,
    account_id: Uuid,
    why: &str,
) -> Result<(), Error> {
    tx.execute(
        "UPDATE billing_auto_recharge
            SET enabled = false, disabled_reason = $2, disabled_at = now(), in_flight = NULL, updated_at = now()
          WHERE account_id = $1",
        &[&account_id, &why],
    )
    .await?;
    tx.execute(
        "UPDATE accounts SET recharge_below = NULL WHERE id = $1",
        &[&account_id],
    )
    .await?;
    Ok(())
}

/// Marks recharge `id` failed for `why` and turns auto-recharge off; the account, when the
/// recharge was still open (a second failure report changes nothing).
pub(super) async fn fail(
    tx: &impl GenericClient,
    id: &str,
    why: &str,
    payment_intent: Option<&str>,
) -> Result<Option<Uuid>, Error> {
    let row = tx
        .query_opt(
            "UPDATE billing_recharges
                SET status = 'failed', failure = $2, payment_intent = COALESCE($3, payment_intent),
                    settled_at = now()
              WHERE id = $1 AND status IN ('claimed', 'pending')
          RETURNING account_id",
            &[&id, &why, &payment_intent],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let account: Uuid = row.get(0);
    disable(tx, account, why).await?;
    Ok(Some(account))
}

/// The conditional UPDATE that claims a recharge (see the module doc); returns the pack.
const CLAIM: &str = "UPDATE billing_auto_recharge b
    SET in_flight = $2, last_started_at = now(), updated_at = now(),
        month_count = CASE WHEN b.month = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')
                           THEN b.month_count + 1 ELSE 1 END,
        month = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')
   FROM accounts a
  WHERE b.account_id = $1 AND a.id = b.account_id AND b.enabled
    AND a.credit_balance < b.threshold
    AND (b.in_flight IS NULL OR b.last_started_at < now() - interval '1 hour')
    AND (b.last_started_at IS NULL OR b.last_started_at <= now() - interval '10 minutes')
    AND (b.month IS DISTINCT FROM to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')
         OR b.month_count < b.max_per_month)
  RETURNING b.pack";

/// After a failed claim: hold the charge statements' signal back until a claim could
/// succeed (cool-down end, next month, a minute while one is in flight), or disarm a
/// disabled account. Writes nothing when the hold is already as long.
const HOLD: &str = "WITH s AS (
    SELECT b.account_id, b.enabled,
           CASE WHEN b.month = to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM') AND b.month_count >= b.max_per_month
                     THEN (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
                WHEN b.last_started_at > now() - interval '10 minutes'
                     THEN b.last_started_at + interval '10 minutes'
                WHEN b.in_flight IS NOT NULL THEN now() + interval '1 minute'
           END AS until
      FROM billing_auto_recharge b WHERE b.account_id = $1)
  UPDATE accounts a
     SET recharge_after = GREATEST(a.recharge_after, COALESCE(s.until, a.recharge_after)),
         recharge_below = CASE WHEN s.enabled THEN a.recharge_below END
    FROM s
   WHERE a.id = s.account_id
     AND (NOT s.enabled OR s.until > a.recharge_after)";

/// What one wake-up did (for logs and tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// Another instance (or an earlier wake-up) has it, or nothing is due.
    NotClaimed,
    /// Stripe took the PaymentIntent; credits come with `payment_intent.succeeded`.
    Pending,
    /// Turned off, for this reason.
    Disabled(String),
    /// Stripe could not be reached: the claim is released, the cool-down stands.
    Released,
}

/// Starts recharges on the crossings this instance hears of: one task per account at a
/// time, at most [`CONCURRENT_RECHARGES`] talking to Stripe at once.
pub struct Recharger {
    db: Pool,
    api: StripeApi,
    billing: BillingSettings,
    running: Mutex<HashSet<Uuid>>,
    permits: Semaphore,
}

impl Recharger {
    pub fn new(db: Pool, api: StripeApi, billing: BillingSettings) -> Arc<Recharger> {
        Arc::new(Recharger {
            db,
            api,
            billing,
            running: Mutex::new(HashSet::new()),
            permits: Semaphore::new(CONCURRENT_RECHARGES),
        })
    }

    /// The LISTEN subscription: each crossing is taken up; after a (re)connect, which may
    /// have missed some, the armed accounts below their threshold are looked for.
    pub fn subscription(self: &Arc<Self>) -> Subscription {
        let on_message = {
            let me = self.clone();
            Arc::new(move |payload: &str| match recharge_signal::parse(payload) {
                Some((account, entry)) => me.clone().spawn(account, entry),
                None => tracing::warn!(payload, "unreadable recharge notification"),
            })
        };
        let on_connect = {
            let me = self.clone();
            Arc::new(move || {
                let me = me.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.clone().sweep().await {
                        tracing::warn!(error = %e, "auto-recharge sweep failed");
                    }
                });
            })
        };
        Subscription {
            channel: recharge_signal::CHANNEL,
            on_message,
            on_connect,
        }
    }

    async fn sweep(self: Arc<Self>) -> Result<(), Error> {
        let rows = self
            .db
            .get()
            .await?
            .query(
                "SELECT a.id, l.id FROM accounts a
                   JOIN LATERAL (SELECT id FROM credit_ledger
                                  WHERE account_id = a.id AND kind = 'charge'
                                  ORDER BY id DESC LIMIT 1) l ON true
                  WHERE a.recharge_below IS NOT NULL AND a.credit_balance < a.recharge_below
                    AND a.recharge_after <= now()
                  LIMIT 1000",
                &[],
            )
            .await?;
        for r in rows {
            self.clone().spawn(r.get(0), r.get(1));
        }
        Ok(())
    }

    fn spawn(self: Arc<Self>, account: Uuid, entry: i64) {
        let fresh = match self.running.lock() {
            Ok(mut running) => running.insert(account),
            Err(_) => false,
        };
        if !fresh {
            return;
        }
        tokio::spawn(async move {
            let outcome = match self.permits.acquire().await {
                Ok(_permit) => self.start(account, entry).await,
                Err(_) => Ok(Started::NotClaimed),
            };
            match outcome {
                Ok(Started::NotClaimed) => {}
                Ok(o) => {
                    tracing::info!(account_id = %account, entry, outcome = ?o, "auto-recharge")
                }
                Err(e) => {
                    tracing::warn!(account_id = %account, entry, error = %e, "auto-recharge failed")
                }
            }
            if let Ok(mut running) = self.running.lock() {
                running.remove(&account);
            }
        });
    }

    /// Claims the recharge a crossing at ledger row `entry` calls for, and asks Stripe for it.
    pub async fn start(&self, account: Uuid, entry: i64) -> Result<Started, Error> {
        let id = format!("keymeter-recharge-{account}-{entry}");
        let pack = {
            let mut client = self.db.get().await?;
            let tx = client.transaction().await?;
            let Some(row) = tx.query_opt(CLAIM, &[&account, &id]).await? else {
                tx.execute(HOLD, &[&account]).await?;
                tx.commit().await?;
                return Ok(Started::NotClaimed);
            };
            let name: String = row.get(0);
            let Some(pack) = self.billing.pack(&name).cloned() else {
                disable(&tx, account, "pack_not_configured").await?;
                tx.commit().await?;
                return Ok(Started::Disabled("pack_not_configured".into()));
            };
            let inserted = tx
                .execute(
                    "INSERT INTO billing_recharges (id, account_id, trigger_entry, pack, credits, status)
                     VALUES ($1, $2, $3, $4, $5, 'claimed') ON CONFLICT (id) DO NOTHING",
                    &[&id, &account, &entry, &pack.name, &pack.credits],
                )
                .await?;
            if inserted == 0 {
                // This ledger row already started a recharge (a sweep after a reconnect):
                // Stripe would answer its idempotency key with the old intent. Let it go.
                return Ok(Started::NotClaimed);
            }
            tx.execute(
                &format!(
                    "UPDATE accounts SET recharge_after = now() + {COOL_DOWN_SQL} WHERE id = $1"
                ),
                &[&account],
            )
            .await?;
            tx.commit().await?;
            pack
        };
        let card = self
            .db
            .get()
            .await?
            .query_opt(
                "SELECT customer_id, payment_method FROM billing_customers WHERE account_id = $1",
                &[&account],
            )
            .await?;
        let (customer, payment_method): (String, Option<String>) = match card {
            Some(r) => (r.get(0), r.get(1)),
            None => (String::new(), None),
        };
        let Some(payment_method) = payment_method else {
            return self.failed(&id, "no_payment_method", None).await;
        };
        let answer = match self.api.price(&pack.price_id).await {
            Ok(price) => {
                self.api
                    .create_recharge(NewRecharge {
                        id: &id,
                        customer: &customer,
                        payment_method: &payment_method,
                        account_id: &account.to_string(),
                        price: &price,
                        pack: &pack.name,
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok(RechargeAnswer::Created(pi)) => {
                use stripe_shared::PaymentIntentStatus as S;
                let pi_id = pi.id.as_str();
                match pi.status {
                    S::RequiresAction | S::RequiresConfirmation => {
                        self.failed(&id, "authentication_required", Some(pi_id))
                            .await
                    }
                    S::RequiresPaymentMethod | S::Canceled => {
                        self.failed(&id, "payment_failed", Some(pi_id)).await
                    }
                    _ => {
                        self.db
                            .get()
                            .await?
                            .execute(
                                "UPDATE billing_recharges SET status = 'pending', payment_intent = $2
                                  WHERE id = $1 AND status = 'claimed'",
                                &[&id, &pi_id],
                            )
                            .await?;
                        Ok(Started::Pending)
                    }
                }
            }
            Ok(RechargeAnswer::Declined {
                reason,
                payment_intent,
            }) => self.failed(&id, &reason, payment_intent.as_deref()).await,
            Err(Error::PaymentProviderUnavailable { .. }) => {
                let client = self.db.get().await?;
                client
                    .execute(
                        "UPDATE billing_recharges SET status = 'failed', failure = 'payment_provider_unavailable', settled_at = now()
                          WHERE id = $1 AND status = 'claimed'",
                        &[&id],
                    )
                    .await?;
                client
                    .execute(
                        "UPDATE billing_auto_recharge SET in_flight = NULL WHERE account_id = $1 AND in_flight = $2",
                        &[&account, &id],
                    )
                    .await?;
                Ok(Started::Released)
            }
            Err(e) => {
                tracing::warn!(account_id = %account, error = %e, "Stripe refused an auto-recharge");
                self.failed(&id, "payment_refused", None).await
            }
        }
    }

    async fn failed(
        &self,
        id: &str,
        why: &str,
        payment_intent: Option<&str>,
    ) -> Result<Started, Error> {
        let mut client = self.db.get().await?;
        let tx = client.transaction().await?;
        fail(&tx, id, why, payment_intent).await?;
        tx.commit().await?;
        Ok(Started::Disabled(why.to_owned()))
    }
}
