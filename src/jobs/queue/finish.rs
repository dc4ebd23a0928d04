//! Ending a job: [`finalize`] in the caller's transaction (a cancel, a waiting request's
//! timeout, the reaper), or, for a worker's result, the same writes for many jobs at once
//! through the group-commit lane in `finish_lane` ([`super::Finisher`]), which falls back to
//! [`finalize`] job by job when a batch fails.

use chrono::Utc;
use deadpool_postgres::{Pool, Transaction};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{get, get_any, Job, QueueError, CHANNEL};
use crate::credits::key_caps;

/// How a job ends.
#[derive(Debug, Clone)]
pub enum End {
    Succeeded {
        result: Value,
        upstream_status: u16,
    },
    Failed {
        reason: String,
        detail: String,
        upstream_status: Option<u16>,
    },
    Cancelled,
}

impl End {
    pub fn failed(reason: impl Into<String>, detail: impl Into<String>) -> End {
        End::Failed {
            reason: reason.into(),
            detail: detail.into(),
            upstream_status: None,
        }
    }

    /// The `result`, `error` and `upstream_status` columns a job ending this way gets.
    pub(super) fn columns(&self) -> (Option<&Value>, Option<Value>, Option<i32>) {
        match self {
            End::Succeeded {
                result,
                upstream_status,
            } => (Some(result), None, Some(i32::from(*upstream_status))),
            End::Failed {
                reason,
                detail,
                upstream_status,
            } => (
                None,
                Some(
                    json!({"reason": reason, "detail": detail, "upstream_status": upstream_status}),
                ),
                upstream_status.map(i32::from),
            ),
            End::Cancelled => (
                None,
                Some(json!({"reason": "cancelled", "detail": "Cancelled before it ran."})),
                None,
            ),
        }
    }

    /// The refund's ledger reason; `None` when the job keeps its charge (it succeeded).
    pub(super) fn refund_reason(&self) -> Option<&str> {
        match self {
            End::Succeeded { .. } => None,
            End::Failed { reason, .. } => Some(reason),
            End::Cancelled => Some("cancelled"),
        }
    }

    pub(super) fn status(&self) -> &'static str {
        match self {
            End::Succeeded { .. } => "succeeded",
            End::Failed { .. } => "failed",
            End::Cancelled => "cancelled",
        }
    }
}

/// Who may end a job: its worker while it holds the lease, or anyone from given statuses.
#[derive(Debug, Clone, Copy)]
pub enum Fence {
    Lease { owner: Uuid, attempt: i32 },
    From(&'static [&'static str]),
}

/// Ends a job in the caller's transaction: the status change (only if `fence` allows it),
/// the refund unless it succeeded, the webhook delivery, the notification. `None` when the
/// fence did not hold (someone else ended or re-queued it): nothing was written.
pub async fn finalize(
    tx: &Transaction<'_>,
    id: Uuid,
    end: &End,
    fence: Fence,
) -> Result<Option<Job>, QueueError> {
    let (result, error, upstream_status) = end.columns();
    let (owner, attempt, from): (Option<Uuid>, Option<i32>, Vec<&str>) = match fence {
        Fence::Lease { owner, attempt } => (Some(owner), Some(attempt), vec!["running"]),
        Fence::From(statuses) => (None, None, statuses.to_vec()),
    };
    let end_stmt = tx
        .prepare_cached(
            "UPDATE jobs SET status = $2, result = $3, error = $4, upstream_status = $5,
                    finished_at = now(), headers = NULL, lease_owner = NULL, lease_expires_at = NULL
              WHERE id = $1 AND status = ANY($6)
                AND ($7::uuid IS NULL OR (lease_owner = $7 AND attempts = $8))
              RETURNING webhook_url",
        )
        .await?;
    let updated = tx
        .query_opt(
            &end_stmt,
            &[
                &id,
                &end.status(),
                &result,
                &error,
                &upstream_status,
                &from,
                &owner,
                &attempt,
            ],
        )
        .await?;
    let Some(row) = updated else {
        return Ok(None);
    };
    crate::metrics::jobs().transition(end.status());
    let webhook_url: Option<String> = row.get(0);
    if let Some(reason) = end.refund_reason() {
        key_caps::refund(tx, id, reason).await?;
    }
    let job = get_any(tx, id)
        .await?
        .ok_or_else(|| QueueError::Invariant("a finalized job vanished"))?;
    crate::events::sources::record_job_finished(tx, &job).await?;
    if let Some(url) = webhook_url {
        let hook = Webhook::new(&job, url);
        let insert = tx
            .prepare_cached(
                "INSERT INTO job_webhooks (job_id, account_id, url, event_id, event_type, payload)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        tx.execute(
            &insert,
            &[
                &id,
                &job.account_id,
                &hook.url,
                &hook.event_id,
                &hook.event_type,
                &hook.payload,
            ],
        )
        .await?;
    }
    let notify = tx
        .prepare_cached("SELECT pg_notify($1, 'done:' || $2::text)")
        .await?;
    tx.execute(&notify, &[&CHANNEL, &id.to_string()]).await?;
    Ok(Some(job))
}

/// The delivery row of a finished job's webhook: `job.<status>` with the job as its data.
pub(super) struct Webhook {
    pub url: String,
    pub event_id: Uuid,
    pub event_type: String,
    pub payload: Value,
}

impl Webhook {
    pub fn new(job: &Job, url: String) -> Webhook {
        let event_id = Uuid::now_v7();
        let event_type = format!("job.{}", job.status);
        let payload = json!({
            "id": format!("evt_{}", event_id.simple()),
            "object": "event",
            "type": event_type,
            "created": Utc::now().timestamp(),
            "data": job,
        });
        Webhook {
            url,
            event_id,
            event_type,
            payload,
        }
    }
}

/// `DELETE /v1/jobs/{id}`: cancels a queued job and refunds it. A job already running or
/// finished cannot be cancelled ([`QueueError::JobNotCancellable`]).
pub async fn cancel(db: &Pool, account_id: Uuid, id: Uuid) -> Result<Job, QueueError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let current = get(&tx, account_id, id)
        .await?
        .ok_or(QueueError::JobNotFound)?;
    if current.status != "queued" {
        return Err(QueueError::JobNotCancellable {
            status: Some(current.status),
        });
    }
    match finalize(&tx, id, &End::Cancelled, Fence::From(&["queued"])).await? {
        Some(job) => {
            tx.commit().await?;
            Ok(job)
        }
        None => Err(QueueError::JobNotCancellable { status: None }),
    }
}

/// Ends a job that has not finished by its deadline (the waiting request gives up). The
/// worker still running it, if any, finds its lease gone and writes nothing.
pub async fn time_out(db: &Pool, id: Uuid, detail: &str) -> Result<Option<Job>, QueueError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let job = finalize(
        &tx,
        id,
        &End::failed("timeout", detail),
        Fence::From(&["queued", "running"]),
    )
    .await?;
    tx.commit().await?;
    Ok(job)
}
