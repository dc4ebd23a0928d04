//! The `jobs` table: creating (with the cost reserved in the same transaction), claiming
//! (FOR UPDATE SKIP LOCKED, the account's concurrency limit checked under the account's row
//! lock, which a creation holds already), lease renewal, finishing (fenced by lease owner
//! and attempt, refund and webhook in the same transaction) and the reaper for expired
//! leases.
//!
//! Every way a job ends goes through [`finalize`] (or, for the workers' results, its batched
//! twin [`Finisher`], which writes the same rows for many jobs in one transaction): one
//! UPDATE that only succeeds from an expected status (and, for a worker, only while it still
//! holds the lease), followed in the same transaction by the refund when the job did not
//! succeed, the webhook delivery row and the notification that wakes a waiting
//! `POST /v1/scrape`. A worker that lost its lease (the reaper re-queued the job, a waiting
//! request timed it out) finds zero rows and writes nothing.
//!
//! Every statement on a job's path is prepared once per connection (`prepare_cached`): a
//! statement sent as text is a Parse and its round trip before each execution, and a sync
//! job used to make about seventeen of them.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::jobs::extract::{Extracted, Format};

mod claim;
mod create_lane;
mod enqueue;
mod finish;
mod finish_lane;
mod reaper;
mod stats;

pub use claim::{claim, release_owned, renew, Claim, Claimed, ConcurrencyLimits};
pub use create_lane::Creator;
pub use enqueue::{create, StartHere};
pub use finish::{cancel, finalize, time_out, End, Fence};
pub use finish_lane::Finisher;
/// The finish lane's statement, public for the test that reads its plan.
#[doc(hidden)]
pub use finish_lane::END as FINISH_STATEMENT;
pub use reaper::{purge, reap, Reaped};
pub use stats::{backlog, depth, Backlog};

/// Why the queue refused or could not do something. The `Display` text is the sentence a
/// client reads as the problem's `detail`.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No job with that id on this account (or none at all).
    #[error("No job with that id.")]
    JobNotFound,
    /// A job was created for an account that does not exist.
    #[error("No account with that id.")]
    AccountNotFound,
    /// The account already has `queued` jobs waiting, as many as its tier allows
    /// (`max_queued_jobs`). Nothing was written.
    #[error(
        "This account already has {queued} queued jobs, the most its tier allows; \
         wait for some to finish."
    )]
    QueueFull { queued: i64, max_queued_jobs: i64 },
    /// Only a queued job can be cancelled. `status`: the job's status when it was read, or
    /// `None` when it was still queued then but started before the cancel could end it.
    #[error("{}", not_cancellable_detail(.status.as_deref()))]
    JobNotCancellable { status: Option<String> },
    /// Something that cannot happen did (a row vanished inside its own transaction).
    #[error("{0}")]
    Invariant(&'static str),
    /// The ledger refused or failed (reserving a job's cost, refunding it).
    #[error(transparent)]
    Credits(#[from] crate::credits::Error),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

crate::impl_db_error_from!(QueueError);

fn not_cancellable_detail(status: Option<&str>) -> String {
    match status {
        Some(s) => format!("The job is {s}; only a queued job can be cancelled."),
        None => "The job started running; only a queued job can be cancelled.".to_owned(),
    }
}

/// NOTIFY channel: `queued` (wake workers) and `done:<job id>` (wake a waiting request).
pub const CHANNEL: &str = "keymeter_jobs";
/// A job whose worker died is run again until it has been claimed this many times.
pub const MAX_ATTEMPTS: i32 = 3;

pub const STATUSES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

/// `sync`: `POST /v1/scrape`, which waits for the job; `async`: `POST /v1/jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(as = JobMode, rename_all = "lowercase")]
pub enum Mode {
    Sync,
    Async,
}

/// A job's status: `queued` → `running` → `succeeded` or `failed`; a queued job may be
/// `cancelled`. The last three are final.
// Only describes the values of `Job::status` (see [`STATUSES`]).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// Why a job did not succeed.
// `Job::error` as [`finalize`] writes it; this type only describes that JSON.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobError {
    /// Why, as a stable slug: `timeout` (the job's `timeout_ms` ran out, in the queue or
    /// running), `server_error` (5xx), `rate_limited` (429), `blocked` (401, 403, 407, 451),
    /// `unexpected_status` (any other status but 2xx, 404, 410), `dns`, `connect`, `tls`,
    /// `network`, `too_many_redirects`, `not_allowed` (a redirect to a refused address),
    /// `invalid_url`, `invalid_request`, `circuit_open` (the host's or the egress provider's
    /// breaker opened while the job waited), `extraction_failed`, `worker_lost` (its worker
    /// died three times), `cancelled`.
    #[schema(examples("timeout", "server_error", "cancelled"))]
    reason: String,
    /// What happened, for people.
    detail: String,
    /// The upstream's HTTP status when it answered; `null` when it did not. Absent on a
    /// cancelled job.
    upstream_status: Option<u16>,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

/// What a route asks to run.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub account_id: Uuid,
    pub mode: Mode,
    pub url: String,
    pub formats: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: i32,
    pub webhook_url: Option<String>,
    pub cost: i64,
    pub origin: Uuid,
    pub idempotency_key: Option<String>,
    /// The key that submitted it: its charge and refund name it, and its spend limit applies.
    pub key_id: Option<String>,
}

/// Durations of a job's phases, in milliseconds (`null` until the phase has ended).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = JobTimings)]
pub struct Timings {
    /// From creation to the first start.
    #[schema(required = true, minimum = 0)]
    pub queued_ms: Option<i64>,
    /// From the first start to the end.
    #[schema(required = true, minimum = 0)]
    pub run_ms: Option<i64>,
    /// From creation to the end.
    #[schema(required = true, minimum = 0)]
    pub total_ms: Option<i64>,
}

/// A job as customers see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Job {
    #[schema(value_type = String, example = "job")]
    pub object: &'static str,
    pub id: Uuid,
    #[serde(skip)]
    pub account_id: Uuid,
    #[schema(value_type = JobStatus)]
    pub status: String,
    #[schema(value_type = Mode)]
    pub mode: String,
    /// The URL as given (normalized).
    pub url: String,
    /// The requested formats, each once.
    #[schema(value_type = Vec<Format>)]
    pub formats: Vec<String>,
    #[schema(minimum = 100, maximum = 60000)]
    pub timeout_ms: i32,
    /// Where the job's end is POSTed (`POST /v1/jobs` only).
    #[schema(required = true)]
    pub webhook_url: Option<String>,
    /// Credits: the sum of the tier's price per format.
    #[schema(minimum = 0)]
    pub cost: i64,
    /// The cost was taken from the balance (at creation); `false` for a free job (cost 0).
    pub charged: bool,
    /// …and given back (the job failed, timed out or was cancelled).
    pub refunded: bool,
    /// How many times a worker started it (more than 1 when a worker died mid-job).
    #[schema(minimum = 0)]
    pub attempts: i32,
    /// The requested formats, once the job has succeeded; `null` before, after a failure,
    /// and always in `GET /v1/jobs` (fetch the job for it).
    #[schema(required = true, value_type = Option<Extracted>)]
    pub result: Option<Value>,
    /// Why the job failed or was cancelled; `null` otherwise.
    #[schema(required = true, value_type = Option<JobError>)]
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    pub timings: Timings,
}

