//! Scrape jobs: `POST /v1/scrape` (run and answer with the result), `POST /v1/jobs` (queue,
//! 202), `GET /v1/jobs`, `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}` (cancel a queued job).
//!
//! Both POSTs go the same way: validate everything that needs no upstream (422 before any
//! charge — an SSRF refusal included), refuse fast while the target's breaker is open (503,
//! nothing charged), then one transaction reserves the cost, checks the queue cap and
//! queues the job (with the `Idempotency-Key` record). The sync route then waits for the
//! job's end on a notification; its job is as durable and visible as any other.
//!
//! A sync request's idempotency record stores "202 + Location of the job": a retry with the
//! same key waits for that same job instead of running another.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::http::header::{LOCATION, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Authenticated, Scope};
use crate::http::problem::{ApiError, ApiResult, ProblemType};
use crate::idempotency::{self, IdempotencyKey, Start};
use crate::jobs::breaker::Snapshot;
use crate::jobs::extract::Format;
use crate::jobs::fetch::FetchError;
use crate::jobs::queue::{self, Job, JobStatus, Mode, NewJob};
use crate::jobs::CustomerHeaders;
use crate::pagination::{Page, PageQuery};
use crate::startup::AppState;
use crate::tiers::JOB_FORMATS;

pub const MAX_TIMEOUT_MS: i64 = 60_000;
pub const MIN_TIMEOUT_MS: i64 = 100;
pub const DEFAULT_TIMEOUT_MS: i64 = 30_000;
/// How long a waiting request gives the worker past the job's own timeout to record it.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// A scrape job to queue.
// `POST /v1/scrape` reads the same type, and refuses `webhook_url` (see `ScrapeBody`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = JobRequest)]
pub struct JobBody {
    /// The page: an http(s) URL of at most 8 KiB, without `user:password@`. One that
    /// resolves to a loopback, private, link-local, CGNAT, multicast or unique-local address
    /// is refused (`422 url_not_allowed`).
    #[schema(max_length = 8192, format = "uri", examples("https://example.com/"))]
    url: String,
    /// What to extract (default `["metadata"]`); a repeated format counts once. The job costs
    /// the sum of the tier's price per format.
    #[schema(value_type = Option<Vec<Format>>, min_items = 1)]
    formats: Option<Vec<String>>,
    /// Milliseconds the whole job may take, counted from the request (queue wait included).
    #[schema(minimum = 100, maximum = 60000, default = 30000)]
    timeout_ms: Option<i64>,
    /// Request headers for the upstream: only `Accept`, `Accept-Language`, `Cookie` and
    /// `Referer` (any case); at most 16 and 8 KiB in all, values without control characters.
    headers: Option<BTreeMap<String, String>>,
    /// `POST /v1/jobs` only: an http(s) URL (at most 2048 characters, not at a refused
    /// address) the job's end is POSTed to as a `job.succeeded`, `job.failed` or
    /// `job.cancelled` event, signed in `Keymeter-Signature` with the account's
    /// `webhook_secret`. `422 validation_failed` while the server has job webhooks off.
    #[schema(max_length = 2048, format = "uri")]
    webhook_url: Option<String>,
}

/// A scrape job to run and wait for.
// The body of `POST /v1/scrape`, for the document only: `JobBody` without `webhook_url`
// (the handler reads a `JobBody` and refuses `webhook_url` with 422 `validation_failed`).
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ScrapeRequest)]
#[allow(dead_code)]
struct ScrapeBody {
    /// The page: an http(s) URL of at most 8 KiB, without `user:password@`. One that
    /// resolves to a loopback, private, link-local, CGNAT, multicast or unique-local address
    /// is refused (`422 url_not_allowed`).
    #[schema(max_length = 8192, format = "uri", examples("https://example.com/"))]
    url: String,
    /// What to extract (default `["metadata"]`); a repeated format counts once. The job costs
    /// the sum of the tier's price per format.
    #[schema(value_type = Option<Vec<Format>>, min_items = 1)]
    formats: Option<Vec<String>>,
    /// Milliseconds the whole job may take, counted from the request (queue wait included).
    #[schema(minimum = 100, maximum = 60000, default = 30000)]
    timeout_ms: Option<i64>,
    /// Request headers for the upstream: only `Accept`, `Accept-Language`, `Cookie` and
    /// `Referer` (any case); at most 16 and 8 KiB in all, values without control characters.
    headers: Option<BTreeMap<String, String>>,
}

