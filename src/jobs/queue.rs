//! The `jobs` table: creating (with the cost reserved in the same transaction), claiming
//! (FOR UPDATE SKIP LOCKED, the account's concurrency limit checked under a per-account
//! lock), lease renewal, finishing (fenced by lease owner and attempt, refund and webhook in
//! the same transaction) and the reaper for expired leases.
//!
//! Every way a job ends goes through [`finalize`]: one UPDATE that only succeeds from an
//! expected status (and, for a worker, only while it still holds the lease), followed in the
//! same transaction by the refund when the job did not succeed, the webhook delivery row
//! and the notification that wakes a waiting `POST /v1/scrape`. A worker that lost its lease
//! (the reaper re-queued the job, a waiting request timed it out) finds zero rows and
//! writes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::credits::ledger;
use crate::http::problem::{ApiError, ProblemType};
use crate::jobs::extract::{Extracted, Format};
use crate::tiers::Tiers;

/// NOTIFY channel: `queued` (wake workers) and `done:<job id>` (wake a waiting request).
pub const CHANNEL: &str = "keymeter_jobs";
/// A job whose worker died is run again until it has been claimed this many times.
pub const MAX_ATTEMPTS: i32 = 3;
/// Namespace of the per-account advisory lock taken while claiming.
const CLAIM_LOCK_NAMESPACE: i32 = 0x6b6d_6a62; // "kmjb"

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

