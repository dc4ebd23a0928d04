//! Prometheus metrics: what the service does, for operators (`GET /metrics`).
//!
//! Two kinds of metric, kept apart on purpose:
//!
//! - **Event counters and histograms** (requests, authentications, rate-limit refusals,
//!   credit movements, Stripe events, jobs, breakers) are process-wide statics. Recording one
//!   is a single call from anywhere — the edge middleware, the ledger's free functions, a job
//!   worker — with no handle to thread through signatures that other code already calls.
//!   Production runs one application per process, so "per process" is "per instance".
//! - **Scrape-time values** that belong to one application (its database pool, its key
//!   cache) are collectors in that application's own [`Metrics`] registry, read when
//!   Prometheus scrapes — no background loop, never stale.
//!
//! Each application's registry exposes both. The test suite starts many applications in one
//! process, so the statics there add up across tests running in parallel: tests assert that
//! a counter grew by at least what they did (counters only grow), and exactly only on the
//! per-application collectors.
//!
//! Labels stay bounded: routes are matched patterns (`/v1/keys/{id}`, never the raw path),
//! methods outside the standard set are `other`, Stripe event types outside the ones
//! keymeter handles are `other`, tiers come from configuration. No label ever carries a key,
//! a secret, an account id or an email.
//!
//! The crate is `prometheus` (tikv) rather than `prometheus-client`: the latter writes only
//! OpenMetrics text, whose counter families are named without `_total` and which ends in
//! `# EOF` — a Prometheus-text parser reads that as mismatched, untyped series. This one
//! writes the Prometheus text format (`text/plain; version=0.0.4`) that every scraper and
//! parser accepts.

mod collectors;
mod jobs;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use anyhow::Context;
use deadpool_postgres::Pool;
use prometheus::core::Collector;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::auth::cache::KeyCache;
use crate::credits::ledger::Kind;

pub use collectors::Backlog;
#[cfg(test)]
pub(crate) use jobs::host_breaker_series;
pub use jobs::{breaker_rejected, forget_breaker, jobs, set_breaker_state, MAX_HOST_SERIES};
pub use jobs::{BreakerKind, BreakerState, Jobs};

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scrape waits for each [`Metrics::on_scrape`] hook before encoding without it.
const HOOK_TIMEOUT: Duration = Duration::from_secs(2);

/// Request latency, seconds: the cached-key hot path sits in the first buckets; the upper
/// ones reach the default request timeout (75 s) where synchronous scrape jobs end.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 75.0,
];

/// Job run time, seconds, from a fast page to a slow upstream at its timeout.
const JOB_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// How an authentication attempt ended. The API answers every refusal with the same 401;
/// only operators see which one it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Ok,
    /// No key in the request.
    Missing,
    /// Wrong length, prefix, alphabet or checksum: refused before the cache.
    Malformed,
    /// Well-formed, but no key has that id.
    UnknownKey,
    /// The key id exists, the rest does not match.
    WrongSecret,
    Revoked,
    Expired,
    /// A rotated key past its grace period.
    Rotated,
    /// The key is fine; its account is suspended.
    Suspended,
    /// The key could not be checked (database unavailable): the caller got a 503.
    Error,
}

impl AuthOutcome {
    pub const ALL: [AuthOutcome; 10] = [
        AuthOutcome::Ok,
        AuthOutcome::Missing,
        AuthOutcome::Malformed,
        AuthOutcome::UnknownKey,
        AuthOutcome::WrongSecret,
        AuthOutcome::Revoked,
        AuthOutcome::Expired,
        AuthOutcome::Rotated,
        AuthOutcome::Suspended,
        AuthOutcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthOutcome::Ok => "ok",
            AuthOutcome::Missing => "missing",
            AuthOutcome::Malformed => "malformed",
            AuthOutcome::UnknownKey => "unknown_key",
            AuthOutcome::WrongSecret => "wrong_secret",
            AuthOutcome::Revoked => "revoked",
            AuthOutcome::Expired => "expired",
            AuthOutcome::Rotated => "rotated",
            AuthOutcome::Suspended => "suspended",
            AuthOutcome::Error => "error",
        }
    }
}