/// A checked request, ready to be queued.
struct Checked {
    url: String,
    formats: Vec<String>,
    headers: Vec<(String, String)>,
    timeout_ms: i32,
    webhook_url: Option<String>,
    cost: i64,
}

fn url_not_allowed(detail: impl std::fmt::Display) -> ApiError {
    ApiError::problem(ProblemType::UrlNotAllowed, detail.to_string()).with("field", "url")
}

async fn check(
    state: &AppState,
    caller: &Authenticated,
    body: JobBody,
    mode: Mode,
) -> Result<Checked, ApiError> {
    let jobs = state.jobs.as_ref();
    let url = match jobs.fetcher.validate(&body.url) {
        Ok(u) => u,
        Err(FetchError::NotAllowed(e)) => return Err(url_not_allowed(e)),
        Err(e) => return Err(ApiError::validation("url", e.to_string())),
    };
    let mut formats: Vec<String> = Vec::new();
    for f in body.formats.unwrap_or_else(|| vec!["metadata".into()]) {
        if !JOB_FORMATS.contains(&f.as_str()) {
            return Err(ApiError::validation(
                "formats",
                format!(
                    "unknown format {f:?}; formats are {}.",
                    JOB_FORMATS.join(", ")
                ),
            ));
        }
        if !formats.contains(&f) {
            formats.push(f);
        }
    }
    if formats.is_empty() {
        return Err(ApiError::validation(
            "formats",
            "formats must name at least one format.",
        ));
    }
    let timeout_ms = body.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ApiError::validation(
            "timeout_ms",
            format!("timeout_ms must be between {MIN_TIMEOUT_MS} and {MAX_TIMEOUT_MS}."),
        ));
    }
    // A sync request must be able to wait for its job's whole timeout: the server's request
    // timeout would otherwise cut it off while the job still runs (and may be charged).
    let request_ms = i64::try_from(state.config.request_timeout.as_millis()).unwrap_or(i64::MAX);
    let sync_max = request_ms.saturating_sub(FINISH_GRACE.as_millis() as i64 + 1_000);
    if mode == Mode::Sync && timeout_ms > sync_max {
        return Err(ApiError::validation(
            "timeout_ms",
            format!(
                "timeout_ms must be at most {sync_max} for POST /v1/scrape on this server \
                 (its request timeout); use POST /v1/jobs for longer jobs."
            ),
        ));
    }
    let headers: Vec<(String, String)> = body.headers.unwrap_or_default().into_iter().collect();
    CustomerHeaders::new(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| ApiError::validation("headers", e.to_string()))?;
    let webhook_url = match (body.webhook_url, mode) {
        (None, _) => None,
        (Some(_), Mode::Sync) => {
            return Err(ApiError::validation(
                "webhook_url",
                "webhook_url is for POST /v1/jobs; POST /v1/scrape answers with the result.",
            ))
        }
        (Some(w), Mode::Async) => Some(
            crate::jobs::webhooks::validate_url(&jobs.webhooks, &w)
                .await?
                .to_string(),
        ),
    };
    let tier = state.tiers.get_or_default(&caller.tier);
    let cost: i64 = formats
        .iter()
        .map(|f| tier.prices.get(f).copied().unwrap_or(1))
        .sum();
    // Resolve now: a host that points at a private address is refused before any charge.
    jobs.fetcher.precheck(&url).await.map_err(url_not_allowed)?;
    let origin = crate::jobs::breaker::origin_of(&url);
    jobs.breakers
        .check(caller.account_id, &origin)
        .map_err(|refused| {
            ApiError::problem(ProblemType::UpstreamUnavailable, refused.to_string())
                .with("breaker", refused.kind.as_str())
                .with("scope", refused.scope.as_str())
                .retry_after(refused.retry_after.as_secs().max(1))
        })?;
    Ok(Checked {
        url: url.to_string(),
        formats,
        headers,
        timeout_ms: i32::try_from(timeout_ms).unwrap_or(i32::MAX),
        webhook_url,
        cost,
    })
}

