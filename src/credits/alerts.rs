//! Low-balance alerts: `balance.low` when a charge takes the balance from at or above the
//! account's threshold to below it, `balance.depleted` when a charge takes it to zero.
//!
//! Exact under concurrency because the decision is made where the balance moves: in the
//! single-statement charge ([`CHARGE_EVENTS`], a CTE of the same statement) and in the group
//! commit ([`BatchAlerts`], under the batch's row locks, written by the batch's one write
//! statement). Two charges of one account are serialised by its row lock, whatever instance
//! makes them, so exactly one of them sees the crossing.
//!
//! There is no separate "armed" flag: the crossing itself (`before >= threshold > after`)
//! is the arm state. A second `balance.low` needs the balance to have been at or above the
//! threshold again in between — which is the re-arming the issue asks for — and a flag that
//! could disagree with the balance is one thing less to keep exact. Setting a threshold
//! above the current balance fires nothing (no charge crossed it); the next crossing does.
//!
//! The threshold is the account's own (`accounts.low_balance_threshold`) or, when it has
//! none, its tier's, which [`sync_tier_defaults`] copies from the tiers configuration into
//! `tier_alert_defaults` at start-up, so the charge statement reads it by primary key
//! without another round trip.

use deadpool_postgres::GenericClient;
use serde_json::json;
use uuid::Uuid;

use super::Error;
use crate::events::{self, EventType, NewEvent};
use crate::tiers::Tiers;

/// The largest threshold an account may set (as in the column's CHECK).
pub const MAX_THRESHOLD: i64 = 1_000_000_000_000_000;

/// The effective threshold of the row being updated in `accounts` (unaliased).
pub const THRESHOLD_SQL: &str = "COALESCE(accounts.low_balance_threshold,
         (SELECT d.low_balance_threshold FROM tier_alert_defaults d WHERE d.tier = accounts.tier),
         0)";

/// A CTE for the single-statement charge: after CTE `acct` (the updated account, with
/// `credit_balance` after the charge and `threshold`), `$1` the account and `$2` the cost,
/// records the crossing's events. Ids are made in SQL (`evt_` + a random UUID's hex) so a
/// charge that fires nothing computes nothing.
pub const CHARGE_EVENTS: &str = "alerts AS (
         INSERT INTO events (id, account_id, type, payload)
         SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), $1, e.type,
                CASE e.type
                    WHEN 'balance.low' THEN jsonb_build_object('balance', acct.credit_balance,
                        'threshold', acct.threshold, 'cause', 'charge')
                    ELSE jsonb_build_object('balance', acct.credit_balance, 'cause', 'charge')
                END
           FROM acct, LATERAL (VALUES
                ('balance.low', acct.credit_balance < acct.threshold
                                AND acct.credit_balance + $2 >= acct.threshold),
                ('balance.depleted', acct.credit_balance = 0)) AS e(type, fire)
          WHERE e.fire)";

/// The `data` of a `balance.low` event (for the document; the payload is built in SQL and
/// by [`crossing`]).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the payload only.
pub struct BalanceLowData {
    /// The balance right after the charge (or expiry) that crossed the threshold.
    balance: i64,
    /// The threshold it crossed.
    threshold: i64,
    /// `charge` (a metered charge or a job's reservation) or `expiry`.
    cause: String,
}

/// The `data` of a `balance.depleted` event.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the payload only.
pub struct BalanceDepletedData {
    /// Always 0.
    balance: i64,
    /// `charge` or `expiry`.
    cause: String,
}

/// The events a balance move from `before` to `after` fires against `threshold`.
pub fn crossing(
    account_id: Uuid,
    before: i64,
    after: i64,
    threshold: i64,
    cause: &str,
) -> Vec<NewEvent> {
    let mut out = Vec::new();
    if before >= threshold && after < threshold {
        out.push(NewEvent::new(
            account_id,
            EventType::BalanceLow,
            json!({"balance": after, "threshold": threshold, "cause": cause}),
        ));
    }
    if before > 0 && after == 0 {
        out.push(NewEvent::new(
            account_id,
            EventType::BalanceDepleted,
            json!({"balance": after, "cause": cause}),
        ));
    }
    out
}

/// The events of a group-commit batch, as the columns of one `unnest` insert (the batch's
/// write statement carries them; see `coalesce`).
#[derive(Default)]
pub struct BatchAlerts {
    pub ids: Vec<String>,
    pub accounts: Vec<Uuid>,
    pub types: Vec<&'static str>,
    pub payloads: Vec<serde_json::Value>,
}

