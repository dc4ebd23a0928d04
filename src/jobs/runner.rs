//! The workers: each instance runs a fixed number of them, claiming jobs from the shared
//! queue and running them behind the breakers, renewing their lease while they work.
//!
//! Shutdown happens in two steps driven by `startup`: `drain` (the HTTP server is finishing
//! its in-flight requests; workers take only the sync jobs of requests this instance still
//! serves, so those requests get their answers) and `stop` (no more claims; jobs already
//! running finish within the shutdown timeout; whatever is still running after it is put
//! back in the queue for another instance).
//!
//! A sync job whose account had a free slot skips the queue: its request inserts it already
//! running and leased to this instance, and [`Jobs::start_inline`] runs it here at once,
//! through the same [`Jobs::run`] a worker uses. Those runs are tracked apart from the
//! workers but stop the same way: the grace covers them, then they go back to the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;
use uuid::Uuid;

use super::breaker::{origin_of, Breakers};
use super::extract::{extract, ExtractLimits, Format};
use super::fetch::{classify, CustomerHeaders, Fetcher, Outcome};
use super::queue::{
    self, Claim, Claimed, ConcurrencyLimits, Creator, End, Fence, Finisher, Job, QueueError,
};
use super::wakeups::Wakeups;
use super::webhooks;

#[derive(Debug, Clone)]
pub struct JobSettings {
    pub workers: usize,
    pub lease: Duration,
    /// How often idle workers look at the queue without being woken.
    pub poll: Duration,
    pub retention: Duration,
    pub extract: ExtractLimits,
}

/// Everything that creates, runs and waits for jobs; shared by routes and workers.
pub struct Jobs {
    /// This process's identity as a lease owner.
    pub instance: Uuid,
    pub fetcher: Fetcher,
    pub breakers: Breakers,
    pub wakeups: Arc<Wakeups>,
    pub limits: ConcurrencyLimits,
    pub settings: JobSettings,
    pub webhooks: webhooks::Sender,
    /// The group-commit lane the workers' finishes share (`queue::Finisher`).
    pub finisher: Finisher,
    /// The group-commit lane the submits share (`queue::Creator`).
    pub creator: Creator,
    pub inline: Inline,
}

/// The most sync jobs one instance runs inline at once, over all accounts. Each is a task
/// with an open upstream connection; without a bound, accounts of an unlimited tier (or many
/// accounts, each under its own running limit) could start as many as they send. Beyond it a
/// sync job is queued as before, for the workers (a fixed number), and nothing is refused.
pub const MAX_INLINE: usize = 256;
/// The most of those one account may hold: an eighth, so one account's flood of sync
/// requests leaves the rest to the others' sync jobs, which still start at once. (Its own
/// further jobs queue, and run as the workers and its running limit allow.)
pub const MAX_INLINE_PER_ACCOUNT: usize = MAX_INLINE / 8;

/// The sync jobs this instance started for its own requests ([`Jobs::start_inline`]).
pub struct Inline {
    /// Inline runs in progress, in total and per account ([`Jobs::inline_slot`]).
    slots: std::sync::Mutex<InlineSlots>,
    tracker: TaskTracker,
    /// The runtime the workers run on. A request's handler runs on an HTTP worker's runtime,
    /// which stops when the HTTP drain ends; a job started there would die with it instead of
    /// getting the jobs' shutdown grace like a claimed one.
    runtime: Option<Handle>,
    /// Set once the workers stopped: from then on sync jobs go through the queue.
    stopped: AtomicBool,
}

impl Inline {
    /// Runs started later are spawned on the current runtime (the one the workers use).
    pub fn new() -> Inline {
        Inline {
            slots: std::sync::Mutex::new(InlineSlots::default()),
            tracker: TaskTracker::new(),
            runtime: Handle::try_current().ok(),
            stopped: AtomicBool::new(false),
        }
    }
}