/// Reserves, queues and (with a key) records the idempotent answer, in one transaction.
async fn enqueue(
    state: &AppState,
    caller: &Authenticated,
    checked: Checked,
    mode: Mode,
    id: Uuid,
    key: Option<&IdempotencyKey>,
    guard: Option<&idempotency::Guard>,
) -> Result<Job, ApiError> {
    let tier = state.tiers.get_or_default(&caller.tier);
    let max_queued = if tier.unlimited {
        i64::MAX
    } else {
        i64::from(tier.max_queued_jobs)
    };
    let new = NewJob {
        id,
        account_id: caller.account_id,
        mode,
        url: checked.url,
        formats: checked.formats,
        headers: checked.headers,
        timeout_ms: checked.timeout_ms,
        webhook_url: checked.webhook_url,
        cost: checked.cost,
        origin: state.jobs.instance,
        idempotency_key: key.map(|k| k.as_str().to_owned()),
    };
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    queue::create(&tx, &new, max_queued).await?;
    let job = queue::get(&tx, caller.account_id, id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a queued job vanished")))?;
    if let Some(g) = guard {
        let body = serde_json::to_value(&job).map_err(anyhow::Error::from)?;
        g.complete(&tx, StatusCode::ACCEPTED, &body, Some(&job.location()))
            .await?;
    }
    tx.commit().await?;
    state.jobs.wakeups.job_queued();
    Ok(job)
}

/// Runs `start`'s claim, the checks and the enqueue; releases the key if anything fails.
async fn create(
    state: &AppState,
    caller: &Authenticated,
    req: &HttpRequest,
    body: &web::Bytes,
    mode: Mode,
    waiter_for: impl FnOnce(Uuid) -> Option<crate::jobs::wakeups::Waiter>,
) -> Result<Created, ApiError> {
    caller.require(Scope::Scrape)?;
    let (raw, parsed): (serde_json::Value, JobBody) = crate::http::extractors::json_body(body)?;
    let (key, guard) = match idempotency::start(
        &state.db,
        state.config.request_timeout,
        caller.account_id,
        req,
        &raw,
    )
    .await?
    {
        (_, Start::Replay(res)) => return Ok(Created::Replay(res)),
        (key, Start::Run(guard)) => (key, guard),
    };
    let id = Uuid::now_v7();
    let waiter = waiter_for(id);
    let result = async {
        let checked = check(state, caller, parsed, mode).await?;
        enqueue(
            state,
            caller,
            checked,
            mode,
            id,
            key.as_ref(),
            guard.as_ref(),
        )
        .await
    }
    .await;
    match result {
        Ok(job) => Ok(Created::New(Box::new(job), waiter)),
        Err(e) => {
            if let Some(g) = guard {
                g.release(&state.db).await;
            }
            Err(e)
        }
    }
}

enum Created {
    New(Box<Job>, Option<crate::jobs::wakeups::Waiter>),
    Replay(HttpResponse),
}

/// `POST /v1/jobs` (`scrape`): queues a job → 202 with the job and its `Location`.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "create_job",
    tag = "jobs",
    summary = "Queue a scrape job",
    description = "Checks the request (every `422` comes before any charge), refuses while the \
        target's circuit breaker is open (`503`, nothing charged), then reserves the cost and \
        queues the job in one transaction, and answers at once. Follow it with \
        `GET /v1/jobs/{id}` (the `Location`) or a `webhook_url`. The cost is kept only when \
        the site gave a usable answer (2xx, 404, 410); any other end is refunded. Honours \
        `Idempotency-Key`: a retry answers with the same job.",
    params(("Idempotency-Key" = Option<String>, Header, description = crate::openapi::IDEMPOTENCY_KEY)),
    request_body = JobBody,
    responses(
        (status = 202, description = "The queued job.", body = Job,
            headers(("Location" = String, description = "The job: `/v1/jobs/{id}`."))),
        (status = 400, description = "`invalid_json`: the body is not JSON; \
            `invalid_request`: a malformed `Idempotency-Key`; `bad_request`: the body could not \
            be read."),
        (status = 402, description = "`insufficient_credits`: the balance is below the job's \
            cost (`balance` and `cost`); nothing is queued."),
        (status = 409, description = "`idempotency_conflict`: a request with this \
            `Idempotency-Key` is still running, or this one outlived its claim and a retry took \
            it over (this attempt was undone)."),
        (status = 413, description = "`payload_too_large`"),
        (status = 422, description = "`validation_failed`: a bad `url`, `formats`, \
            `timeout_ms`, `headers` or `webhook_url` (`field` names it), `webhook_url` while job \
            webhooks are off, or an unknown field; `url_not_allowed`: `url` or `webhook_url` \
            (`field`) is not http(s), has credentials, or points at a refused address; \
            `idempotency_key_reused`: this `Idempotency-Key` came with another request."),
        (status = 429, description = "`queue_full`: the account already has the most queued \
            jobs its tier allows (`max_queued_jobs`); retry after `Retry-After`."),
        (status = 503, description = "`upstream_unavailable`: the target origin's or the egress \
            provider's circuit breaker is open (`breaker`: `host` or `provider`; `scope`: \
            `shared`, or `account` when only this account's own failing jobs to that origin \
            paused it); nothing is charged; retry after `Retry-After`."),
    ),
    security(("ApiKey" = ["scrape"]), ("ApiKeyHeader" = ["scrape"])),
)]
pub async fn create_job(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    match create(&state, &caller, &req, &body, Mode::Async, |_| None).await? {
        Created::Replay(res) => Ok(res),
        Created::New(job, _) => Ok(HttpResponse::Accepted()
            .insert_header((LOCATION, job.location()))
            .json(*job)),
    }
}

