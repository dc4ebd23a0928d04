//! Creating a job: its cost reserved and the queue cap counted under the account's row lock,
//! in the caller's transaction.

use deadpool_postgres::Transaction;
use serde_json::json;

use super::{NewJob, QueueError, CHANNEL};
use crate::credits::ledger;

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
pub async fn create(tx: &Transaction<'_>, new: &NewJob, max_queued: i64) -> Result<(), QueueError> {
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
        match ledger::reserve(tx, new.account_id, new.cost, new.id).await? {
            ledger::Once::Done(_) => {}
            ledger::Once::AlreadyDone => {
                return Err(QueueError::Invariant("a new job's id already has a charge"))
            }
        }
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
    let headers = if new.headers.is_empty() {
        None
    } else {
        Some(json!(new.headers))
    };
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
            &headers,
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
    Ok(())
}