/// Which limit refused a request with 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit<'a> {
    /// A keyed request over its account's tier limit or its key's own.
    Tier(&'a str),
    /// The per-address limit of the routes without a key.
    Ip,
    /// The address used up its failed-authentication budget.
    AuthFailures,
}

/// The process-wide families (see the module comment).
pub(crate) struct Families {
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    auth: IntCounterVec,
    /// `auth`'s children, one per outcome in [`AuthOutcome::ALL`] order: the hot path
    /// increments an atomic without hashing a label.
    auth_by_outcome: Vec<IntCounter>,
    rate_limited: IntCounterVec,
    credits: IntCounterVec,
    credit_movements: IntCounterVec,
    webhooks: IntCounterVec,
    build_info: IntGaugeVec,
    pub(crate) job_transitions: IntCounterVec,
    pub(crate) jobs_in_state: IntGaugeVec,
    pub(crate) queue_depth: IntGauge,
    pub(crate) job_duration: HistogramVec,
    pub(crate) breaker_state: IntGaugeVec,
    pub(crate) breaker_rejections: IntCounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

fn histogram(
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
}

impl Families {
    fn build() -> prometheus::Result<Families> {
        let auth = counter(
            "keymeter_auth_attempts_total",
            "API key authentications by outcome (every refusal is the same 401 to the caller).",
            &["outcome"],
        )?;
        let auth_by_outcome = AuthOutcome::ALL
            .iter()
            .map(|o| auth.get_metric_with_label_values(&[o.as_str()]))
            .collect::<prometheus::Result<Vec<_>>>()?;
        let build_info = gauge(
            "keymeter_build_info",
            "Always 1; the version label says which build is running.",
            &["version"],
        )?;
        build_info
            .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])?
            .set(1);
        Ok(Families {
            http_requests: counter(
                "keymeter_http_requests_total",
                "HTTP requests by matched route pattern, method and status.",
                &["route", "method", "status"],
            )?,
            http_duration: histogram(
                "keymeter_http_request_duration_seconds",
                "HTTP request latency by matched route pattern, method and status.",
                HTTP_BUCKETS,
                &["route", "method", "status"],
            )?,
            auth,
            auth_by_outcome,
            rate_limited: counter(
                "keymeter_rate_limited_requests_total",
                "Requests refused with 429: limit=key by the account's tier, limit=ip or auth_failures by client address (tier=none).",
                &["limit", "tier"],
            )?,
            credits: counter(
                "keymeter_credits_total",
                "Credits moved by ledger kind (charge, refund, purchase, grant, adjustment, clawback, dispute, dispute_won, expiry), as absolute amounts.",
                &["kind"],
            )?,
            credit_movements: counter(
                "keymeter_credit_movements_total",
                "Ledger movements by kind.",
                &["kind"],
            )?,
            webhooks: counter(
                "keymeter_stripe_webhook_events_total",
                "Stripe webhook deliveries by event type and outcome.",
                &["type", "outcome"],
            )?,
            build_info,
            job_transitions: counter(
                "keymeter_job_transitions_total",
                "Scrape jobs entering each state.",
                &["state"],
            )?,
            jobs_in_state: gauge(
                "keymeter_jobs",
                "Scrape jobs currently in each state.",
                &["state"],
            )?,
            queue_depth: IntGauge::new(
                "keymeter_jobs_queue_depth",
                "Scrape jobs queued and not yet claimed by a worker.",
            )?,
            job_duration: histogram(
                "keymeter_job_duration_seconds",
                "Scrape job run time by outcome.",
                JOB_BUCKETS,
                &["outcome"],
            )?,
            breaker_state: gauge(
                "keymeter_breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open (an origin appears only while its shared breaker is not closed, at most 100 at once).",
                &["kind", "name"],
            )?,
            breaker_rejections: counter(
                "keymeter_breaker_rejections_total",
                "Jobs refused because a circuit breaker was open.",
                &["kind"],
            )?,
        })
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.http_requests.clone()),
            Box::new(self.http_duration.clone()),
            Box::new(self.auth.clone()),
            Box::new(self.rate_limited.clone()),
            Box::new(self.credits.clone()),
            Box::new(self.credit_movements.clone()),
            Box::new(self.webhooks.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.job_transitions.clone()),
            Box::new(self.jobs_in_state.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.job_duration.clone()),
            Box::new(self.breaker_state.clone()),
            Box::new(self.breaker_rejections.clone()),
        ]
    }
}

