//! Creating a job: its cost reserved and the queue cap counted under the account's row lock,
//! in the caller's transaction; a sync job with a free running slot is started at once.

use std::time::Duration;

use deadpool_postgres::Transaction;
use serde_json::json;
use uuid::Uuid;

use super::claim::{claimed_from_row, take_slot, CLAIMED_COLUMNS};
use super::{Claimed, NewJob, QueueError, CHANNEL};
use crate::credits::ledger;

/// Asks [`create`] to start the job on this instance if the account has a free running slot.
#[derive(Debug, Clone, Copy)]
pub struct StartHere {
    /// This instance, as the lease owner.
    pub owner: Uuid,
    pub lease: Duration,
    /// The account's running-jobs limit ([`super::ConcurrencyLimits::of`]).
    pub max_running: i64,
}

/// Reserves the cost and queues the job, in the caller's transaction. The reservation
/// locks the account row first, so concurrent creations for one account are counted
/// against the queue cap one after the other. The ledger's refusal when the balance is
/// short, [`QueueError::QueueFull`] beyond the tier's queued-jobs cap: either way nothing is
/// written.
///
/// A job whose formats are all free (a tier price of 0) reserves nothing: the ledger holds
/// credit movements, and a zero-delta row would be none. Its end then has nothing to refund
/// (`ledger::refund` finds no charge and writes nothing), so it settles like any other job.
/// The account row is still locked first, so the queue cap is counted the same way.
///
/// With `start`, a job whose account has a free running slot ([`take_slot`], the same check
/// a worker's claim makes) is inserted already `running`, leased to `start.owner` as a claim
/// would lease it (attempt 1), and returned for the caller to run once this transaction has
/// committed: no queue round trip, no claim transaction. Its lease is an ordinary one, so if
/// this instance dies the reaper re-queues it like any claimed job. Without a free slot the
/// job is queued as usual (and counts against the queue cap) and `None` is returned.
pub async fn create(
    tx: &Transaction<'_>,
    new: &NewJob,
    max_queued: i64,
    start: Option<StartHere>,
) -> Result<Option<Claimed>, QueueError> {
    if new.cost == 0 {
        let locked = tx
            .query_opt(
                "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                &[&new.account_id],
            )
            .await?;
        if locked.is_none() {
            return Err(QueueError::AccountNotFound);
        }
    } else {
        match ledger::reserve(tx, new.account_id, new.cost, new.id, new.key_id.as_deref()).await? {
            ledger::Once::Done(_) => {}
            ledger::Once::AlreadyDone => {
                return Err(QueueError::Invariant("a new job's id already has a charge"))
            }
        }
    }
    let start = match start {
        Some(s) if take_slot(tx, new.account_id, s.max_running).await? => Some(s),
        _ => None,
    };
    if let Some(s) = start {
        return insert_running(tx, new, s).await.map(Some);
    }
    let queued: i64 = tx
        .query_one(
            "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'queued'",
            &[&new.account_id],
        )
        .await?
        .get(0);
    if queued >= max_queued {
        return Err(QueueError::QueueFull {
            queued,
            max_queued_jobs: max_queued,
        });
    }
    tx.execute(
        "INSERT INTO jobs (id, account_id, mode, url, formats, headers, timeout_ms, webhook_url,
                           cost, origin, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            &new.id,
            &new.account_id,
            &new.mode.as_str(),
            &new.url,
            &new.formats,
            &headers_json(new),
            &new.timeout_ms,
            &new.webhook_url,
            &new.cost,
            &new.origin,
            &new.idempotency_key,
        ],
    )
    .await?;
    tx.execute("SELECT pg_notify($1, 'queued')", &[&CHANNEL])
        .await?;
    crate::metrics::jobs().transition("queued");
    Ok(None)
}

fn headers_json(new: &NewJob) -> Option<serde_json::Value> {
    if new.headers.is_empty() {
        None
    } else {
        Some(json!(new.headers))
    }
}

/// The job as a claim would leave it: `running`, attempt 1, leased to `start.owner`. No
/// `queued` notification: there is nothing for any worker to take.
async fn insert_running(
    tx: &Transaction<'_>,
    new: &NewJob,
    start: StartHere,
) -> Result<Claimed, QueueError> {
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO jobs (id, account_id, mode, url, formats, headers, timeout_ms,
                                   webhook_url, cost, origin, idempotency_key, status, attempts,
                                   lease_owner, lease_expires_at, started_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'running', 1, $12,
                         now() + make_interval(secs => $13), now())
                 RETURNING {CLAIMED_COLUMNS}"
            ),
            &[
                &new.id,
                &new.account_id,
                &new.mode.as_str(),
                &new.url,
                &new.formats,
                &headers_json(new),
                &new.timeout_ms,
                &new.webhook_url,
                &new.cost,
                &new.origin,
                &new.idempotency_key,
                &start.owner,
                &start.lease.as_secs_f64(),
            ],
        )
        .await?;
    Ok(claimed_from_row(&row))
}