/// `POST /v1/scrape` (`scrape`): queues the job, waits for it, answers with its result.
#[utoipa::path(
    post,
    path = "/v1/scrape",
    operation_id = "scrape",
    tag = "jobs",
    summary = "Scrape a page and wait for the result",
    description = "Runs a scrape job and answers when it ends: the same checks and charge as \
        `POST /v1/jobs`, then the request waits for the job (at most its `timeout_ms` plus two \
        seconds, after which the job is ended as timed out). The job is durable and listed \
        like any other. A job that did not succeed is refunded and answered with a problem \
        carrying `job_id`, `reason` (the job's `error.reason`), `refunded`, `cost` and, when \
        the site answered or the job failed, `upstream_status`. Honours `Idempotency-Key`: a \
        retry with the same key waits for the same job and answers as it ended (without \
        `Idempotent-Replayed`; nothing runs or is charged again).",
    params(("Idempotency-Key" = Option<String>, Header, description = crate::openapi::IDEMPOTENCY_KEY)),
    request_body = ScrapeBody,
    responses(
        (status = 200, description = "The succeeded job, with its `result`.", body = Job),
        (status = 202, description = "The instance is shutting down before the job ended: the \
            job (still `queued` or `running`) goes on and ends on another instance; follow it \
            with `GET /v1/jobs/{id}` (the `Location`), or retry with the same \
            `Idempotency-Key`, which waits for the same job.", body = Job,
            headers(("Location" = String, description = "The job: `/v1/jobs/{id}`."))),
        (status = 400, description = "`invalid_json`: the body is not JSON; \
            `invalid_request`: a malformed `Idempotency-Key`; `bad_request`: the body could not \
            be read."),
        (status = 402, description = "`insufficient_credits`: the balance is below the job's \
            cost (`balance` and `cost`); nothing is queued."),
        (status = 404, description = "`not_found`: a retry with an `Idempotency-Key` whose job \
            has since been deleted (past the job retention)."),
        (status = 409, description = "`idempotency_conflict`: a request with this \
            `Idempotency-Key` is still running, or this one outlived its claim and a retry took \
            it over (this attempt was undone); `job_cancelled`: the job was cancelled \
            (`DELETE /v1/jobs/{id}`) before it ran, and refunded."),
        (status = 413, description = "`payload_too_large`"),
        (status = 422, description = "`validation_failed`: a bad `url`, `formats`, \
            `timeout_ms` or `headers` (`field` names it), any `webhook_url` (it is for \
            `POST /v1/jobs`), or an unknown field; `url_not_allowed`: `url` is not http(s), has \
            credentials, or points at a refused address — before anything is charged, or \
            (with `job_id`, refunded) when a redirect led to one; `idempotency_key_reused`: this \
            `Idempotency-Key` came with another request."),
        (status = 429, description = "`queue_full`: the account already has the most queued \
            jobs its tier allows (`max_queued_jobs`); retry after `Retry-After`."),
        (status = 502, description = "`upstream_failed`: the site failed (5xx, 429, a block, \
            another status than 2xx/404/410, a network, DNS or TLS error, too many redirects) or \
            its page could not be processed; refunded (`job_id`, `reason`, `upstream_status`)."),
        (status = 503, description = "`upstream_unavailable`: the target origin's or the egress \
            provider's circuit breaker is open — before anything is charged (`breaker`: `host` or \
            `provider`; `scope`: `shared`, or `account` when only this account's own failing \
            jobs to that origin paused it), or while the job waited (`job_id`, `reason: circuit_open`, refunded); \
            retry after `Retry-After`. `database_unavailable` with `job_id`: the job was queued \
            but its end could not be read; look it up with `GET /v1/jobs/{id}`."),
        (status = 504, description = "`job_timeout`: the job did not finish within its \
            `timeout_ms`; refunded (`job_id`)."),
    ),
    security(("ApiKey" = ["scrape"]), ("ApiKeyHeader" = ["scrape"])),
)]
pub async fn scrape(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let wakeups = state.jobs.wakeups.clone();
    let created = create(&state, &caller, &req, &body, Mode::Sync, |id| {
        Some(wakeups.register(id))
    })
    .await?;
    let (job, waiter) = match created {
        Created::New(job, waiter) => (*job, waiter),
        Created::Replay(res) => {
            // A retry of a sync request: wait for the job the first request queued.
            let Some(id) = replayed_job_id(&res) else {
                return Ok(res);
            };
            let waiter = state.jobs.wakeups.register(id);
            let job = queue::get(&state.db.get().await?, caller.account_id, id)
                .await?
                .ok_or_else(|| ApiError::NotFound("No job with that id.".into()))?;
            (job, Some(waiter))
        }
    };
    let waiter = waiter.unwrap_or_else(|| state.jobs.wakeups.register(job.id));
    match wait(&state, &caller, &job, &waiter)
        .await
        .map_err(|e| lost_track(e, job.id))?
    {
        Waited::Ended(done) => answer_sync(done),
        // This instance is shutting down: the job goes on (here, or back in the queue for
        // another instance), and the client learns where to follow it — as `POST /v1/jobs`
        // would have answered.
        Waited::HandedOff(job) => Ok(HttpResponse::Accepted()
            .insert_header((LOCATION, job.location()))
            .insert_header((RETRY_AFTER, "1"))
            .json(job)),
    }
}

