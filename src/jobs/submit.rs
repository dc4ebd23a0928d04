//! Submitting a job, for `POST /v1/jobs` and `POST /v1/scrape` alike: check everything that
//! needs no upstream (every refusal comes before any charge — an SSRF refusal included),
//! refuse fast while the target's breaker is open (nothing charged), then one transaction
//! reserves the cost, counts the queue cap and queues the job, together with whatever the
//! caller records alongside it (the `Idempotency-Key`'s answer).
//!
//! Nothing here knows HTTP: refusals are [`SubmitError`]s in the domain's words, and the
//! HTTP layer gives each its status and problem type.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use uuid::Uuid;

use super::breaker::{origin_of, Refused};
use super::fetch::{CustomerHeaders, FetchError, HeaderError};
use super::queue::{self, Job, Mode, NewJob, QueueError, StartHere};
use super::ssrf::UrlNotAllowed;
use super::wait::FINISH_GRACE;
use super::webhooks::{self, WebhookUrlError};
use super::Jobs;
use crate::tiers::{Tiers, JOB_FORMATS};

pub const MAX_TIMEOUT_MS: i64 = 60_000;
pub const MIN_TIMEOUT_MS: i64 = 100;
pub const DEFAULT_TIMEOUT_MS: i64 = 30_000;

/// What submitting a job needs from the server: no more than these pieces, so any caller
/// (a route, a console, a test) can submit without the HTTP application's state.
pub struct Context<'a> {
    pub db: &'a Pool,
    pub jobs: &'a Arc<Jobs>,
    pub tiers: &'a Tiers,
    /// The server's request timeout: a sync job must be able to end within it.
    pub request_timeout: Duration,
}

/// Who submits: the account that pays, and its tier (prices and the queue cap).
pub struct Submitter<'a> {
    pub account_id: Uuid,
    pub tier: &'a str,
    /// The key submitting: the job's charge and refund name it, and its spend limit applies.
    pub key_id: Option<&'a str>,
}

/// A job as a client asked for it, before any check.
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    pub url: String,
    /// `None`: `["metadata"]`.
    pub formats: Option<Vec<String>>,
    pub timeout_ms: Option<i64>,
    pub headers: Option<BTreeMap<String, String>>,
    pub webhook_url: Option<String>,
}

/// A value in the request the server does not accept. The `Display` text is the sentence a
/// client reads as the problem's `detail`; [`InvalidJob::field`] names the field.
#[derive(Debug, thiserror::Error)]
pub enum InvalidJob {
    /// Not a URL, too long, not http(s)… (a refused address is [`SubmitError::UrlNotAllowed`]).
    #[error("{0}")]
    Url(FetchError),
    #[error("unknown format {format:?}; formats are {known}.", known = JOB_FORMATS.join(", "))]
    UnknownFormat { format: String },
    #[error("formats must name at least one format.")]
    NoFormats,
    #[error("timeout_ms must be between {MIN_TIMEOUT_MS} and {MAX_TIMEOUT_MS}.")]
    TimeoutOutOfRange,
    /// A sync request must be able to wait for its job's whole timeout: the server's request
    /// timeout would otherwise cut it off while the job still runs (and may be charged).
    #[error(
        "timeout_ms must be at most {max} for POST /v1/scrape on this server \
         (its request timeout); use POST /v1/jobs for longer jobs."
    )]
    TimeoutTooLongToWait { max: i64 },
    #[error("{0}")]
    Headers(HeaderError),
    #[error("webhook_url is for POST /v1/jobs; POST /v1/scrape answers with the result.")]
    WebhookOnSync,
}

impl InvalidJob {
    /// The request field the refusal is about.
    pub fn field(&self) -> &'static str {
        match self {
            InvalidJob::Url(_) => "url",
            InvalidJob::UnknownFormat { .. } | InvalidJob::NoFormats => "formats",
            InvalidJob::TimeoutOutOfRange | InvalidJob::TimeoutTooLongToWait { .. } => "timeout_ms",
            InvalidJob::Headers(_) => "headers",
            InvalidJob::WebhookOnSync => "webhook_url",
        }
    }
}