#[derive(Default)]
struct InlineSlots {
    total: usize,
    /// Only accounts that hold a slot: the map is bounded by [`MAX_INLINE`].
    by_account: std::collections::HashMap<Uuid, usize>,
}

/// One of the instance's inline slots, held by a sync job from its submission to its end;
/// given back when dropped (whether or not the job was started inline).
pub struct InlineSlot {
    jobs: Arc<Jobs>,
    account_id: Uuid,
}

impl Drop for InlineSlot {
    fn drop(&mut self) {
        // A poisoned lock still holds consistent counts: every change is one short step.
        let mut slots = self
            .jobs
            .inline
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slots.total = slots.total.saturating_sub(1);
        if let Some(n) = slots.by_account.get_mut(&self.account_id) {
            *n -= 1;
            if *n == 0 {
                slots.by_account.remove(&self.account_id);
            }
        }
    }
}

impl Default for Inline {
    fn default() -> Self {
        Inline::new()
    }
}

impl Jobs {
    /// Runs the workers until `stop`, then waits for running jobs up to `grace` and
    /// re-queues what is left.
    pub async fn run_workers(
        self: Arc<Self>,
        db: Pool,
        drain: CancellationToken,
        stop: CancellationToken,
        grace: Duration,
    ) {
        let tracker = tokio_util::task::TaskTracker::new();
        for n in 0..self.settings.workers.max(1) {
            let (jobs, db, drain, stop) = (self.clone(), db.clone(), drain.clone(), stop.clone());
            tracker.spawn(async move { jobs.worker(n, db, drain, stop).await });
        }
        tracker.close();
        stop.cancelled().await;
        self.inline.stopped.store(true, Ordering::SeqCst);
        self.inline.tracker.close();
        let all_ended = async {
            tracker.wait().await;
            self.inline.tracker.wait().await;
        };
        if tokio::time::timeout(grace, all_ended).await.is_err() {
            tracing::warn!(
                "jobs still running at the shutdown timeout; putting them back in the queue"
            );
        }
        match queue::release_owned(&db, self.instance).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "re-queued unfinished jobs for another instance"),
            Err(e) => {
                tracing::warn!(error = %e, "could not re-queue unfinished jobs; their leases will expire")
            }
        }
    }

    async fn worker(&self, n: usize, db: Pool, drain: CancellationToken, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        // Counted among the workers that may be waiting for a running slot from before each
        // claim until one finds the queue empty (see `Wakeups::slot_freed`).
        let watching = self.wakeups.watch_slots();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let only_origin = drain.is_cancelled().then_some(self.instance);
            watching.set(true);
            match queue::claim(
                &db,
                self.instance,
                &self.limits,
                self.settings.lease,
                only_origin,
            )
            .await
            {
                Ok(Claim::Job(job)) => {
                    backoff = Duration::from_millis(100);
                    // A job, once claimed, runs to its end even while stopping: its own
                    // deadline bounds it, and the grace period bounds the wait for it.
                    self.run(&db, job).await;
                    continue;
                }
                Ok(Claim::Waiting) => {}
                Ok(Claim::Empty) => watching.set(false),
                Err(e) => {
                    tracing::warn!(worker = n, error = %e, "claiming a job failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                () = self.wakeups.work_available() => {}
                () = tokio::time::sleep(self.settings.poll) => {}
                () = stop.cancelled() => return,
                () = drain.cancelled(), if !drain.is_cancelled() => {}
            }
        }
    }

    /// Whether a sync job may be started by its own request on this instance: not once the
    /// workers have stopped (the job then waits in the queue for another instance).
    pub fn runs_inline(&self) -> bool {
        !self.inline.stopped.load(Ordering::SeqCst)
    }

    /// A slot for running one of `account_id`'s sync jobs inline, if the instance and the
    /// account are under their bounds ([`MAX_INLINE`], [`MAX_INLINE_PER_ACCOUNT`]); `None`:
    /// queue the job instead. Taken before the job's transaction, so a slot is never
    /// over-promised; a job that finds no running slot in it gives its inline slot back.
    pub fn inline_slot(self: &Arc<Self>, account_id: Uuid) -> Option<InlineSlot> {
        let mut slots = self.inline.slots.lock().unwrap_or_else(|p| p.into_inner());
        let held = slots.by_account.get(&account_id).copied().unwrap_or(0);
        if slots.total >= MAX_INLINE || held >= MAX_INLINE_PER_ACCOUNT {
            return None;
        }
        slots.total += 1;
        slots.by_account.insert(account_id, held + 1);
        Some(InlineSlot {
            jobs: self.clone(),
            account_id,
        })
    }

    /// Runs a job its request just inserted running and leased to this instance
    /// ([`queue::create`] with [`queue::StartHere`]), at once, as a worker runs a claimed job,
    /// holding its inline `slot` until it ends.
    pub fn start_inline(self: &Arc<Self>, db: Pool, job: Claimed, slot: Option<InlineSlot>) {
        let jobs = self.clone();
        let run = async move {
            jobs.run(&db, job).await;
            drop(slot);
        };
        match &self.inline.runtime {
            Some(handle) => drop(self.inline.tracker.spawn_on(run, handle)),
            None => drop(self.inline.tracker.spawn(run)),
        }
    }

    /// Runs one claimed job to its end and records it.
    async fn run(&self, db: &Pool, job: Claimed) {
        let started = Instant::now();
        let end = {
            let work = self.execute(&job);
            let lease = self.keep_lease(db, &job);
            tokio::select! {
                end = work => Some(end),
                () = lease => None,
            }
        };
        let Some(end) = end else {
            tracing::info!(job_id = %job.id, "lost the job's lease (timed out or re-queued); dropping this attempt");
            return;
        };
        let fence = Fence::Lease {
            owner: self.instance,
            attempt: job.attempt,
        };
        let mut tries = 0;
        let mut ended = None;
        // Waiters and workers here are woken below; the commit's notification is for others.
        self.wakeups.ending_here(job.id);
        loop {
            tries += 1;
            match self.finish(db, &job, &end, fence).await {
                Ok(Some(done)) => {
                    ended = Some(done);
                    break;
                }
                Ok(None) => {
                    self.wakeups.not_ended_here(job.id);
                    tracing::info!(job_id = %job.id, "job ended elsewhere before this attempt finished");
                    break;
                }
                Err(e) if tries < 5 => {
                    tracing::warn!(job_id = %job.id, error = %e, "could not record the job's end; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    self.wakeups.not_ended_here(job.id);
                    tracing::error!(job_id = %job.id, error = %e, "could not record the job's end; its lease will expire and it will run again");
                    break;
                }
            }
        }
        let outcome = match &end {
            End::Succeeded { .. } => "succeeded",
            End::Failed { .. } => "failed",
            End::Cancelled => "cancelled",
        };
        crate::metrics::jobs().finished(outcome, started.elapsed());
        tracing::info!(
            job_id = %job.id,
            attempt = job.attempt,
            outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "job finished"
        );
        match ended {
            Some(done) => self.wakeups.job_ended(done),
            None => self.wakeups.job_done(job.id),
        }
        // Its concurrency slot is free: another of the account's jobs may run.
        self.wakeups.slot_freed();
    }

    async fn finish(
        &self,
        db: &Pool,
        job: &Claimed,
        end: &End,
        fence: Fence,
    ) -> Result<Option<Job>, QueueError> {
        match fence {
            Fence::Lease { owner, attempt } => {
                self.finisher
                    .finish_claimed(db, job, end.clone(), owner, attempt)
                    .await
            }
            Fence::From(_) => {
                let mut client = db.get().await?;
                let tx = client.transaction().await?;
                let done = queue::finalize(&tx, job.id, end, fence).await?;
                tx.commit().await?;
                Ok(done)
            }
        }
    }

    /// Renews the lease every third of its length; returns only when it was lost.
    async fn keep_lease(&self, db: &Pool, job: &Claimed) {
        let every = self.settings.lease / 3;
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(every).await;
            match queue::renew(db, job.id, self.instance, job.attempt, self.settings.lease).await {
                Ok(true) => failures = 0,
                Ok(false) => return,
                Err(e) => {
                    // The database may be briefly away; the lease has slack for two misses.
                    failures += 1;
                    tracing::warn!(job_id = %job.id, error = %e, "could not renew the job's lease");
                    if failures >= 3 {
                        return;
                    }
                }
            }
        }
    }

    /// Fetches and extracts; never fails — every problem becomes a failed [`End`].
    async fn execute(&self, job: &Claimed) -> End {
        let budget = job.budget(Utc::now());
        if budget.is_zero() {
            return End::failed("timeout", "The job waited in the queue past its timeout.");
        }
        let url = match Url::parse(&job.url) {
            Ok(u) => u,
            Err(e) => return End::failed("invalid_url", e.to_string()),
        };
        let formats: Vec<Format> = job
            .formats
            .iter()
            .filter_map(|f| serde_json::from_value(serde_json::Value::String(f.clone())).ok())
            .collect();
        let headers =
            match CustomerHeaders::new(job.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
                Ok(h) => h,
                Err(e) => return End::failed("invalid_request", e.to_string()),
            };
        let tickets = match self.breakers.acquire(job.account_id, &origin_of(&url)) {
            Ok(t) => t,
            Err(refused) => return End::failed("circuit_open", refused.to_string()),
        };
        let result = self.fetcher.fetch(&url, budget, &headers).await;
        // What counts against the site depends on the time this job gave it, not only on
        // how it failed: see `breaker`.
        tickets.record(self.breakers.signal(&result, budget));
        let outcome = classify(&result);
        match (outcome, result) {
            (Outcome::Usable, Ok(page)) => {
                let status = page.status;
                let limits = self.settings.extract.clone();
                let extracted =
                    tokio::task::spawn_blocking(move || extract(&page, &formats, &limits)).await;
                match extracted.map(|e| serde_json::to_value(&e)) {
                    Ok(Ok(result)) => End::Succeeded {
                        result,
                        upstream_status: status,
                    },
                    _ => End::Failed {
                        reason: "extraction_failed".into(),
                        detail: "The page could not be processed.".into(),
                        upstream_status: Some(status),
                    },
                }
            }
            (Outcome::Failed { reason, .. }, Ok(page)) => End::Failed {
                reason: reason.to_string(),
                detail: format!("The site answered with status {}.", page.status),
                upstream_status: Some(page.status),
            },
            (Outcome::Failed { reason, .. }, Err(e)) => End::Failed {
                reason: reason.to_string(),
                detail: e.to_string(),
                upstream_status: None,
            },
            (Outcome::Usable, Err(e)) => End::failed("network", e.to_string()),
        }
    }

    /// Re-queues expired leases and fails dead or expired jobs, every few seconds; deletes
    /// jobs past their retention every ten minutes.
    pub async fn run_reaper(self: Arc<Self>, db: Pool, stop: CancellationToken) {
        let every =
            (self.settings.lease / 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
        let mut last_purge = Instant::now();
        loop {
            if last_purge.elapsed() >= Duration::from_secs(600) {
                last_purge = Instant::now();
                match queue::purge(&db, self.settings.retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "deleted jobs past their retention"),
                    Err(e) => tracing::warn!(error = %e, "job retention pass failed"),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            match queue::reap(&db).await {
                Ok(r) if r.requeued + r.failed + r.expired > 0 => {
                    tracing::info!(
                        requeued = r.requeued,
                        failed = r.failed,
                        expired = r.expired,
                        "reaped jobs"
                    );
                    if r.requeued > 0 {
                        self.wakeups.job_queued();
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "job reaper pass failed"),
            }
        }
    }
}