/// How a sync request's wait for its job ended.
enum Waited {
    /// The job finished (or was ended as timed out).
    Ended(Job),
    /// The instance is shutting down; the job had not finished yet.
    HandedOff(Job),
}

/// The job is queued and durable, but this request could not follow it to its end (the
/// database went away meanwhile): say which job it was, so the client can look it up
/// instead of guessing whether it ran.
fn lost_track(e: ApiError, id: Uuid) -> ApiError {
    match e {
        ApiError::DatabaseUnavailable => ApiError::problem(
            ProblemType::DatabaseUnavailable,
            format!(
                "The job was queued but its result could not be read; look it up with GET /v1/jobs/{id}."
            ),
        )
        .with("job_id", id.to_string())
        .retry_after(1),
        other => other,
    }
}

fn replayed_job_id(res: &HttpResponse) -> Option<Uuid> {
    if res.status() != StatusCode::ACCEPTED {
        return None;
    }
    let loc = res.headers().get(LOCATION)?.to_str().ok()?;
    loc.strip_prefix("/v1/jobs/")?.parse().ok()
}

/// Waits until the job ends (woken by the wake-ups, with a one-second look at the database as a
/// backstop) or its deadline passes, when it is ended as timed out (and refunded) — or until
/// the instance hands waiting requests off at shutdown.
async fn wait(
    state: &AppState,
    caller: &Authenticated,
    job: &Job,
    waiter: &crate::jobs::wakeups::Waiter,
) -> Result<Waited, ApiError> {
    let timeout = Duration::from_millis(u64::try_from(job.timeout_ms).unwrap_or(0));
    let elapsed = (Utc::now() - job.created_at).to_std().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + timeout.saturating_sub(elapsed) + FINISH_GRACE;
    let mut handed_off = false;
    loop {
        let current = {
            let client = state.db.get().await?;
            queue::get(&client, caller.account_id, job.id).await?
        }
        .ok_or_else(|| ApiError::NotFound("No job with that id.".into()))?;
        if current.is_finished() {
            return Ok(Waited::Ended(current));
        }
        if handed_off {
            return Ok(Waited::HandedOff(current));
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(ended) = queue::time_out(
                &state.db,
                job.id,
                "The job did not finish within its timeout.",
            )
            .await?
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
            () = state.jobs.wakeups.handed_off() => handed_off = true,
        }
    }
}