impl BatchAlerts {
    /// One accepted charge of the batch, in arrival order.
    pub fn charged(&mut self, account_id: Uuid, before: i64, after: i64, threshold: i64) {
        for e in crossing(account_id, before, after, threshold, "charge") {
            self.ids.push(events::new_id());
            self.accounts.push(e.account_id);
            self.types.push(e.event_type.as_str());
            self.payloads.push(e.payload);
        }
    }
}

/// Writes every tier's default threshold where the charge statement reads it. Run at
/// start-up by every instance (the same configuration writes the same values).
pub async fn sync_tier_defaults(db: &impl GenericClient, tiers: &Tiers) -> Result<(), Error> {
    let (names, thresholds): (Vec<String>, Vec<i64>) = tiers
        .names()
        .filter_map(|n| {
            tiers
                .get(n)
                .map(|t| (n.to_owned(), t.low_balance_threshold()))
        })
        .unzip();
    db.execute(
        "INSERT INTO tier_alert_defaults (tier, low_balance_threshold)
         SELECT * FROM unnest($1::text[], $2::bigint[])
         ON CONFLICT (tier) DO UPDATE
            SET low_balance_threshold = EXCLUDED.low_balance_threshold, updated_at = now()
          WHERE tier_alert_defaults.low_balance_threshold <> EXCLUDED.low_balance_threshold",
        &[&names, &thresholds],
    )
    .await?;
    Ok(())
}

/// An account's alert settings.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AlertSettings {
    #[schema(value_type = String, example = "account_alerts")]
    pub object: &'static str,
    /// The threshold in effect: the account's own, or its tier's default.
    pub low_balance_threshold: i64,
    /// `account` when the account set its own, `tier` when it follows the tier's default.
    #[schema(value_type = String, example = "tier")]
    pub low_balance_threshold_source: &'static str,
    /// The tier's default threshold.
    pub tier_default: i64,
    pub balance: i64,
    /// Whether the balance is below the threshold now.
    pub below_threshold: bool,
}

fn settings(row: &tokio_postgres::Row, tiers: &Tiers) -> AlertSettings {
    let own: Option<i64> = row.get(0);
    let tier: String = row.get(1);
    let balance: i64 = row.get(2);
    let tier_default = tiers.get_or_default(&tier).low_balance_threshold();
    let threshold = own.unwrap_or(tier_default);
    AlertSettings {
        object: "account_alerts",
        low_balance_threshold: threshold,
        low_balance_threshold_source: if own.is_some() { "account" } else { "tier" },
        tier_default,
        balance,
        below_threshold: balance < threshold,
    }
}

pub async fn get(
    db: &impl GenericClient,
    tiers: &Tiers,
    account_id: Uuid,
) -> Result<AlertSettings, Error> {
    let row = db
        .query_opt(
            "SELECT low_balance_threshold, tier, credit_balance FROM accounts WHERE id = $1",
            &[&account_id],
        )
        .await?
        .ok_or(Error::AccountNotFound)?;
    Ok(settings(&row, tiers))
}

/// Sets the account's threshold (`None`: follow the tier's default again). Fires nothing:
/// alerts come from charges crossing the threshold, not from moving it.
pub async fn set(
    db: &impl GenericClient,
    tiers: &Tiers,
    account_id: Uuid,
    threshold: Option<i64>,
) -> Result<AlertSettings, Error> {
    if threshold.is_some_and(|t| !(0..=MAX_THRESHOLD).contains(&t)) {
        return Err(Error::ThresholdOutOfRange);
    }
    let row = db
        .query_opt(
            "UPDATE accounts SET low_balance_threshold = $2, updated_at = now() WHERE id = $1
             RETURNING low_balance_threshold, tier, credit_balance",
            &[&account_id, &threshold],
        )
        .await?
        .ok_or(Error::AccountNotFound)?;
    Ok(settings(&row, tiers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(v: &[NewEvent]) -> Vec<&'static str> {
        v.iter().map(|e| e.event_type.as_str()).collect()
    }

    #[test]
    fn only_a_crossing_fires() {
        let a = Uuid::nil();
        assert_eq!(types(&crossing(a, 100, 99, 100, "charge")), ["balance.low"]);
        assert!(
            crossing(a, 99, 50, 100, "charge").is_empty(),
            "already below"
        );
        assert!(
            crossing(a, 200, 100, 100, "charge").is_empty(),
            "at is not below"
        );
        assert_eq!(
            types(&crossing(a, 150, 0, 100, "charge")),
            ["balance.low", "balance.depleted"]
        );
        assert_eq!(
            types(&crossing(a, 5, 0, 100, "charge")),
            ["balance.depleted"]
        );
        assert!(
            crossing(a, 5, 1, 0, "charge").is_empty(),
            "threshold 0: never low"
        );
    }
}
