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

use actix_web::http::header::LOCATION;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::auth::{Authenticated, Scope};
use crate::error::{ApiError, ApiResult};
use crate::idempotency::{self, IdempotencyKey, Start};
use crate::jobs::fetch::FetchError;
use crate::jobs::queue::{self, Job, Mode, NewJob};
use crate::jobs::CustomerHeaders;
use crate::pagination::{Page, PageQuery};
use crate::ratelimit::tiers::JOB_FORMATS;
use crate::startup::AppState;

pub const MAX_TIMEOUT_MS: i64 = 60_000;
pub const MIN_TIMEOUT_MS: i64 = 100;
pub const DEFAULT_TIMEOUT_MS: i64 = 30_000;
/// How long a waiting request gives the worker past the job's own timeout to record it.
const FINISH_GRACE: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobBody {
    url: String,
    formats: Option<Vec<String>>,
    timeout_ms: Option<i64>,
    headers: Option<BTreeMap<String, String>>,
    webhook_url: Option<String>,
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
    ApiError::problem(
        StatusCode::UNPROCESSABLE_ENTITY,
        "url_not_allowed",
        "URL not allowed",
        detail.to_string(),
    )
    .with("field", "url")
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
    let host = url.host_str().unwrap_or_default();
    jobs.breakers.check(host).map_err(|refused| {
        ApiError::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            "Upstream unavailable",
            refused.to_string(),
        )
        .with("breaker", refused.kind.as_str())
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
    state.jobs.hub.job_queued();
    Ok(job)
}

/// Runs `start`'s claim, the checks and the enqueue; releases the key if anything fails.
async fn create(
    state: &AppState,
    caller: &Authenticated,
    req: &HttpRequest,
    body: &web::Bytes,
    mode: Mode,
    waiter_for: impl FnOnce(Uuid) -> Option<crate::jobs::hub::Waiter>,
) -> Result<Created, ApiError> {
    caller.require(Scope::Scrape)?;
    let (raw, parsed): (serde_json::Value, JobBody) = crate::http::extractors::json_body(body)?;
    let (key, guard) = match idempotency::start(&state.db, caller.account_id, req, &raw).await? {
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
    New(Box<Job>, Option<crate::jobs::hub::Waiter>),
    Replay(HttpResponse),
}

/// `POST /v1/jobs` (`scrape`): queues a job → 202 with the job and its `Location`.
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
pub async fn scrape(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let hub = state.jobs.hub.clone();
    let created = create(&state, &caller, &req, &body, Mode::Sync, |id| {
        Some(hub.register(id))
    })
    .await?;
    let (job, waiter) = match created {
        Created::New(job, waiter) => (*job, waiter),
        Created::Replay(res) => {
            // A retry of a sync request: wait for the job the first request queued.
            let Some(id) = replayed_job_id(&res) else {
                return Ok(res);
            };
            let waiter = state.jobs.hub.register(id);
            let job = queue::get(&state.db.get().await?, caller.account_id, id)
                .await?
                .ok_or_else(|| ApiError::NotFound("No job with that id.".into()))?;
            (job, Some(waiter))
        }
    };
    let waiter = waiter.unwrap_or_else(|| state.jobs.hub.register(job.id));
    let done = wait(&state, &caller, &job, &waiter)
        .await
        .map_err(|e| lost_track(e, job.id))?;
    answer_sync(done)
}

/// The job is queued and durable, but this request could not follow it to its end (the
/// database went away meanwhile): say which job it was, so the client can look it up
/// instead of guessing whether it ran.
fn lost_track(e: ApiError, id: Uuid) -> ApiError {
    match e {
        ApiError::DatabaseUnavailable => ApiError::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "Database unavailable",
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

/// Waits until the job ends (woken by the hub, with a one-second look at the database as a
/// backstop) or its deadline passes, when it is ended as timed out (and refunded).
async fn wait(
    state: &AppState,
    caller: &Authenticated,
    job: &Job,
    waiter: &crate::jobs::hub::Waiter,
) -> Result<Job, ApiError> {
    let timeout = Duration::from_millis(u64::try_from(job.timeout_ms).unwrap_or(0));
    let elapsed = (Utc::now() - job.created_at).to_std().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + timeout.saturating_sub(elapsed) + FINISH_GRACE;
    loop {
        let current = {
            let client = state.db.get().await?;
            queue::get(&client, caller.account_id, job.id).await?
        }
        .ok_or_else(|| ApiError::NotFound("No job with that id.".into()))?;
        if current.is_finished() {
            return Ok(current);
        }
        if tokio::time::Instant::now() >= deadline {
            if let Some(ended) = queue::time_out(
                &state.db,
                job.id,
                "The job did not finish within its timeout.",
            )
            .await?
            {
                return Ok(ended);
            }
            continue; // It ended just now: read it again.
        }
        tokio::select! {
            () = waiter.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = tokio::time::sleep_until(deadline) => {}
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
    let (status, kind, title) = match reason.as_str() {
        "timeout" => (StatusCode::GATEWAY_TIMEOUT, "job_timeout", "Job timed out"),
        "circuit_open" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            "Upstream unavailable",
        ),
        "not_allowed" => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "url_not_allowed",
            "URL not allowed",
        ),
        "cancelled" => (StatusCode::CONFLICT, "job_cancelled", "Job cancelled"),
        _ => (
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            "Upstream failed",
        ),
    };
    let mut err = ApiError::problem(status, kind, title, detail)
        .with("job_id", job.id.to_string())
        .with("reason", reason)
        .with("refunded", job.refunded)
        .with("cost", job.cost);
    if let Some(s) = upstream_status {
        err = err.with("upstream_status", s);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        err = err.retry_after(1);
    }
    Err(err)
}

fn require_read(caller: &Authenticated) -> Result<(), ApiError> {
    // A key that may run jobs may read them back.
    if caller.scopes.contains(Scope::Scrape) {
        return Ok(());
    }
    caller.require(Scope::Read)
}

/// `GET /v1/jobs/{id}` (`read` or `scrape`).
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    status: Option<String>,
}

/// `GET /v1/jobs?status=&limit=&cursor=` (`read` or `scrape`): newest first.
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
pub async fn cancel(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<Uuid>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Scrape)?;
    let job = queue::cancel(&state.db, caller.account_id, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(job))
}

/// `GET /admin/breakers`: the provider's breaker and every host breaker not closed.
pub async fn breakers(
    state: web::Data<AppState>,
    _admin: crate::auth::admin::AdminToken,
) -> ApiResult<HttpResponse> {
    let jobs = &state.jobs;
    let depth = queue::depth(&state.db.get().await?).await?;
    Ok(HttpResponse::Ok().json(json!({
        "object": "breakers",
        "data": jobs.breakers.snapshot(),
        "tracked_hosts": jobs.breakers.tracked_hosts(),
        "queue": depth.into_iter().collect::<BTreeMap<_, _>>(),
    })))
}
