//! Expiring credit grants: credits an operator (or signup) gives with an `expires_at`.
//! Purchased credits never expire.
//!
//! Charges spend expiring credits first, earliest expiry first; within a minute of a grant's
//! expiry its unspent rest leaves the balance as one `expiry` ledger row with a
//! `credits.expired` event ([`run_sweeper`]).
//!
//! The hot path stays one statement for every account. A charge only lowers the account's
//! `expiring_credits` (what is left of its open grants, [`SPEND_EXPIRING`]) in the UPDATE that
//! moves its balance; it never reads or writes `credit_grants`. Which grant a charge drew on
//! is decided later, under the same row lock, whenever the set of open grants changes (a new
//! expiring grant, an expiry): [`settle`] spreads what was spent since the last settlement —
//! Σ grants' `remaining` − `expiring_credits` — over the open grants, earliest expiry first.
//! Between two settlements the open grants are a fixed set and every charge took from the
//! earliest one with credits left, so spreading the total at once gives each grant exactly
//! what charge-by-charge bookkeeping would have: a charge racing the expiry of the grant it
//! spends is serialised with it by the account's row lock, and either spent the credits
//! (they are no longer in `expiring_credits`, so the expiry cannot take them) or comes
//! after the expiry row (and is charged against what is left).
//!
//! Refunds (a failed job's reservation) go to the ordinary, non-expiring balance: a refund
//! does not know which grant its charge drew on once a settlement spread it, and the grant
//! may have expired in between. The consequence is documented in the README: credits of an
//! expiring grant spent on jobs that failed come back as credits that do not expire.
//!
//! Other decreases (an operator's negative adjustment, a Stripe clawback or dispute) take
//! from the balance as a whole and leave `expiring_credits` alone; an expiry therefore
//! never takes more than the balance holds, so the balance never goes negative through it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::alerts;
use super::ledger::{self, Kind, Movement};
use super::Error;
use crate::events::{self, EventType};

/// The charge statement's SET clause for expiring credits (`$2`: the cost).
pub const SPEND_EXPIRING: &str =
    "expiring_credits = expiring_credits - LEAST($2, expiring_credits)";

/// How often each instance looks for grants that expired; a grant leaves within this (plus
/// one sweep) of its `expires_at`, which the issue bounds at a minute.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);
/// Accounts per pass; a pass repeats while it finds a full page.
const SWEEP_PAGE: i64 = 100;

/// An open (not yet expired) grant as `GET /v1/credits` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OpenGrant {
    pub id: i64,
    /// Credits granted.
    pub amount: i64,
    /// Credits of it not yet spent; they leave the balance at `expires_at`.
    pub remaining: i64,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// The `data` of a `credits.expired` event.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Describes the payload only.
pub struct CreditsExpiredData {
    /// The grant (as `GET /v1/credits` lists it while open).
    grant_id: i64,
    /// Credits it granted.
    amount: i64,
    /// Credits that left the balance: the grant's unspent rest (never more than the balance).
    expired: i64,
    expires_at: DateTime<Utc>,
    /// The balance after the expiry.
    balance: i64,
    /// The `expiry` ledger entry.
    ledger_entry_id: i64,
}

/// Spreads `spent` (what charges took since the last settlement) over `grants`, which are in
/// spending order (earliest expiry first). Returns the grants whose `remaining` changed.
fn spread(grants: &mut [OpenGrant], mut spent: i64) -> Vec<usize> {
    let mut changed = Vec::new();
    for (i, g) in grants.iter_mut().enumerate() {
        if spent <= 0 {
            break;
        }
        let take = g.remaining.min(spent);
        if take > 0 {
            g.remaining -= take;
            spent -= take;
            changed.push(i);
        }
    }
    changed
}

fn open_grant(row: &tokio_postgres::Row) -> OpenGrant {
    OpenGrant {
        id: row.get("id"),
        amount: row.get("amount"),
        remaining: row.get("remaining"),
        expires_at: row.get("expires_at"),
        created_at: row.get("created_at"),
    }
}

/// What was spent since the last settlement, given the grants' recorded `remaining` and the
/// account's `expiring_credits`. Never negative: nothing but a grant adds expiring credits.
fn unsettled(grants: &[OpenGrant], expiring: i64) -> i64 {
    let recorded: i64 = grants.iter().map(|g| g.remaining).sum();
    if recorded < expiring {
        tracing::error!(
            recorded,
            expiring,
            "expiring credits exceed the open grants' rest"
        );
    }
    (recorded - expiring).max(0)
}

