//! Creating a job: its cost reserved and the queue cap counted under the account's row lock,
//! in the caller's transaction; a sync job with a free running slot is started at once. The
//! insert statement is shared with the pipelined, group-committed creation of
//! [`super::Creator`].

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_postgres::Transaction;
use serde_json::json;
use tokio_postgres::types::ToSql;
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
/// queue, inserts the job running or queued (or raises, the queue being full: the error
/// rolls the transaction back), notifies the workers of a queued one and returns the job.
/// It was six to eight statements, each parsed anew
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
    let args = InsertArgs::new(new, max_queued, start);
    let row = tx
        .query_opt(&insert, &args.params(new))
        .await
        .map_err(|e| refusal(e, max_queued))?;
    // The reservation above was written in this transaction, so the insert found it.
    let row = row.ok_or(QueueError::Invariant("a reserved job was not inserted"))?;
    Ok(created(new, &row))
}

/// The job as the insert returned it, and the claim to run when it was started here.
pub(super) fn created(new: &NewJob, row: &tokio_postgres::Row) -> (Job, Option<Claimed>) {
    let job = job_from_row(row);
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
    (job, started)
}

/// The insert's refusal — the queue was full (`keymeter_refuse('queue_full', <queued>)`) —
/// as [`QueueError::QueueFull`]; any other error as the database's.
pub(super) fn refusal(e: tokio_postgres::Error, max_queued: i64) -> QueueError {
    let queued = e
        .as_db_error()
        .filter(|d| d.code().code() == REFUSED && d.message() == "queue_full")
        .map(|d| {
            d.detail()
                .and_then(|n| n.parse().ok())
                .unwrap_or(max_queued)
        });
    match queued {
        Some(queued) => QueueError::QueueFull {
            queued,
            max_queued_jobs: max_queued,
        },
        None => e.into(),
    }
}

/// `keymeter_refuse`'s SQLSTATE (migration V19).
const REFUSED: &str = "KM001";

/// The insert's parameters that are not fields of the job.
pub(super) struct InsertArgs {
    mode: &'static str,
    headers: Option<serde_json::Value>,
    owner: Option<Uuid>,
    lease: f64,
    max_running: i64,
    max_queued: i64,
    /// Insert only if the job's charge is there (a job with a cost).
    charged: bool,
}

impl InsertArgs {
    pub(super) fn new(new: &NewJob, max_queued: i64, start: Option<StartHere>) -> Self {
        let (owner, lease, max_running) = match start {
            Some(s) => (Some(s.owner), s.lease.as_secs_f64(), s.max_running),
            None => (None, 0.0, 0),
        };
        InsertArgs {
            mode: new.mode.as_str(),
            headers: headers_json(new),
            owner,
            lease,
            max_running,
            max_queued,
            charged: new.cost > 0,
        }
    }

    pub(super) fn params<'a>(&'a self, new: &'a NewJob) -> [&'a (dyn ToSql + Sync); 17] {
        [
            &new.id,
            &new.account_id,
            &self.mode,
            &new.url,
            &new.formats,
            &self.headers,
            &new.timeout_ms,
            &new.webhook_url,
            &new.cost,
            &new.origin,
            &new.idempotency_key,
            &self.owner,
            &self.lease,
            &self.max_running,
            &self.max_queued,
            &CHANNEL,
            &self.charged,
        ]
    }
}

/// `$17` set (a job with a cost): nothing unless the job's charge is there — written by the
/// reservation before it in the same transaction; without it the reservation was refused
/// and the whole flight writes nothing. `$12` (the lease owner) set: start the job if the
/// account runs fewer than `$14` jobs. Otherwise queue it if the account has fewer than
/// `$15` queued (the queued count is only taken when the job would queue); at the cap,
/// `keymeter_refuse('queue_full', <queued>)` aborts the transaction, reservation included.
/// The CTEs are MATERIALIZED: inlined, their counts would run once for each CASE reading
/// them, and a CASE is what orders the refusal after the other conditions.
pub(super) static INSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH s AS MATERIALIZED (
             SELECT (NOT $17::bool
                     OR EXISTS (SELECT 1 FROM credit_ledger
                                 WHERE job_id = $1::uuid AND kind = 'charge')) AS charged,
                    $12::uuid IS NOT NULL
                    AND (SELECT count(*) FROM jobs
                          WHERE account_id = $2::uuid AND status = 'running') < $14::int8 AS start),
         q AS MATERIALIZED (
             SELECT s.charged, s.start,
                    CASE WHEN s.charged AND NOT s.start
                         THEN (SELECT count(*) FROM jobs
                                WHERE account_id = $2 AND status = 'queued') END AS queued
               FROM s),
         ins AS (
             INSERT INTO jobs AS j (id, account_id, mode, url, formats, headers, timeout_ms,
                                    webhook_url, cost, origin, idempotency_key, status,
                                    attempts, lease_owner, lease_expires_at, started_at)
             SELECT $1::uuid, $2::uuid, $3::text, $4::text, $5::text[], $6::jsonb, $7::int4,
                    $8::text, $9::int8, $10::uuid, $11::text,
                    CASE WHEN q.start THEN 'running' ELSE 'queued' END,
                    CASE WHEN q.start THEN 1 ELSE 0 END,
                    CASE WHEN q.start THEN $12::uuid END,
                    CASE WHEN q.start THEN now() + make_interval(secs => $13::float8) END,
                    CASE WHEN q.start THEN now() END
               FROM q
              WHERE CASE WHEN NOT q.charged THEN false
                         WHEN q.start OR q.queued < $15::int8 THEN true
                         ELSE keymeter_refuse('queue_full', q.queued::text)
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
