//! Scrape jobs: `POST /v1/scrape` (run and answer with the result), `POST /v1/jobs` (queue,
//! 202), `GET /v1/jobs`, `GET /v1/jobs/{id}`, `DELETE /v1/jobs/{id}` (cancel a queued job).
//!
//! Both POSTs go the same way: [`crate::jobs::submit`] checks the request (422 before any
//! charge — an SSRF refusal included), refuses fast while the target's breaker is open (503,
//! nothing charged), then one transaction reserves the cost, checks the queue cap and
//! queues the job (with the `Idempotency-Key` record) — or, for a sync job with a free running
//! slot, starts it on this instance in that same transaction. The sync route then waits for
//! the job's end ([`crate::jobs::wait`]); its job is as durable and visible as any other.
//!
//! A sync request's idempotency record stores "202 + Location of the job": a retry with the
//! same key waits for that same job instead of running another.

use std::collections::BTreeMap;

use actix_web::http::header::{LOCATION, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use deadpool_postgres::Transaction;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Authenticated, Scope};
use crate::http::idempotent;
use crate::http::problem::{ApiError, ApiResult};
use crate::idempotency::{self, Outcome, StoredResponse};
use crate::jobs::breaker::Snapshot;
use crate::jobs::extract::Format;
use crate::jobs::queue::{self, Job, JobStatus, Mode};
use crate::jobs::submit::{self, JobRequest, Submitter};
use crate::jobs::wait::{self, Follow, Waited};
use crate::jobs::wakeups::Waiter;
use crate::pagination::{Page, PageQuery};
use crate::routes::{Access, Routes};
use crate::startup::AppState;

/// The jobs API needs a key; the breakers report is the operator's.
pub fn configure(routes: &mut Routes) {
    routes
        .post(Access::Key, "/v1/scrape", scrape)
        .get(Access::Key, "/v1/jobs", list)
        .post(Access::Key, "/v1/jobs", create_job)
        .get(Access::Key, "/v1/jobs/{id}", get)
        .delete(Access::Key, "/v1/jobs/{id}", cancel)
        .get(Access::Admin, "/admin/breakers", breakers);
}

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

impl From<JobBody> for JobRequest {
    fn from(b: JobBody) -> Self {
        JobRequest {
            url: b.url,
            formats: b.formats,
            timeout_ms: b.timeout_ms,
            headers: b.headers,
            webhook_url: b.webhook_url,
        }
    }
}

/// The one place the job routes run the `Idempotency-Key` sequence ([`idempotency::run`]):
/// claim the key (or replay its answer), submit the job with the key's answer recorded in
/// the job's own transaction; the key is released if the job was not queued.
async fn create(
    state: &AppState,
    caller: &Authenticated,
    req: &HttpRequest,
    body: &web::Bytes,
    mode: Mode,
    waiter_for: impl FnOnce(Uuid) -> Option<Waiter>,
) -> Result<Outcome<Created>, ApiError> {
    caller.require(Scope::Scrape)?;
    let (raw, parsed): (serde_json::Value, JobBody) = crate::http::extractors::json_body(body)?;
    // Both modes keep "202 + the job's Location": a sync retry follows that same job.
    let request = idempotent::request(req, caller.account_id, &raw, StatusCode::ACCEPTED)?;
    idempotency::run(
        &state.db,
        state.config.request_timeout,
        request,
        |guard| async move {
            let id = Uuid::now_v7();
            let waiter = waiter_for(id);
            let ctx = submit::Context {
                db: &state.db,
                jobs: &state.jobs,
                tiers: &state.tiers,
                request_timeout: state.config.request_timeout,
            };
            let who = Submitter {
                account_id: caller.account_id,
                tier: &caller.tier,
                key_id: Some(&caller.key_id),
            };
            let job = submit::submit(
                &ctx,
                &who,
                parsed.into(),
                mode,
                id,
                guard.as_ref().map(|g| g.key().as_str()),
                Answer(guard.as_ref()),
            )
            .await?;
            Ok::<_, ApiError>(Created(Box::new(job), waiter))
        },
    )
    .await
}

/// A job this request queued, and (sync) the waiter registered for it before it was queued.
struct Created(Box<Job>, Option<Waiter>);

/// The answer an `Idempotency-Key` keeps for a job route: 202 with the job and its
/// `Location` (a sync retry follows that job). Nothing without a key.
struct Answer<'a>(Option<&'a idempotency::Guard>);

impl submit::Record for Answer<'_> {
    type Error = ApiError;

    async fn record(self, tx: &Transaction<'_>, job: &Job) -> ApiResult<()> {
        let Some(guard) = self.0 else {
            return Ok(());
        };
        Ok(guard.record(tx, job, Some(&job.location())).await?)
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }
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
            cost (`balance` and `cost`); `key_spend_limit_exceeded`: the job's cost would take \
            the calling key past its `spend_limit` for the period (`limit`, `spent`, \
            `resets_at`). Nothing is queued."),
        (status = 409, description = "`idempotency_conflict`: a request with this \
            `Idempotency-Key` is still running, or this one outlived its claim and a retry took \
            it over (this attempt was undone)."),
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
    let outcome = create(&state, &caller, &req, &body, Mode::Async, |_| None).await?;
    Ok(idempotent::respond(outcome, |Created(job, _)| {
        HttpResponse::Accepted()
            .insert_header((LOCATION, job.location()))
            .json(*job)
    }))
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
            cost (`balance` and `cost`); `key_spend_limit_exceeded`: the job's cost would take \
            the calling key past its `spend_limit` for the period (`limit`, `spent`, \
            `resets_at`). Nothing is queued."),
        (status = 404, description = "`not_found`: a retry with an `Idempotency-Key` whose job \
            has since been deleted (past the job retention)."),
        (status = 409, description = "`idempotency_conflict`: a request with this \
            `Idempotency-Key` is still running, or this one outlived its claim and a retry took \
            it over (this attempt was undone); `job_cancelled`: the job was cancelled \
            (`DELETE /v1/jobs/{id}`) before it ran, and refunded."),
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
    let what = match created {
        Outcome::Ran(Created(job, Some(waiter))) => Follow::Queued(job, waiter),
        // (Not reached: `create` asks for the waiter. One registered only now could miss the
        // end, so the wait reads the job first.)
        Outcome::Ran(Created(job, None)) => Follow::Replayed(job.id),
        // A retry of a sync request: wait for the job the first request queued.
        Outcome::Replayed(stored) => match replayed_job_id(&stored) {
            Some(id) => Follow::Replayed(id),
            None => return Ok(idempotent::replay(stored)),
        },
    };
    match wait::follow(&state.db, &wakeups, caller.account_id, what).await? {
        // 200 with the job when it succeeded, else the problem that says why (with the job
        // id and `refunded: true`).
        Waited::Ended(done) => Ok(HttpResponse::Ok().json(wait::succeeded(done)?)),
        // This instance is shutting down: the job goes on (here, or back in the queue for
        // another instance), and the client learns where to follow it — as `POST /v1/jobs`
        // would have answered.
        Waited::HandedOff(job) => Ok(HttpResponse::Accepted()
            .insert_header((LOCATION, job.location()))
            .insert_header((RETRY_AFTER, "1"))
            .json(job)),
    }
}

fn replayed_job_id(stored: &StoredResponse) -> Option<Uuid> {
    if stored.status != StatusCode::ACCEPTED.as_u16() {
        return None;
    }
    let loc = stored.location.as_deref()?;
    loc.strip_prefix("/v1/jobs/")?.parse().ok()
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