/// Built on first use. The names and labels are constants, so building cannot fail in
/// practice; if it ever did, recording becomes a no-op and [`Metrics::new`] — which every
/// application calls at start-up — returns the error, so no server runs without metrics.
static FAMILIES: OnceLock<Result<Families, String>> = OnceLock::new();

fn init() -> &'static Result<Families, String> {
    FAMILIES.get_or_init(|| Families::build().map_err(|e| e.to_string()))
}

pub(crate) fn families() -> Option<&'static Families> {
    init().as_ref().ok()
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        // Extension methods are caller-chosen strings: one bucket for all of them.
        _ => "other",
    }
}

/// One finished HTTP request. `route` must be the matched pattern (or `unmatched`).
pub fn observe_request(route: &str, method: &Method, status: StatusCode, elapsed: Duration) {
    let Some(f) = families() else { return };
    let labels = [route, method_label(method), status.as_str()];
    if let Ok(c) = f.http_requests.get_metric_with_label_values(&labels) {
        c.inc();
    }
    if let Ok(h) = f.http_duration.get_metric_with_label_values(&labels) {
        h.observe(elapsed.as_secs_f64());
    }
}

/// One authentication attempt and how it ended.
pub fn auth_outcome(outcome: AuthOutcome) {
    // `ALL` lists the variants in declaration order, so the discriminant is the index.
    if let Some(c) = families().and_then(|f| f.auth_by_outcome.get(outcome as usize)) {
        c.inc();
    }
}

/// One request refused with 429 by `limit`.
pub fn rate_limited(limit: Limit<'_>) {
    let Some(f) = families() else { return };
    let labels = match limit {
        Limit::Tier(tier) => ["key", tier],
        Limit::Ip => ["ip", "none"],
        Limit::AuthFailures => ["auth_failures", "none"],
    };
    if let Ok(c) = f.rate_limited.get_metric_with_label_values(&labels) {
        c.inc();
    }
}

/// One ledger movement of `credits` (its sign is dropped: `kind` says the direction).
///
/// Counted when the statement that wrote it succeeded. A movement inside a transaction that
/// a later statement then rolls back (a Stripe event whose processing fails after crediting,
/// an idempotency record that cannot be completed) is counted although it did not happen;
/// those are rare failure paths, and the ledger stays the record of truth.
pub fn credits_moved(kind: Kind, credits: i64) {
    let Some(f) = families() else { return };
    let kind = [kind.as_str()];
    if let Ok(c) = f.credits.get_metric_with_label_values(&kind) {
        c.inc_by(credits.unsigned_abs());
    }
    if let Ok(c) = f.credit_movements.get_metric_with_label_values(&kind) {
        c.inc();
    }
}

/// The Stripe event types keymeter acts on; any other type is labelled `other`, since the
/// type comes from the request body.
const STRIPE_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "invoice.paid",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
];

/// One Stripe webhook delivery: its event type (`unverified` when the signature failed and
/// the body was never read) and what came of it.
pub fn webhook_event(event_type: &str, outcome: &'static str) {
    let Some(f) = families() else { return };
    let event_type = match event_type {
        "unverified" | "unknown" => event_type,
        t => STRIPE_TYPES
            .iter()
            .copied()
            .find(|s| *s == t)
            .unwrap_or("other"),
    };
    if let Ok(c) = f
        .webhooks
        .get_metric_with_label_values(&[event_type, outcome])
    {
        c.inc();
    }
}