impl Job {
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }

    /// `error.reason`, when the job failed.
    pub fn failure_reason(&self) -> Option<&str> {
        self.error.as_ref()?.get("reason")?.as_str()
    }

    pub fn location(&self) -> String {
        format!("/v1/jobs/{}", self.id)
    }
}

const JOB_COLUMNS: &str = "j.id, j.account_id, j.status, j.mode, j.url, j.formats, j.timeout_ms,
    j.webhook_url, j.cost, j.attempts, j.result, j.error, j.created_at, j.started_at, j.finished_at,
    EXISTS (SELECT 1 FROM credit_ledger l WHERE l.job_id = j.id AND l.kind = 'charge') AS charged,
    EXISTS (SELECT 1 FROM credit_ledger l WHERE l.job_id = j.id AND l.kind = 'refund') AS refunded";

fn ms_between(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<i64> {
    Some((b? - a?).num_milliseconds().max(0))
}

fn job_from_row(row: &tokio_postgres::Row) -> Job {
    let created_at: DateTime<Utc> = row.get("created_at");
    let started_at: Option<DateTime<Utc>> = row.get("started_at");
    let finished_at: Option<DateTime<Utc>> = row.get("finished_at");
    Job {
        object: "job",
        id: row.get("id"),
        account_id: row.get("account_id"),
        status: row.get("status"),
        mode: row.get("mode"),
        url: row.get("url"),
        formats: row.get("formats"),
        timeout_ms: row.get("timeout_ms"),
        webhook_url: row.get("webhook_url"),
        cost: row.get("cost"),
        charged: row.get("charged"),
        refunded: row.get("refunded"),
        attempts: row.get("attempts"),
        result: row.get("result"),
        error: row.get("error"),
        created_at,
        started_at,
        finished_at,
        timings: Timings {
            queued_ms: ms_between(Some(created_at), started_at),
            run_ms: ms_between(started_at, finished_at),
            total_ms: ms_between(Some(created_at), finished_at),
        },
    }
}

pub async fn get(
    db: &impl GenericClient,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<Job>, QueueError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 AND j.account_id = $2")
    });
    let stmt = db.prepare_cached(&SQL).await?;
    let row = db.query_opt(&stmt, &[&id, &account_id]).await?;
    Ok(row.as_ref().map(job_from_row))
}

async fn get_any(db: &impl GenericClient, id: Uuid) -> Result<Option<Job>, QueueError> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1"));
    let stmt = db.prepare_cached(&SQL).await?;
    let row = db.query_opt(&stmt, &[&id]).await?;
    Ok(row.as_ref().map(job_from_row))
}

/// An account's jobs, newest first, `limit + 1` rows (for [`crate::pagination::Page`]).
/// Without their `result` (up to megabytes each): `GET /v1/jobs/{id}` has it.
pub async fn list(
    db: &impl GenericClient,
    account_id: Uuid,
    status: Option<&str>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Job>, QueueError> {
    let (before_at, before_id) = match before {
        Some((at, id)) => (Some(at), Some(id)),
        None => (None, None),
    };
    let columns = JOB_COLUMNS.replace("j.result,", "NULL::jsonb AS result,");
    let rows = db
        .query(
            &format!(
                "SELECT {columns} FROM jobs j
                  WHERE j.account_id = $1
                    AND ($2::text IS NULL OR j.status = $2)
                    AND ($3::timestamptz IS NULL OR (j.created_at, j.id) < ($3, $4))
                  ORDER BY j.created_at DESC, j.id DESC
                  LIMIT $5"
            ),
            &[&account_id, &status, &before_at, &before_id, &(limit + 1)],
        )
        .await?;
    Ok(rows.iter().map(job_from_row).collect())
}
