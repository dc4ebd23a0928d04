//! Waiting for a job's end, for `POST /v1/scrape`: woken by the job's notification, with a
//! one-second look at the database as a backstop; at its deadline the job is ended as timed
//! out (and refunded), and at shutdown the wait is handed off with the job still going.
//!
//! Then [`succeeded`] says, in the domain's words, why a job that ended did not succeed
//! ([`JobFailed`]); the HTTP layer turns that into the problem a client reads.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use serde_json::Value;
use uuid::Uuid;

use super::queue::{self, Job, QueueError};
use super::wakeups::{Waiter, Wakeups};

/// How long a waiting request gives the worker past the job's own timeout to record it.
pub const FINISH_GRACE: Duration = Duration::from_secs(2);

/// Which job to wait for.
pub enum Follow {
    /// One just queued, as its transaction returned it, with the waiter registered before
    /// it was (so its end cannot be missed, and the wait need not read it first).
    Queued(Box<Job>, Waiter),
    /// One queued by an earlier request with the same `Idempotency-Key`.
    Replayed(Uuid),
}

/// How a wait for a job ended.
pub enum Waited {
    /// The job finished (or was ended as timed out).
    Ended(Job),
    /// The instance is shutting down; the job had not finished yet.
    HandedOff(Job),
}

/// Why a wait failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The job could not be read before the wait began (a replayed key's job was deleted,
    /// past the retention; the database was away).
    #[error(transparent)]
    Read(QueueError),
    /// The job is queued and durable, but this request could not follow it to its end.
    #[error("lost track of job {job_id}: {source}")]
    LostTrack {
        job_id: Uuid,
        #[source]
        source: QueueError,
    },
}

/// Waits until the job ends, its deadline passes (it is then ended as timed out), or the
/// instance hands waiting requests off at shutdown.
pub async fn follow(
    db: &Pool,
    wakeups: &Arc<Wakeups>,
    account_id: Uuid,
    what: Follow,
) -> Result<Waited, WaitError> {
    let (job, waiter, fresh) = match what {
        Follow::Queued(job, waiter) => (*job, waiter, true),
        Follow::Replayed(id) => {
            // Register first: the job may end between the read and the wait.
            let waiter = wakeups.register(id);
            let job = async {
                let client = db.get().await?;
                queue::get(&client, account_id, id).await
            }
            .await
            .map_err(WaitError::Read)?
            .ok_or(WaitError::Read(QueueError::JobNotFound))?;
            (job, waiter, false)
        }
    };
    wait(db, wakeups, account_id, &job, &waiter, fresh)
        .await
        .map_err(|source| WaitError::LostTrack {
            job_id: job.id,
            source,
        })
}

async fn wait(
    db: &Pool,
    wakeups: &Arc<Wakeups>,
    account_id: Uuid,
    job: &Job,
    waiter: &Waiter,
    fresh: bool,
) -> Result<Waited, QueueError> {
    let timeout = Duration::from_millis(u64::try_from(job.timeout_ms).unwrap_or(0));
    let elapsed = (Utc::now() - job.created_at).to_std().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + timeout.saturating_sub(elapsed) + FINISH_GRACE;
    let mut handed_off = false;
    // A job its own request just created cannot have ended unseen: its waiter was there
    // first. Reading it back at once would be a round trip per sync job that can only find
    // it queued or running, so the first read waits for the first wake-up.
    let mut skip_read = fresh && !job.is_finished();
    loop {
        if std::mem::take(&mut skip_read) {
            tokio::select! {
                () = waiter.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = tokio::time::sleep_until(deadline) => {}
                () = wakeups.handed_off() => handed_off = true,
            }
            continue;
        }
        // Ended by this instance: the finish handed over the committed row.
        if let Some(ended) = waiter.take_ended() {
            return Ok(Waited::Ended(ended));
        }
        let current = {
            let client = db.get().await?;
            queue::get(&client, account_id, job.id).await?
        }
        .ok_or(QueueError::JobNotFound)?;
        if current.is_finished() {
            return Ok(Waited::Ended(current));
        }
        if handed_off {
            return Ok(Waited::HandedOff(current));
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(ended) =
                queue::time_out(db, job.id, "The job did not finish within its timeout.").await?
            {
                return Ok(Waited::Ended(ended));
            }
            continue; // It ended just now: read it again.
        }
        tokio::select! {
            () = waiter.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = tokio::time::sleep_until(deadline) => {}
            // Read the job once more, so the answer shows its latest state.
            () = wakeups.handed_off() => handed_off = true,
        }
    }
}

/// How a job that did not succeed ended, by its `error.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `timeout`: its `timeout_ms` ran out.
    TimedOut,
    /// `circuit_open`: the origin's or the provider's breaker opened while it waited.
    CircuitOpen,
    /// `not_allowed`: a redirect led to a refused address.
    UrlNotAllowed,
    /// `cancelled`: cancelled before it ran.
    Cancelled,
    /// Any other reason: the site failed, or its page could not be processed.
    UpstreamFailed,
}

impl Failure {
    fn of(reason: &str) -> Failure {
        match reason {
            "timeout" => Failure::TimedOut,
            "circuit_open" => Failure::CircuitOpen,
            "not_allowed" => Failure::UrlNotAllowed,
            "cancelled" => Failure::Cancelled,
            _ => Failure::UpstreamFailed,
        }
    }
}

/// A job that ended without succeeding (and was refunded): what a waiting client is told.
/// `Display` is the job's own `error.detail`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct JobFailed {
    pub failure: Failure,
    pub job_id: Uuid,
    /// `error.reason` (`failed` when it has none).
    pub reason: String,
    pub detail: String,
    pub refunded: bool,
    pub cost: i64,
    /// `error.upstream_status` as stored (`null` when the site did not answer), absent when
    /// the job's error has none (a cancelled job).
    pub upstream_status: Option<Value>,
}

/// The job when it succeeded, else why not.
pub fn succeeded(job: Job) -> Result<Job, Box<JobFailed>> {
    if job.status == "succeeded" {
        return Ok(job);
    }
    let reason = job.failure_reason().unwrap_or("failed").to_owned();
    let detail = job
        .error
        .as_ref()
        .and_then(|e| e.get("detail"))
        .and_then(|d| d.as_str())
        .unwrap_or("The job failed.")
        .to_owned();
    let upstream_status = job
        .error
        .as_ref()
        .and_then(|e| e.get("upstream_status"))
        .cloned();
    Err(Box::new(JobFailed {
        failure: Failure::of(&reason),
        job_id: job.id,
        reason,
        detail,
        refunded: job.refunded,
        cost: job.cost,
        upstream_status,
    }))
}
