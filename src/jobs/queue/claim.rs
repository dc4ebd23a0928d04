//! Claiming: workers take the oldest queued job whose account is under its running-jobs
//! limit, hold it by a lease they renew, and hand it back at shutdown.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use serde_json::Value;
use uuid::Uuid;

use super::{QueueError, CHANNEL};
use crate::tiers::Tiers;

/// A job a worker has claimed: what it needs to run it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub account_id: Uuid,
    pub url: String,
    pub formats: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: i32,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    /// Whether its end is POSTed to a webhook (the finish then writes a delivery row).
    pub has_webhook: bool,
}

impl Claimed {
    /// The time this attempt may take: the first attempt's timeout counts from the job's
    /// creation (its wait in the queue included, as the customer sees it); an attempt after
    /// a crash gets the whole timeout again — the crash was ours, not the customer's.
    pub fn budget(&self, now: DateTime<Utc>) -> Duration {
        let timeout = Duration::from_millis(u64::try_from(self.timeout_ms).unwrap_or(0));
        if self.attempt > 1 {
            return timeout;
        }
        let spent = (now - self.created_at).to_std().unwrap_or_default();
        timeout.saturating_sub(spent)
    }
}

/// The per-tier running-job limits, as arrays for the claim query.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimits {
    pub(super) names: Vec<String>,
    pub(super) limits: Vec<i64>,
    pub(super) default: i64,
}

impl ConcurrencyLimits {
    pub fn from_tiers(tiers: &Tiers) -> Self {
        let mut names = Vec::new();
        let mut limits = Vec::new();
        for name in tiers.names() {
            if let Some(t) = tiers.get(name) {
                names.push(name.to_owned());
                limits.push(if t.unlimited {
                    i64::MAX
                } else {
                    i64::from(t.max_concurrent_jobs)
                });
            }
        }
        let default = i64::from(
            tiers
                .get_or_default(crate::tiers::DEFAULT_TIER)
                .max_concurrent_jobs,
        );
        Self {
            names,
            limits,
            default,
        }
    }

    /// The running-jobs limit of `tier` (`i64::MAX`: unlimited), as [`claim`] reads it.
    pub fn of(&self, tier: &str) -> i64 {
        self.names
            .iter()
            .position(|n| n == tier)
            .and_then(|i| self.limits.get(i).copied())
            .unwrap_or(self.default)
    }
}

/// Whether one more of `account_id`'s jobs may start running, in a worker's claim
/// transaction, which then marks it running before it commits.
///
/// The limit must hold across every way a job starts (a worker's claim here, a sync job
/// started by its own request in [`super::create`]) and across instances: two transactions
/// must not both see "one slot left". Both serialise on the account's row: a submitter holds
/// it already (its reservation updated it), and a claimer takes it here, before counting.
/// The count is a statement of its own, so it reads what the previous holder committed (in
/// READ COMMITTED a statement's snapshot is taken when it starts; a lock wait inside one
/// statement would leave its subqueries on the older snapshot). An unlimited tier has no
/// slot to race for and takes no lock.
///
/// `FOR NO KEY UPDATE`, as the reservation's `UPDATE` takes it: it excludes other starts for
/// the account but not the foreign-key checks of rows inserted for it elsewhere. No deadlock:
/// a claimer holds only its own job row (SKIP LOCKED) besides, a submitter only the account
/// row, and every other writer takes a job's row before its account's.
///
/// (It was a transaction-scoped advisory lock on the account: one more round trip for every
/// sync job, whose request already held the row.)
pub(super) async fn take_slot(
    tx: &Transaction<'_>,
    account_id: Uuid,
    max_running: i64,
) -> Result<bool, QueueError> {
    if max_running == i64::MAX {
        return Ok(true);
    }
    // Wait for, rather than skip, a concurrent start for the same account: it holds the
    // row for a few milliseconds. A worker that gave up here went back to sleep until the
    // next notification or poll (up to KEYMETER_JOB_POLL_MS) with its job still queued, so
    // a burst of jobs for one account ran one claim at a time.
    let lock = tx.prepare_cached(LOCK_ACCOUNT).await?;
    let count = tx.prepare_cached(RUNNING).await?;
    // Sent together; executed in order, the count after the lock was granted.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&account_id];
    let (locked, running) =
        tokio::try_join!(tx.query_opt(&lock, &params), tx.query_one(&count, &params),)?;
    if locked.is_none() {
        return Ok(false);
    }
    let running: i64 = running.get(0);
    Ok(running < max_running)
}

const LOCK_ACCOUNT: &str = "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE";
const RUNNING: &str = "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'running'";

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    /// A job, now running and leased to the claimer.
    Job(Claimed),
    /// Jobs are queued, but none could start: each waits for its account's running slot.
    Waiting,
    /// Nothing is queued (that the claimer may take).
    Empty,
}