fn job(row: &tokio_postgres::Row) -> Job {
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

/// Reserves the cost and queues the job, in the caller's transaction. The reservation
/// locks the account row first, so concurrent creations for one account are counted
/// against the queue cap one after the other. 402 when the balance is short, 429
/// `queue_full` beyond the tier's queued-jobs cap: either way nothing is written.
///
/// A job whose formats are all free (a tier price of 0) reserves nothing: the ledger holds
/// credit movements, and a zero-delta row would be none. Its end then has nothing to refund
/// (`ledger::refund` finds no charge and writes nothing), so it settles like any other job.
/// The account row is still locked first, so the queue cap is counted the same way.
pub async fn create(tx: &Transaction<'_>, new: &NewJob, max_queued: i64) -> Result<(), ApiError> {
    if new.cost == 0 {
        let locked = tx
            .query_opt(
                "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                &[&new.account_id],
            )
            .await?;
        if locked.is_none() {
            return Err(ApiError::NotFound("No account with that id.".into()));
        }
    } else {
        match ledger::reserve(tx, new.account_id, new.cost, new.id).await? {
            ledger::Once::Done(_) => {}
            ledger::Once::AlreadyDone => {
                return Err(ApiError::Internal(anyhow::anyhow!(
                    "a new job's id already has a charge"
                )))
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
        return Err(ApiError::problem(
            ProblemType::QueueFull,
            format!(
                "This account already has {queued} queued jobs, the most its tier allows; \
                 wait for some to finish."
            ),
        )
        .with("max_queued_jobs", max_queued)
        .retry_after(1));
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

pub async fn get(
    db: &impl GenericClient,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<Job>, ApiError> {
    let row = db
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 AND j.account_id = $2"),
            &[&id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(job))
}

async fn get_any(db: &impl GenericClient, id: Uuid) -> Result<Option<Job>, ApiError> {
    let row = db
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(job))
}

/// An account's jobs, newest first, `limit + 1` rows (for [`crate::pagination::Page`]).
/// Without their `result` (up to megabytes each): `GET /v1/jobs/{id}` has it.
pub async fn list(
    db: &impl GenericClient,
    account_id: Uuid,
    status: Option<&str>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Job>, ApiError> {
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
    Ok(rows.iter().map(job).collect())
}

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

    fn status(&self) -> &'static str {
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
) -> Result<Option<Job>, ApiError> {
    let (result, error, upstream_status): (Option<&Value>, Option<Value>, Option<i32>) = match end {
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
            Some(json!({"reason": reason, "detail": detail, "upstream_status": upstream_status})),
            upstream_status.map(i32::from),
        ),
        End::Cancelled => (
            None,
            Some(json!({"reason": "cancelled", "detail": "Cancelled before it ran."})),
            None,
        ),
    };
    let (owner, attempt, from): (Option<Uuid>, Option<i32>, Vec<&str>) = match fence {
        Fence::Lease { owner, attempt } => (Some(owner), Some(attempt), vec!["running"]),
        Fence::From(statuses) => (None, None, statuses.to_vec()),
    };
    let updated = tx
        .query_opt(
            "UPDATE jobs SET status = $2, result = $3, error = $4, upstream_status = $5,
                    finished_at = now(), headers = NULL, lease_owner = NULL, lease_expires_at = NULL
              WHERE id = $1 AND status = ANY($6)
                AND ($7::uuid IS NULL OR (lease_owner = $7 AND attempts = $8))
              RETURNING webhook_url",
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
    if !matches!(end, End::Succeeded { .. }) {
        let reason = match end {
            End::Failed { reason, .. } => reason.as_str(),
            _ => "cancelled",
        };
        ledger::refund(tx, id, reason).await?;
    }
    let job = get_any(tx, id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a finalized job vanished")))?;
    if let Some(url) = webhook_url {
        let event_id = Uuid::now_v7();
        let event_type = format!("job.{}", job.status);
        let payload = json!({
            "id": format!("evt_{}", event_id.simple()),
            "object": "event",
            "type": event_type,
            "created": Utc::now().timestamp(),
            "data": job,
        });
        tx.execute(
            "INSERT INTO job_webhooks (job_id, account_id, url, event_id, event_type, payload)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&id, &job.account_id, &url, &event_id, &event_type, &payload],
        )
        .await?;
    }
    tx.execute(
        "SELECT pg_notify($1, 'done:' || $2::text)",
        &[&CHANNEL, &id.to_string()],
    )
    .await?;
    Ok(Some(job))
}

/// `DELETE /v1/jobs/{id}`: cancels a queued job and refunds it. A job already running or
/// finished cannot be cancelled (409 `job_not_cancellable`).
pub async fn cancel(db: &Pool, account_id: Uuid, id: Uuid) -> Result<Job, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let current = get(&tx, account_id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("No job with that id.".into()))?;
    if current.status != "queued" {
        return Err(ApiError::problem(
            ProblemType::JobNotCancellable,
            format!(
                "The job is {}; only a queued job can be cancelled.",
                current.status
            ),
        )
        .with("job_status", current.status));
    }
    match finalize(&tx, id, &End::Cancelled, Fence::From(&["queued"])).await? {
        Some(job) => {
            tx.commit().await?;
            Ok(job)
        }
        None => Err(ApiError::problem(
            ProblemType::JobNotCancellable,
            "The job started running; only a queued job can be cancelled.",
        )),
    }
}

/// Ends a job that has not finished by its deadline (the waiting request gives up). The
/// worker still running it, if any, finds its lease gone and writes nothing.
pub async fn time_out(db: &Pool, id: Uuid, detail: &str) -> Result<Option<Job>, ApiError> {
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
    names: Vec<String>,
    limits: Vec<i64>,
    default: i64,
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
}

/// Claims the oldest queued job whose account is under its running-jobs limit, or `None`.
///
/// The limit must hold across instances: two workers must not both see "one slot left"
/// for the same account. The candidate row is locked (SKIP LOCKED: other workers take
/// other rows), then a transaction-scoped advisory lock on the account serialises claimers
/// for it and the running count is taken again under that lock before the job is marked
/// running. `only_origin`: while draining for shutdown, claim only the sync jobs of requests
/// this instance is still serving.
pub async fn claim(
    db: &Pool,
    owner: Uuid,
    limits: &ConcurrencyLimits,
    lease: Duration,
    only_origin: Option<Uuid>,
) -> Result<Option<Claimed>, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let candidate = tx
        .query_opt(
            "SELECT j.id, j.account_id,
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
              FOR UPDATE OF j SKIP LOCKED",
            &[&limits.names, &limits.limits, &limits.default, &only_origin],
        )
        .await?;
    let Some(candidate) = candidate else {
        return Ok(None);
    };
    let id: Uuid = candidate.get(0);
    let account_id: Uuid = candidate.get(1);
    let max_running: i64 = candidate.get(2);
    // An unlimited tier has no slot to race for: claims for it need no per-account lock.
    if max_running < i64::MAX {
        // Wait for, rather than skip, a concurrent claim for the same account: it holds the
        // lock for a few milliseconds. A worker that gave up here went back to sleep until
        // the next notification or poll (up to KEYMETER_JOB_POLL_MS) with this job still
        // queued, so a burst of jobs for one account ran one claim at a time. No deadlock:
        // the other claimer holds a different job row (SKIP LOCKED) and never waits for ours.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2::text))",
            &[&CLAIM_LOCK_NAMESPACE, &account_id.to_string()],
        )
        .await?;
        let running: i64 = tx
            .query_one(
                "SELECT count(*) FROM jobs WHERE account_id = $1 AND status = 'running'",
                &[&account_id],
            )
            .await?
            .get(0);
        if running >= max_running {
            return Ok(None);
        }
    }
    let row = tx
        .query_one(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_owner = $2,
                    lease_expires_at = now() + make_interval(secs => $3),
                    started_at = COALESCE(started_at, now())
              WHERE id = $1
              RETURNING id, account_id, url, formats, headers, timeout_ms, attempts, created_at",
            &[&id, &owner, &lease.as_secs_f64()],
        )
        .await?;
    tx.commit().await?;
    crate::metrics::jobs().transition("running");
    let headers: Option<Value> = row.get(4);
    let headers: Vec<(String, String)> = headers
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    Ok(Some(Claimed {
        id: row.get(0),
        account_id: row.get(1),
        url: row.get(2),
        formats: row.get(3),
        headers,
        timeout_ms: row.get(5),
        attempt: row.get(6),
        created_at: row.get(7),
    }))
}

/// Extends a running job's lease. `false`: the lease is no longer ours (the job was timed
/// out or re-queued), so the worker should stop.
pub async fn renew(
    db: &Pool,
    id: Uuid,
    owner: Uuid,
    attempt: i32,
    lease: Duration,
) -> Result<bool, ApiError> {
    let client = db.get().await?;
    let n = client
        .execute(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4)
              WHERE id = $1 AND status = 'running' AND lease_owner = $2 AND attempts = $3",
            &[&id, &owner, &attempt, &lease.as_secs_f64()],
        )
        .await?;
    Ok(n == 1)
}

/// Puts this instance's unfinished jobs back in the queue (graceful shutdown), without
/// counting the interrupted attempt.
pub async fn release_owned(db: &Pool, owner: Uuid) -> Result<u64, ApiError> {
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
pub async fn reap(db: &Pool) -> Result<Reaped, ApiError> {
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
pub async fn purge(db: &Pool, retention: Duration) -> Result<u64, ApiError> {
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

/// Counts of jobs by status, for operators and metrics.
pub async fn depth(db: &impl GenericClient) -> Result<Vec<(String, i64)>, ApiError> {
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
) -> Result<Backlog, ApiError> {
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
