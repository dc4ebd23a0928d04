//! What is queued and waiting, for operators and metrics.

use deadpool_postgres::GenericClient;

use super::{ConcurrencyLimits, QueueError};

/// Counts of jobs by status, for operators and metrics.
pub async fn depth(db: &impl GenericClient) -> Result<Vec<(String, i64)>, QueueError> {
    let rows = db
        .query(
            "SELECT status, count(*) FROM jobs WHERE status IN ('queued', 'running') GROUP BY status",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// What is waiting, for operators' alerts: see [`backlog`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    /// Seconds the oldest claimable job has waited: queued, and its account below its
    /// tier's running-job limit, so only missing worker capacity keeps it waiting (0: none).
    pub oldest_claimable_secs: f64,
    /// Job webhook deliveries neither delivered nor given up…
    pub webhooks_pending: i64,
    /// …of which the last attempt failed…
    pub webhooks_retrying: i64,
    /// …belonging to this many accounts (one customer's broken endpoint is not an outage;
    /// many accounts failing at once points at our side).
    pub webhooks_failing_accounts: i64,
    /// Seconds the most overdue pending delivery is past its due time (0: none due).
    pub webhooks_overdue_secs: f64,
}

/// The queue's and the webhook outbox's backlog in one round trip. Both read only what
/// their partial indexes cover (`jobs_queued`, `job_webhooks_due`), so the cost follows the
/// backlog, not the tables' history.
///
/// The queue's age is that of the job [`claim`] would take next. Jobs held back by their
/// own account's concurrency limit do not count: one customer filling its slots with slow
/// jobs waits on itself, and must not look like (or page anyone as) a shortage of workers.
pub async fn backlog(
    db: &impl GenericClient,
    limits: &ConcurrencyLimits,
) -> Result<Backlog, QueueError> {
    let row = db
        .query_one(
            "SELECT COALESCE((SELECT EXTRACT(EPOCH FROM now() - j.created_at)
                                FROM jobs j JOIN accounts a ON a.id = j.account_id
                               WHERE j.status = 'queued'
                                 AND (SELECT count(*) FROM jobs r
                                       WHERE r.account_id = j.account_id AND r.status = 'running')
                                     < COALESCE((SELECT l.max FROM unnest($1::text[], $2::int8[]) AS l(tier, max)
                                                  WHERE l.tier = a.tier), $3)
                               ORDER BY j.created_at
                               LIMIT 1), 0)::float8,
                    count(*),
                    count(*) FILTER (WHERE last_error IS NOT NULL),
                    count(DISTINCT account_id) FILTER (WHERE last_error IS NOT NULL),
                    COALESCE(EXTRACT(EPOCH FROM now() - min(next_attempt_at)), 0)::float8
               FROM job_webhooks
              WHERE delivered_at IS NULL AND failed_at IS NULL",
            &[&limits.names, &limits.limits, &limits.default],
        )
        .await?;
    Ok(Backlog {
        oldest_claimable_secs: row.get(0),
        webhooks_pending: row.get(1),
        webhooks_retrying: row.get(2),
        webhooks_failing_accounts: row.get(3),
        webhooks_overdue_secs: row.get(4),
    })
}