/// Claims the oldest queued job whose account is under its running-jobs limit.
///
/// The limit must hold across instances: two workers must not both see "one slot left"
/// for the same account. The candidate row is locked (SKIP LOCKED: other workers take
/// other rows), then [`take_slot`] checks the account's running count again before the job
/// is marked running. `only_origin`: while draining for shutdown, claim only the sync jobs
/// of requests this instance is still serving. The same statement says whether anything is
/// queued at all, so the worker knows whether a freed slot may be what a job waits for.
pub async fn claim(
    db: &Pool,
    owner: Uuid,
    limits: &ConcurrencyLimits,
    lease: Duration,
    only_origin: Option<Uuid>,
) -> Result<Claim, QueueError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let find = tx.prepare_cached(FIND).await?;
    let found = tx
        .query_one(
            &find,
            &[&limits.names, &limits.limits, &limits.default, &only_origin],
        )
        .await?;
    let candidate: Option<Uuid> = found.get(0);
    let Some(id) = candidate else {
        let waiting: bool = found.get(3);
        return Ok(if waiting {
            Claim::Waiting
        } else {
            Claim::Empty
        });
    };
    let account_id: Uuid = found.get(1);
    let max_running: i64 = found.get(2);
    if !take_slot(&tx, account_id, max_running).await? {
        return Ok(Claim::Waiting);
    }
    let start = tx.prepare_cached(&START).await?;
    let row = tx
        .query_one(&start, &[&id, &owner, &lease.as_secs_f64()])
        .await?;
    tx.commit().await?;
    crate::metrics::jobs().transition("running");
    Ok(Claim::Job(claimed_from_row(&row)))
}

/// The oldest queued job whose account is under its limit, and whether any job is queued.
const FIND: &str = "WITH c AS (
                 SELECT j.id, j.account_id,
                        COALESCE((SELECT l.max FROM unnest($1::text[], $2::int8[]) AS l(tier, max)
                                   WHERE l.tier = a.tier), $3) AS max_running
                   FROM jobs j JOIN accounts a ON a.id = j.account_id
                  WHERE j.status = 'queued'
                    AND ($4::uuid IS NULL OR (j.mode = 'sync' AND j.origin = $4))
                    AND (SELECT count(*) FROM jobs r WHERE r.account_id = j.account_id AND r.status = 'running')
                        < COALESCE((SELECT l.max FROM unnest($1::text[], $2::int8[]) AS l(tier, max)
                                     WHERE l.tier = a.tier), $3)
                  ORDER BY j.created_at
                  LIMIT 1
                  FOR UPDATE OF j SKIP LOCKED)
             SELECT c.id, c.account_id, c.max_running,
                    EXISTS (SELECT 1 FROM jobs q WHERE q.status = 'queued'
                              AND ($4::uuid IS NULL OR (q.mode = 'sync' AND q.origin = $4))) AS waiting
               FROM (SELECT 1) AS one LEFT JOIN c ON true";

/// Marks a claimed job running, leased to the claimer.
static START: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = $2,
                lease_expires_at = now() + make_interval(secs => $3),
                started_at = COALESCE(started_at, now())
          WHERE id = $1
          RETURNING {CLAIMED_COLUMNS}"
    )
});

/// What a worker reads of a job it starts, in [`claimed_from_row`]'s order.
pub(super) const CLAIMED_COLUMNS: &str =
    "id, account_id, url, formats, headers, timeout_ms, attempts, created_at,
     webhook_url IS NOT NULL";

pub(super) fn claimed_from_row(row: &tokio_postgres::Row) -> Claimed {
    let headers: Option<Value> = row.get(4);
    let headers: Vec<(String, String)> = headers
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    Claimed {
        id: row.get(0),
        account_id: row.get(1),
        url: row.get(2),
        formats: row.get(3),
        headers,
        timeout_ms: row.get(5),
        attempt: row.get(6),
        created_at: row.get(7),
        has_webhook: row.get(8),
    }
}

/// Extends a running job's lease. `false`: the lease is no longer ours (the job was timed
/// out or re-queued), so the worker should stop.
pub async fn renew(
    db: &Pool,
    id: Uuid,
    owner: Uuid,
    attempt: i32,
    lease: Duration,
) -> Result<bool, QueueError> {
    let client = db.get().await?;
    let renew = client
        .prepare_cached(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4)
              WHERE id = $1 AND status = 'running' AND lease_owner = $2 AND attempts = $3",
        )
        .await?;
    let n = client
        .execute(&renew, &[&id, &owner, &attempt, &lease.as_secs_f64()])
        .await?;
    Ok(n == 1)
}

/// Puts this instance's unfinished jobs back in the queue (graceful shutdown), without
/// counting the interrupted attempt.
pub async fn release_owned(db: &Pool, owner: Uuid) -> Result<u64, QueueError> {
    let client = db.get().await?;
    let n = client
        .execute(
            "UPDATE jobs SET status = 'queued', attempts = greatest(attempts - 1, 0),
                    lease_owner = NULL, lease_expires_at = NULL
              WHERE status = 'running' AND lease_owner = $1",
            &[&owner],
        )
        .await?;
    if n > 0 {
        client
            .execute("SELECT pg_notify($1, 'queued')", &[&CHANNEL])
            .await?;
    }
    Ok(n)
}