/// The account's open grants with what is really left of each (computed, not written), from
/// one statement's snapshot.
pub async fn open(db: &impl GenericClient, account_id: Uuid) -> Result<Vec<OpenGrant>, Error> {
    let rows = db
        .query(
            "SELECT a.expiring_credits, g.id, g.amount, g.remaining, g.expires_at, g.created_at
               FROM accounts a
               JOIN credit_grants g ON g.account_id = a.id AND g.expired_at IS NULL
              WHERE a.id = $1
              ORDER BY g.expires_at, g.id",
            &[&account_id],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let expiring: i64 = first.get(0);
    let mut grants: Vec<OpenGrant> = rows.iter().map(open_grant).collect();
    let spent = unsettled(&grants, expiring);
    spread(&mut grants, spent);
    Ok(grants)
}

/// Locks the account's open grants (the account row must already be locked), writes what
/// charges spent of each since the last settlement, and returns them in spending order with
/// whether each is due.
async fn settle(
    tx: &Transaction<'_>,
    account_id: Uuid,
    expiring: i64,
) -> Result<Vec<(OpenGrant, bool)>, Error> {
    let rows = tx
        .query(
            "SELECT id, amount, remaining, expires_at, created_at, expires_at <= now() AS due
               FROM credit_grants
              WHERE account_id = $1 AND expired_at IS NULL
              ORDER BY expires_at, id
                FOR UPDATE",
            &[&account_id],
        )
        .await?;
    let mut grants: Vec<OpenGrant> = rows.iter().map(open_grant).collect();
    let due: Vec<bool> = rows.iter().map(|r| r.get("due")).collect();
    let spent = unsettled(&grants, expiring);
    let changed = spread(&mut grants, spent);
    if !changed.is_empty() {
        let ids: Vec<i64> = changed.iter().map(|&i| grants[i].id).collect();
        let rests: Vec<i64> = changed.iter().map(|&i| grants[i].remaining).collect();
        tx.execute(
            "UPDATE credit_grants g SET remaining = u.r
               FROM unnest($1::bigint[], $2::bigint[]) AS u(id, r) WHERE g.id = u.id",
            &[&ids, &rests],
        )
        .await?;
    }
    Ok(grants.into_iter().zip(due).collect())
}

/// The latest `expires_at` accepted (PostgreSQL and RFC 3339 both stop at the year 9999).
fn acceptable_expiry(expires_at: DateTime<Utc>) -> bool {
    use chrono::Datelike;
    expires_at > Utc::now() && expires_at.year() < 10000
}

/// Grants `amount` credits that expire at `expires_at`, in the caller's transaction: a
/// `grant` ledger row, the account's `expiring_credits`, and the grant row.
pub async fn grant_expiring(
    tx: &Transaction<'_>,
    account_id: Uuid,
    amount: i64,
    reason: &str,
    expires_at: DateTime<Utc>,
) -> Result<Movement, Error> {
    if amount <= 0 {
        return Err(Error::CreditNotPositive);
    }
    if !acceptable_expiry(expires_at) {
        return Err(Error::ExpiryNotInFuture);
    }
    let expiring: i64 = tx
        .query_opt(
            "SELECT expiring_credits FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account_id],
        )
        .await?
        .ok_or(Error::AccountNotFound)?
        .get(0);
    // The new grant may expire before the open ones and be spent first from now on, so what
    // was spent so far is booked to the grants that were open while it was spent.
    settle(tx, account_id, expiring).await?;
    let m = ledger::credit(tx, account_id, amount, Kind::Grant, Some(reason), None).await?;
    tx.execute(
        "UPDATE accounts SET expiring_credits = expiring_credits + $2 WHERE id = $1",
        &[&account_id, &amount],
    )
    .await?;
    tx.execute(
        "INSERT INTO credit_grants (account_id, ledger_id, amount, remaining, expires_at)
         VALUES ($1, $2, $3, $3, $4)",
        &[&account_id, &m.id, &amount, &expires_at],
    )
    .await?;
    Ok(m)
}

/// What one account's expiry did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub grants: usize,
    pub credits: i64,
}

