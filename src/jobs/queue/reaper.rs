//! The reaper: jobs whose worker died go back to the queue or fail; jobs that waited past
//! their deadline fail; finished jobs past their retention are deleted.

use std::time::Duration;

use deadpool_postgres::Pool;
use uuid::Uuid;

use super::{finalize, End, Fence, QueueError, CHANNEL, MAX_ATTEMPTS};

/// What one reaper pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reaped {
    pub requeued: u64,
    pub failed: u64,
    pub expired: u64,
}

/// Jobs whose lease expired (their instance died) go back to the queue, or — after
/// [`MAX_ATTEMPTS`] — fail and are refunded; first-attempt jobs still queued past their
/// deadline fail as timed out. Safe to run on every instance at once (SKIP LOCKED).
pub async fn reap(db: &Pool) -> Result<Reaped, QueueError> {
    let mut out = Reaped::default();
    {
        let client = db.get().await?;
        out.requeued = client
            .execute(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL
                  WHERE id IN (SELECT id FROM jobs
                                WHERE status = 'running' AND lease_expires_at < now()
                                  AND attempts < $1
                                FOR UPDATE SKIP LOCKED)",
                &[&MAX_ATTEMPTS],
            )
            .await?;
        if out.requeued > 0 {
            client
                .execute("SELECT pg_notify($1, 'queued')", &[&CHANNEL])
                .await?;
        }
    }
    loop {
        let mut client = db.get().await?;
        let tx = client.transaction().await?;
        let dead = tx
            .query_opt(
                "SELECT id, status FROM jobs
                  WHERE (status = 'running' AND lease_expires_at < now() AND attempts >= $1)
                     OR (status = 'queued' AND attempts = 0
                         AND created_at + make_interval(secs => timeout_ms / 1000.0) < now())
                  LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&MAX_ATTEMPTS],
            )
            .await?;
        let Some(dead) = dead else {
            return Ok(out);
        };
        let id: Uuid = dead.get(0);
        let status: String = dead.get(1);
        let end = if status == "running" {
            out.failed += 1;
            End::failed(
                "worker_lost",
                format!("The job's worker stopped responding {MAX_ATTEMPTS} times."),
            )
        } else {
            out.expired += 1;
            End::failed("timeout", "The job waited in the queue past its timeout.")
        };
        let fence: &'static [&'static str] = if status == "running" {
            &["running"]
        } else {
            &["queued"]
        };
        finalize(&tx, id, &end, Fence::From(fence)).await?;
        tx.commit().await?;
    }
}

/// Deletes finished jobs (and their webhook deliveries) older than `retention`, a batch at
/// a time. The ledger keeps their money movements: it refers to jobs by id only.
pub async fn purge(db: &Pool, retention: Duration) -> Result<u64, QueueError> {
    let client = db.get().await?;
    let n = client
        .execute(
            "WITH old AS (
                 SELECT id FROM jobs
                  WHERE status IN ('succeeded', 'failed', 'cancelled')
                    AND finished_at < now() - make_interval(secs => $1)
                  LIMIT 1000
                  FOR UPDATE SKIP LOCKED),
             hooks AS (DELETE FROM job_webhooks WHERE job_id IN (SELECT id FROM old))
             DELETE FROM jobs WHERE id IN (SELECT id FROM old)",
            &[&retention.as_secs_f64()],
        )
        .await?;
    Ok(n)
}
