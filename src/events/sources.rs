//! The events that key changes and operator grants record, each built in one place so every
//! path that makes the change (a customer's key, the operator's CLI or API) records the same
//! facts. Always called on the change's own transaction.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::json;

use super::{record, EventType};
use crate::auth::key_store::KeyView;
use crate::credits::ledger::Movement;
use crate::db;

/// `key.created` `{key_id, name, scopes, expires_at}`.
pub async fn key_created(tx: &impl GenericClient, k: &KeyView) -> Result<(), db::Error> {
    record(
        tx,
        k.account_id,
        EventType::KeyCreated,
        json!({"key_id": k.id, "name": k.name, "scopes": k.scopes, "expires_at": k.expires_at}),
    )
    .await?;
    Ok(())
}

/// `key.revoked` `{key_id, name}` — only when this transaction revoked the key: revoking is
/// idempotent, and a repeated revoke must not announce it again. A key revoked by this
/// transaction carries the transaction's `now()` as its `revoked_at`.
pub async fn key_revoked(tx: &impl GenericClient, k: &KeyView) -> Result<(), db::Error> {
    let now: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);
    if k.revoked_at != Some(now) {
        return Ok(());
    }
    record(
        tx,
        k.account_id,
        EventType::KeyRevoked,
        json!({"key_id": k.id, "name": k.name}),
    )
    .await?;
    Ok(())
}

/// `credits.granted` `{amount, balance_after, source: "grant", ledger_entry_id}` for an
/// operator's grant (a positive adjustment). The operator's `reason` stays out: it is an
/// internal note.
pub async fn credits_granted(tx: &impl GenericClient, m: &Movement) -> Result<(), db::Error> {
    if m.delta <= 0 {
        return Ok(());
    }
    record(
        tx,
        m.account_id,
        EventType::CreditsGranted,
        json!({
            "amount": m.delta,
            "balance_after": m.balance_after,
            "source": "grant",
            "ledger_entry_id": m.id,
        }),
    )
    .await?;
    Ok(())
}

/// The event of a job's end: `job.succeeded` or `job.failed` with `{job_id, status, url,
/// cost, charged, refunded, error}` (never the result, which can be megabytes). A cancelled
/// job has none: the customer ended it.
pub fn job_finished(job: &crate::jobs::queue::Job) -> Option<super::NewEvent> {
    let t = match job.status.as_str() {
        "succeeded" => EventType::JobSucceeded,
        "failed" => EventType::JobFailed,
        _ => return None,
    };
    Some(super::NewEvent::new(
        job.account_id,
        t,
        json!({
            "job_id": job.id,
            "status": job.status,
            "url": job.url,
            "cost": job.cost,
            "charged": job.charged,
            "refunded": job.refunded,
            "error": job.error,
        }),
    ))
}

/// Records a job's end event (if it has one) on the transaction that ends it.
pub async fn record_job_finished(
    tx: &impl GenericClient,
    job: &crate::jobs::queue::Job,
) -> Result<(), db::Error> {
    if let Some(e) = job_finished(job) {
        record(tx, e.account_id, e.event_type, e.payload).await?;
    }
    Ok(())
}
