//! Creating a job: its cost reserved and the queue cap counted under the account's row lock,
//! in the caller's transaction; a sync job with a free running slot is started at once.

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_postgres::Transaction;
use serde_json::json;
use uuid::Uuid;

use super::{job_from_row, Claimed, Job, NewJob, QueueError, CHANNEL, JOB_COLUMNS};
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

/// Reserves the cost and queues the job, in the caller's transaction, and returns it as a
/// read would (so the caller need not read it back). The reservation locks the account row
/// first, so concurrent creations for one account are counted against the queue cap, and
/// against the running limit, one after the other. The ledger's refusal when the balance is
/// short, [`QueueError::QueueFull`] beyond the tier's queued-jobs cap: either way nothing is
/// written.
///
/// A job whose formats are all free (a tier price of 0) reserves nothing: the ledger holds
/// credit movements, and a zero-delta row would be none. Its end then has nothing to refund
/// (`ledger::refund` finds no charge and writes nothing), so it settles like any other job.
/// The account row is still locked first, so the queue cap is counted the same way.
///
/// With `start`, a job whose account has a free running slot (counted under the account's
/// row lock, the lock a worker's claim takes too: see [`super::claim`]'s `take_slot`) is
/// inserted already `running`, leased to `start.owner` as a claim would lease it (attempt
/// 1), and also returned as [`Claimed`] for the caller to run once this transaction has
/// committed: no queue round trip, no claim transaction. Its lease is an ordinary one, so if
/// this instance dies the reaper re-queues it like any claimed job. Without a free slot the
/// job is queued as usual (and counts against the queue cap).
///
/// Two statements after BEGIN, each prepared once per connection: the reservation, then one
/// statement that counts the running slot, counts the queue cap only when the job would
/// queue, inserts the job running or queued (or not at all), notifies the workers of a
/// queued one and returns the job. It was six to eight statements, each parsed anew
/// (advisory lock, running count, queued count, insert, notification, re-read).
pub async fn create(
    tx: &Transaction<'_>,
    new: &NewJob,
    max_queued: i64,
    start: Option<StartHere>,
) -> Result<(Job, Option<Claimed>), QueueError> {
    if new.cost == 0 {
        let lock = tx
            .prepare_cached("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
            .await?;
        if tx.query_opt(&lock, &[&new.account_id]).await?.is_none() {
            return Err(QueueError::AccountNotFound);
        }
    } else {
        match ledger::reserve(tx, new.account_id, new.cost, new.id, new.key_id.as_deref()).await? {
            ledger::Once::Done(_) => {}
            ledger::Once::AlreadyDone | ledger::Once::Replayed { .. } => {
                return Err(QueueError::Invariant("a new job's id already has a charge"))
            }
        }
    }
    // A separate statement from the lock's: its snapshot is taken after the lock was
    // granted, so it counts what the previous holder committed.
    let insert = tx.prepare_cached(&INSERT).await?;
    let (owner, lease, max_running) = match start {
        Some(s) => (Some(s.owner), s.lease.as_secs_f64(), s.max_running),
        None => (None, 0.0, 0),
    };
    let row = tx
        .query_opt(
            &insert,
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
                &owner,
                &lease,
                &max_running,
                &max_queued,
                &CHANNEL,
            ],
        )
        .await?;
    let Some(row) = row else {
        let count = tx
            .prepare_cached("SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'queued'")
            .await?;
        let queued: i64 = tx.query_one(&count, &[&new.account_id]).await?.get(0);
        return Err(QueueError::QueueFull {
            queued,
            max_queued_jobs: max_queued,
        });
    };
    let job = job_from_row(&row);
    crate::metrics::jobs().transition(&job.status);
    let started = (job.status == "running").then(|| Claimed {
        id: job.id,
        account_id: job.account_id,
        url: job.url.clone(),
        formats: job.formats.clone(),
        headers: new.headers.clone(),
        timeout_ms: job.timeout_ms,
        attempt: job.attempts,
        created_at: job.created_at,
        has_webhook: job.webhook_url.is_some(),
    });
    Ok((job, started))
}

/// `$12` (the lease owner) set: start the job if the account runs fewer than `$14` jobs.
/// Otherwise queue it if the account has fewer than `$15` queued (CASE: the queued count is
/// only taken when the job would queue). No row: the queue is full. `s` is MATERIALIZED:
/// inlined, its count would run once for each CASE that reads it.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH s AS MATERIALIZED (
             SELECT $12::uuid IS NOT NULL
                    AND (SELECT count(*) FROM jobs
                          WHERE account_id = $2::uuid AND status = 'running') < $14::int8 AS start),
         ins AS (
             INSERT INTO jobs AS j (id, account_id, mode, url, formats, headers, timeout_ms,
                                    webhook_url, cost, origin, idempotency_key, status,
                                    attempts, lease_owner, lease_expires_at, started_at)
             SELECT $1::uuid, $2::uuid, $3::text, $4::text, $5::text[], $6::jsonb, $7::int4,
                    $8::text, $9::int8, $10::uuid, $11::text,
                    CASE WHEN s.start THEN 'running' ELSE 'queued' END,
                    CASE WHEN s.start THEN 1 ELSE 0 END,
                    CASE WHEN s.start THEN $12::uuid END,
                    CASE WHEN s.start THEN now() + make_interval(secs => $13::float8) END,
                    CASE WHEN s.start THEN now() END
               FROM s
              WHERE CASE WHEN s.start THEN true
                         ELSE (SELECT count(*) FROM jobs
                                WHERE account_id = $2 AND status = 'queued') < $15::int8
                    END
             RETURNING {JOB_COLUMNS})
         SELECT ins.*,
                CASE WHEN ins.status = 'queued' THEN pg_notify($16, 'queued') END AS notified
           FROM ins"
    )
});

fn headers_json(new: &NewJob) -> Option<serde_json::Value> {
    if new.headers.is_empty() {
        None
    } else {
        Some(json!(new.headers))
    }
}