/// Expires the account's due grants, if another instance is not already doing it: one
/// transaction under the account's row lock (see the module's doc).
pub async fn expire_account(db: &Pool, account_id: Uuid) -> Result<Expired, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    // Instances share the work: one that finds another on this account moves on (it will
    // have nothing left to do there), rather than wait for its row lock.
    let mine: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1::text, 7316))",
            &[&account_id.to_string()],
        )
        .await?
        .get(0);
    if !mine {
        return Ok(Expired::default());
    }
    let Some(acct) = tx
        .query_opt(
            &format!(
                "SELECT credit_balance, expiring_credits, {} AS threshold
                   FROM accounts WHERE id = $1 FOR UPDATE",
                alerts::THRESHOLD_SQL
            ),
            &[&account_id],
        )
        .await?
    else {
        return Ok(Expired::default());
    };
    let (start_balance, mut expiring, threshold): (i64, i64, i64) =
        (acct.get(0), acct.get(1), acct.get(2));
    let mut balance = start_balance;
    let grants = settle(&tx, account_id, expiring).await?;
    let mut done = Expired::default();
    let mut new_events = Vec::new();
    for (g, due) in grants {
        if !due {
            continue;
        }
        // Never more than the balance holds (a clawback or adjustment may have taken
        // credits the grant's rest still counts).
        let take = g.remaining.min(balance.max(0));
        let mut ledger_id: Option<i64> = None;
        if take > 0 {
            let row = tx
                .query_one(
                    "WITH acct AS (
                         UPDATE accounts SET credit_balance = credit_balance - $2,
                                             expiring_credits = expiring_credits - $3
                          WHERE id = $1
                      RETURNING credit_balance)
                     INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason)
                     SELECT $1, -$2, credit_balance, 'expiry', $4 FROM acct
                     RETURNING id, balance_after",
                    &[
                        &account_id,
                        &take,
                        &g.remaining,
                        &format!("grant {} expired", g.id),
                    ],
                )
                .await?;
            ledger_id = Some(row.get(0));
            balance = row.get(1);
            new_events.push(events::NewEvent::new(
                account_id,
                EventType::CreditsExpired,
                json!({
                    "grant_id": g.id,
                    "amount": g.amount,
                    "expired": take,
                    "expires_at": g.expires_at,
                    "balance": balance,
                    "ledger_entry_id": row.get::<_, i64>(0),
                }),
            ));
            done.credits += take;
        } else if g.remaining > 0 {
            tx.execute(
                "UPDATE accounts SET expiring_credits = expiring_credits - $2 WHERE id = $1",
                &[&account_id, &g.remaining],
            )
            .await?;
        }
        expiring -= g.remaining;
        tx.execute(
            "UPDATE credit_grants
                SET remaining = $2, expired_at = now(), expired_amount = $3, expiry_ledger_id = $4
              WHERE id = $1",
            &[&g.id, &g.remaining, &take, &ledger_id],
        )
        .await?;
        done.grants += 1;
    }
    if expiring < 0 {
        return Err(Error::Internal(anyhow::anyhow!(
            "an expiry took more expiring credits than the account had"
        )));
    }
    new_events.extend(alerts::crossing(
        account_id,
        start_balance,
        balance,
        threshold,
        "expiry",
    ));
    events::record_many(&tx, new_events).await?;
    tx.commit().await?;
    if done.credits > 0 {
        crate::metrics::credits_moved(Kind::Expiry, -done.credits);
    }
    Ok(done)
}

/// One pass: every account with a grant past its `expires_at`, a page at a time.
pub async fn sweep(db: &Pool) -> Result<Expired, Error> {
    let mut total = Expired::default();
    let mut skip: Vec<Uuid> = Vec::new();
    loop {
        let accounts: Vec<Uuid> = {
            let client = db.get().await?;
            client
                .query(
                    "SELECT DISTINCT account_id FROM credit_grants
                      WHERE expired_at IS NULL AND expires_at <= now()
                        AND account_id <> ALL($2)
                      LIMIT $1",
                    &[&SWEEP_PAGE, &skip],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        let full = accounts.len() as i64 == SWEEP_PAGE;
        for a in accounts {
            let e = match expire_account(db, a).await {
                Ok(e) => e,
                Err(e) => {
                    // One account's failure must not hold up the others' expiries.
                    tracing::warn!(account_id = %a, error = %e, "expiring an account's grants failed");
                    skip.push(a);
                    continue;
                }
            };
            if e.grants == 0 {
                // Another instance has it (or it had nothing due after all): not again in
                // this pass.
                skip.push(a);
            }
            total.grants += e.grants;
            total.credits += e.credits;
        }
        if !full {
            return Ok(total);
        }
    }
}

/// Runs [`sweep`] every `every` until `stop`; on every instance (they share the work).
pub async fn run_sweeper(db: Pool, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep(&db).await {
            Ok(e) if e.grants > 0 => {
                tracing::info!(
                    grants = e.grants,
                    credits = e.credits,
                    "expired credit grants"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "credit grant expiry sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(id: i64, remaining: i64) -> OpenGrant {
        OpenGrant {
            id,
            amount: 100,
            remaining,
            expires_at: Utc::now(),
            created_at: Utc::now(),
        }
    }

    #[test]
    fn spending_is_booked_earliest_expiry_first() {
        let mut grants = vec![g(1, 30), g(2, 100), g(3, 100)];
        let spent = unsettled(&grants, 150);
        assert_eq!(spent, 80);
        assert_eq!(spread(&mut grants, spent), vec![0, 1]);
        let rests: Vec<i64> = grants.iter().map(|g| g.remaining).collect();
        assert_eq!(rests, [0, 50, 100]);
        assert_eq!(rests.iter().sum::<i64>(), 150);
    }

    #[test]
    fn nothing_spent_changes_nothing() {
        let mut grants = vec![g(1, 30)];
        assert_eq!(unsettled(&grants, 30), 0);
        assert!(spread(&mut grants, 0).is_empty());
        assert_eq!(unsettled(&grants, 40), 0, "never negative");
    }
}