type Hook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One application's registry: the process-wide families plus its own scrape-time
/// collectors and hooks. Lives in `AppState`; `GET /metrics` renders it.
pub struct Metrics {
    registry: Registry,
    hooks: Mutex<Vec<Hook>>,
    backlog: Backlog,
}

impl Metrics {
    /// A registry with every family, and gauges of `pool` and `cache` read at scrape time.
    pub fn new(pool: Pool, cache: KeyCache) -> anyhow::Result<Metrics> {
        let families = init()
            .as_ref()
            .map_err(|e| anyhow::anyhow!("building the metric families: {e}"))?;
        let registry = Registry::new();
        for c in families.collectors() {
            registry.register(c).context("registering metrics")?;
        }
        registry
            .register(Box::new(collectors::PoolCollector::new(pool)?))
            .context("registering the pool metrics")?;
        registry
            .register(Box::new(collectors::KeyCacheCollector::new(cache)?))
            .context("registering the key cache metrics")?;
        let backlog = Backlog::new()?;
        registry
            .register(Box::new(backlog.clone()))
            .context("registering the backlog metrics")?;
        Ok(Metrics {
            registry,
            hooks: Mutex::new(Vec::new()),
            backlog,
        })
    }

    /// This application's queue-age and job-webhook gauges, for its `on_scrape` hook to set.
    pub fn backlog(&self) -> Backlog {
        self.backlog.clone()
    }

    /// Adds a collector of this application's own (read at scrape time, like the pool's).
    pub fn register(&self, collector: Box<dyn Collector>) -> anyhow::Result<()> {
        self.registry
            .register(collector)
            .context("registering a collector")
    }

    /// Runs `hook` at every scrape, before encoding, for values that need an async look-up —
    /// e.g. `SELECT status, count(*) FROM jobs GROUP BY status` feeding
    /// [`Jobs::set_in_state`] and [`Jobs::set_queue_depth`]. Hooks run concurrently; one
    /// that takes longer than 2 s is abandoned for that scrape (its gauges keep their last
    /// values) and logged.
    pub fn on_scrape<F, Fut>(&self, hook: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook: Hook = Arc::new(move || Box::pin(hook()));
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// The Prometheus text exposition of everything registered.
    pub async fn render(&self) -> anyhow::Result<String> {
        let hooks: Vec<Hook> = self.hooks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let runs = hooks
            .iter()
            .map(|h| tokio::time::timeout(HOOK_TIMEOUT, h()));
        for r in futures_util::future::join_all(runs).await {
            if r.is_err() {
                tracing::warn!("a metrics scrape hook timed out; its values may be stale");
            }
        }
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .context("encoding metrics")?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_families_build() {
        if let Err(e) = init() {
            panic!("metric families do not build: {e}");
        }
    }

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        webhook_event("made.up.by.the.sender", "ignored");
        webhook_event("invoice.paid", "plan_period_paid");
        let f = families().unwrap();
        assert!(
            f.webhooks
                .get_metric_with_label_values(&["other", "ignored"])
                .unwrap()
                .get()
                >= 1
        );
        let text = TextEncoder::new()
            .encode_to_string(&f.webhooks.collect())
            .unwrap();
        assert!(!text.contains("made.up"), "{text}");
    }

    #[test]
    fn every_auth_outcome_has_its_counter() {
        let f = families().unwrap();
        assert_eq!(f.auth_by_outcome.len(), AuthOutcome::ALL.len());
        for (i, o) in AuthOutcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i, "ALL is in declaration order");
        }
        let before = f
            .auth
            .get_metric_with_label_values(&["wrong_secret"])
            .unwrap()
            .get();
        auth_outcome(AuthOutcome::WrongSecret);
        let after = f
            .auth
            .get_metric_with_label_values(&["wrong_secret"])
            .unwrap()
            .get();
        assert!(after > before);
    }
}