/// A finished sync job as an HTTP answer: 200 with the job when it succeeded, else the
/// problem that says why (with the job id and `refunded: true`).
fn answer_sync(job: Job) -> ApiResult<HttpResponse> {
    if job.status == "succeeded" {
        return Ok(HttpResponse::Ok().json(job));
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
    let kind = match reason.as_str() {
        "timeout" => ProblemType::JobTimeout,
        "circuit_open" => ProblemType::UpstreamUnavailable,
        "not_allowed" => ProblemType::UrlNotAllowed,
        "cancelled" => ProblemType::JobCancelled,
        _ => ProblemType::UpstreamFailed,
    };
    let mut err = ApiError::problem(kind, detail)
        .with("job_id", job.id.to_string())
        .with("reason", reason)
        .with("refunded", job.refunded)
        .with("cost", job.cost);
    if let Some(s) = upstream_status {
        err = err.with("upstream_status", s);
    }
    if kind == ProblemType::UpstreamUnavailable {
        err = err.retry_after(1);
    }
    Err(err)
}

fn require_read(caller: &Authenticated) -> Result<(), ApiError> {
    // A key that may run jobs may read them back.
    if caller.scopes.contains(Scope::Scrape) {
        return Ok(());
    }
    Ok(caller.require(Scope::Read)?)
}

/// `GET /v1/jobs/{id}` (`read` or `scrape`).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "get_job",
    tag = "jobs",
    summary = "One job",
    description = "The job's status, `result` (once succeeded) or `error`, cost, whether it was \
        charged and refunded, and timings. Needs `read` or `scrape`.",
    params(("id" = Uuid, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The job.", body = Job),
        (status = 404, description = "`not_found`: no job with that id on this account (or the \
            id is not a UUID)."),
    ),
    security(
        ("ApiKey" = ["read"]), ("ApiKey" = ["scrape"]),
        ("ApiKeyHeader" = ["read"]), ("ApiKeyHeader" = ["scrape"]),
    ),
)]
pub async fn get(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<Uuid>,
) -> ApiResult<HttpResponse> {
    require_read(&caller)?;
    let client = state.db.get().await?;
    let job = queue::get(&client, caller.account_id, path.into_inner())
        .await?
        .ok_or_else(|| ApiError::NotFound("No job with that id.".into()))?;
    Ok(HttpResponse::Ok().json(job))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Jobs per page, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(
        pattern = "^-?[0-9]{1,16}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    )]
    cursor: Option<String>,
    /// Only jobs with this status.
    #[param(inline, value_type = Option<JobStatus>)]
    status: Option<String>,
}

/// `GET /v1/jobs?status=&limit=&cursor=` (`read` or `scrape`): newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    summary = "List jobs",
    description = "This account's jobs, newest first, cursor-paginated, optionally of one \
        status. Without their `result` (always `null` here): `GET /v1/jobs/{id}` has it. \
        Needs `read` or `scrape`.",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs.", body = Page<Job>),
        (status = 400, description = "`invalid_request`: a malformed query string, an unknown \
            parameter or a cursor this API did not return."),
        (status = 422, description = "`validation_failed`: `limit` out of range, a `cursor` \
            whose time is out of range, or an unknown `status`."),
    ),
    security(
        ("ApiKey" = ["read"]), ("ApiKey" = ["scrape"]),
        ("ApiKeyHeader" = ["read"]), ("ApiKeyHeader" = ["scrape"]),
    ),
)]
pub async fn list(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<ListQuery>,
) -> ApiResult<HttpResponse> {
    require_read(&caller)?;
    let q = q.into_inner();
    if let Some(s) = &q.status {
        if !queue::STATUSES.contains(&s.as_str()) {
            return Err(ApiError::validation(
                "status",
                format!("status must be one of {}.", queue::STATUSES.join(", ")),
            ));
        }
    }
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let before = match page.cursor()? {
        Some(c) => Some((
            c.at,
            c.id.parse::<Uuid>().map_err(|_| {
                ApiError::InvalidRequest("The cursor is not one this API returned.".into())
            })?,
        )),
        None => None,
    };
    let client = state.db.get().await?;
    let jobs = queue::list(
        &client,
        caller.account_id,
        q.status.as_deref(),
        before,
        limit,
    )
    .await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(jobs, limit, |j| {
            (j.created_at, j.id.to_string())
        })),
    )
}