/// Why a job was not queued. Every variant but `Queue` and `Db` comes before any charge.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
    /// The job's `url` is, or resolves to, an address the SSRF guard refuses.
    #[error("{0}")]
    UrlNotAllowed(UrlNotAllowed),
    #[error(transparent)]
    Webhook(#[from] WebhookUrlError),
    /// The target origin's or the egress provider's breaker is open.
    #[error("{0}")]
    BreakerOpen(Refused),
    /// The ledger or the queue refused (a short balance, the queue cap), or failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

crate::impl_db_error_from!(SubmitError);

/// What the caller writes in the job's own transaction once it is queued — the
/// `Idempotency-Key`'s answer — so the job and that record commit together or not at all.
/// Its error type is the caller's, so the record's own failures and the domain's refusals
/// reach the caller the same way.
// Only this crate implements it, so the future need not promise `Send`.
#[allow(async_fn_in_trait)]
pub trait Record {
    type Error: From<SubmitError>;
    async fn record(self, tx: &Transaction<'_>, job: &Job) -> Result<(), Self::Error>;

    /// Nothing to write (a request without an `Idempotency-Key`): the job may then be created
    /// in one pipelined flight ([`queue::Creator`]), which has no place for a record.
    fn is_empty(&self) -> bool {
        false
    }
}

/// Checks `request`, then reserves its cost and queues it as job `id` in one transaction,
/// in which `record` is written too; wakes the workers once it is committed. With nothing
/// to record, that transaction is one flight group-committed with others ([`queue::Creator`]).
///
/// A sync job whose account has a free running slot is not queued: the same transaction
/// inserts it running and leased to this instance, which starts it as soon as it commits
/// (one commit and no claim before the work; see [`queue::create`]). Its request then
/// waits for it like for any job.
pub async fn submit<R: Record>(
    ctx: &Context<'_>,
    who: &Submitter<'_>,
    request: JobRequest,
    mode: Mode,
    id: Uuid,
    idempotency_key: Option<&str>,
    record: R,
) -> Result<Job, R::Error> {
    let checked = check(ctx, who, request, mode).await?;
    let tier = ctx.tiers.get_or_default(who.tier);
    let max_queued = if tier.unlimited {
        i64::MAX
    } else {
        i64::from(tier.max_queued_jobs)
    };
    let new = NewJob {
        id,
        account_id: who.account_id,
        mode,
        url: checked.url,
        formats: checked.formats,
        headers: checked.headers,
        timeout_ms: checked.timeout_ms,
        webhook_url: checked.webhook_url,
        cost: checked.cost,
        origin: ctx.jobs.instance,
        idempotency_key: idempotency_key.map(str::to_owned),
        key_id: who.key_id.map(str::to_owned),
    };
    // Inline only with one of the instance's inline slots (bounded, fair per account).
    let slot = (mode == Mode::Sync && ctx.jobs.runs_inline())
        .then(|| ctx.jobs.inline_slot(who.account_id))
        .flatten();
    let start = slot.as_ref().map(|_| StartHere {
        owner: ctx.jobs.instance,
        lease: ctx.jobs.settings.lease,
        max_running: ctx.jobs.limits.of(who.tier),
    });
    // A job with a cost and nothing else to record goes through the create lane: one
    // flight, group-committed with the creations arriving meanwhile. When its plain
    // reservation does not apply (`None`: nothing was written), the transaction below
    // charges through the key's spend limit or says why not.
    let in_lane = if new.cost > 0 && record.is_empty() {
        ctx.jobs
            .creator
            .create(ctx.db, new.clone(), max_queued, start)
            .await
            .map_err(SubmitError::from)?
    } else {
        None
    };
    let (job, started) = match in_lane {
        Some(created) => created,
        None => {
            let mut client = ctx.db.get().await.map_err(SubmitError::from)?;
            let tx = client.transaction().await.map_err(SubmitError::from)?;
            let (job, started) = queue::create(&tx, &new, max_queued, start)
                .await
                .map_err(SubmitError::from)?;
            record.record(&tx, &job).await?;
            tx.commit().await.map_err(SubmitError::from)?;
            (job, started)
        }
    };
    match started {
        // `start` was asked only with a slot: `slot` is `Some` here.
        Some(claimed) => ctx.jobs.start_inline(ctx.db.clone(), claimed, slot),
        None => ctx.jobs.wakeups.job_queued(),
    }
    Ok(job)
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

/// Everything that can be refused before any charge, in the order a client learns of it.
async fn check(
    ctx: &Context<'_>,
    who: &Submitter<'_>,
    request: JobRequest,
    mode: Mode,
) -> Result<Checked, SubmitError> {
    let jobs = ctx.jobs;
    let url = match jobs.fetcher.validate(&request.url) {
        Ok(u) => u,
        Err(FetchError::NotAllowed(e)) => return Err(SubmitError::UrlNotAllowed(e)),
        Err(e) => return Err(InvalidJob::Url(e).into()),
    };
    let mut formats: Vec<String> = Vec::new();
    for f in request.formats.unwrap_or_else(|| vec!["metadata".into()]) {
        if !JOB_FORMATS.contains(&f.as_str()) {
            return Err(InvalidJob::UnknownFormat { format: f }.into());
        }
        if !formats.contains(&f) {
            formats.push(f);
        }
    }
    if formats.is_empty() {
        return Err(InvalidJob::NoFormats.into());
    }
    let timeout_ms = request.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(InvalidJob::TimeoutOutOfRange.into());
    }
    let request_ms = i64::try_from(ctx.request_timeout.as_millis()).unwrap_or(i64::MAX);
    let sync_max = request_ms.saturating_sub(FINISH_GRACE.as_millis() as i64 + 1_000);
    if mode == Mode::Sync && timeout_ms > sync_max {
        return Err(InvalidJob::TimeoutTooLongToWait { max: sync_max }.into());
    }
    let headers: Vec<(String, String)> = request.headers.unwrap_or_default().into_iter().collect();
    CustomerHeaders::new(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(InvalidJob::Headers)?;
    let webhook_url = match (request.webhook_url, mode) {
        (None, _) => None,
        (Some(_), Mode::Sync) => return Err(InvalidJob::WebhookOnSync.into()),
        (Some(w), Mode::Async) => Some(
            webhooks::validate_url(&jobs.webhooks, &w)
                .await?
                .to_string(),
        ),
    };
    let tier = ctx.tiers.get_or_default(who.tier);
    let cost: i64 = formats
        .iter()
        .map(|f| tier.prices.get(f).copied().unwrap_or(1))
        .sum();
    // Resolve now: a host that points at a private address is refused before any charge.
    jobs.fetcher
        .precheck(&url)
        .await
        .map_err(SubmitError::UrlNotAllowed)?;
    let origin = origin_of(&url);
    jobs.breakers
        .check(who.account_id, &origin)
        .map_err(SubmitError::BreakerOpen)?;
    Ok(Checked {
        url: url.to_string(),
        formats,
        headers,
        timeout_ms: i32::try_from(timeout_ms).unwrap_or(i32::MAX),
        webhook_url,
        cost,
    })
}