/// `DELETE /v1/jobs/{id}` (`scrape`): cancels a queued job; its cost is refunded.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    operation_id = "cancel_job",
    tag = "jobs",
    summary = "Cancel a queued job",
    description = "Ends a job that has not started (`cancelled`, `error.reason: cancelled`) and \
        refunds its cost; its webhook, if any, gets `job.cancelled`, and a `POST /v1/scrape` \
        waiting for it answers `409 job_cancelled`. A running or finished job cannot be \
        cancelled.",
    params(("id" = Uuid, Path, description = "The job id.")),
    responses(
        (status = 200, description = "The cancelled job (`refunded: true`).", body = Job),
        (status = 404, description = "`not_found`: no job with that id on this account (or the \
            id is not a UUID)."),
        (status = 409, description = "`job_not_cancellable`: the job is running or finished \
            (`job_status` says which, unless it started during the request)."),
    ),
    security(("ApiKey" = ["scrape"]), ("ApiKeyHeader" = ["scrape"])),
)]
pub async fn cancel(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<Uuid>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Scrape)?;
    let job = queue::cancel(&state.db, caller.account_id, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(job))
}

/// What `GET /admin/breakers` answers.
#[derive(Serialize, ToSchema)]
pub struct BreakersReport {
    #[schema(value_type = String, example = "breakers")]
    object: &'static str,
    /// The egress provider's breaker first, then every origin's shared breaker that is not
    /// closed, then every account-scoped one that is not closed, each by origin (at most
    /// 1000 of each).
    #[schema(value_type = Vec<BreakerView>)]
    data: Vec<Snapshot>,
    /// Origin breakers this instance holds: an origin gets one on its first failure, and
    /// one unused for ten minutes is forgotten.
    tracked_hosts: u64,
    /// Account-scoped breakers this instance holds (same rules).
    tracked_account_breakers: u64,
    /// Jobs `queued` and `running` on all instances; a status with none is absent.
    #[schema(value_type = QueueDepth)]
    queue: BTreeMap<String, i64>,
}

/// A circuit breaker.
// `breaker::Snapshot`, for the document only.
#[derive(ToSchema)]
#[allow(dead_code)]
struct BreakerView {
    #[schema(inline)]
    kind: BreakerKind,
    #[schema(inline)]
    scope: BreakerScope,
    /// The provider's name, or the origin (`scheme://host[:port]`).
    name: String,
    /// `scope: account`: the account whose jobs it refuses.
    #[schema(required = false)]
    account_id: Option<Uuid>,
    #[schema(inline)]
    state: BreakerState,
}

/// `shared`: refuses every account's jobs; `account`: only one account's jobs to that origin
/// (its own failures opened it).
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum BreakerScope {
    Shared,
    Account,
}

/// `provider`: the egress provider every job goes through; `host`: one target origin.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum BreakerKind {
    Provider,
    Host,
}

/// `open`: requests are refused; `half_open`: a probe is let through to test recovery.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

/// Jobs per unfinished status, across instances.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct QueueDepth {
    #[schema(value_type = i64, required = false, minimum = 1)]
    queued: Option<i64>,
    #[schema(value_type = i64, required = false, minimum = 1)]
    running: Option<i64>,
}

/// `GET /admin/breakers`: the provider's breaker and every host breaker not closed.
#[utoipa::path(
    get,
    path = "/admin/breakers",
    operation_id = "admin_breakers",
    tag = "admin",
    summary = "Circuit breakers and queue depth",
    description = "This instance's circuit breakers (the egress provider's, every target \
        origin's shared one and every account-scoped one that is open or half-open) and the \
        number of queued and running jobs.",
    responses(
        (status = 200, description = "The breakers and the queue.", body = BreakersReport),
    ),
    security(("AdminToken" = [])),
)]
pub async fn breakers(
    state: web::Data<AppState>,
    _admin: crate::http::admin_token::AdminToken,
) -> ApiResult<HttpResponse> {
    let jobs = &state.jobs;
    let depth = queue::depth(&state.db.get().await?).await?;
    Ok(HttpResponse::Ok().json(BreakersReport {
        object: "breakers",
        data: jobs.breakers.snapshot(),
        tracked_hosts: jobs.breakers.tracked_origins(),
        tracked_account_breakers: jobs.breakers.tracked_account_breakers(),
        queue: depth.into_iter().collect(),
    }))
}
