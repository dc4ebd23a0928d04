//! Circuit breakers (failsafe): one for the egress provider (the direct path or the proxy),
//! one per target **origin** (scheme, host, port) shared by every account, and one per
//! (account, origin). A job runs only when all of them let it through; while one is open the
//! job is refused at once (503 `upstream_unavailable`, nothing charged) instead of waiting
//! for a dead upstream's timeout.
//!
//! Customers choose the URLs, the timeouts and how many jobs they send, so a breaker must
//! not let one of them pause a site (or the whole egress path) for the others:
//!
//! - **Per origin, not per host.** A dead port on a popular host is its own origin; its
//!   failures say nothing about the host's other ports.
//! - **Only the site's failures count** ([`Breakers::signal`]). A timeout counts only when the
//!   job gave the site a fair budget (at least the configured floor): a 100 ms `timeout_ms`
//!   that expires is the customer's choice. A refusal of ours (SSRF guard) says nothing about
//!   the site.
//! - **One account cannot open a shared breaker.** Every failure of an account's job opens,
//!   after enough of them, that account's own breaker for the origin: it refuses only that
//!   account's jobs. The origin's shared breaker counts a failure only while failures from at
//!   least `min_accounts` distinct accounts are recent (within the window); when that is first
//!   reached it counts one failure per distinct account at once, so a site down for everyone
//!   still trips after a handful of jobs.
//! - **The provider breaker counts only egress failures** (connect errors, resets, timeouts
//!   with a fair budget — never a DNS "no such host" or an HTTP answer) and only while they
//!   come from at least `provider_min_origins` distinct origins and `min_accounts` distinct
//!   accounts: one dead site, or one account's list of dead ports, cannot shut the egress
//!   path for everyone.
//! - **Bounded.** Origin and account breakers are created on an origin's first failure (a
//!   site that never fails costs nothing), live in bounded caches that forget idle ones, and
//!   an evicted breaker's metric series is removed with it. Account breakers have no metric
//!   series at all (no label carries an account id).
//!
//! What failsafe leaves to us:
//! - **Half-open lets every caller through.** We let exactly one probe through at a time:
//!   the others are refused as if the breaker were still open until the probe's outcome
//!   closes or re-opens it.
//! - **State is only visible through `Instrument`.** Each breaker's instrument writes its
//!   state to an atomic the admin route and the metrics read.
//! - **No timeouts of its own.** The fetch has its own deadline; a timeout is the site's
//!   failure only under the rule above.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use failsafe::backoff::{self, Exponential};
use failsafe::failure_policy::{
    self, ConsecutiveFailures, FailurePolicy, OrElse, SuccessRateOverTimeWindow,
};
use failsafe::{Instrument, StateMachine};
use serde::Serialize;
use url::Url;
use uuid::Uuid;

use super::fetch::{classify, FetchError, Fetched, Outcome};
use crate::metrics;

/// Tuning, from configuration (`KEYMETER_BREAKER_*`).
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Consecutive counted failures that open an origin's (or an account's) breaker.
    pub consecutive_failures: u32,
    /// First open period; it doubles on every failed probe up to `max_open`.
    pub open_for: Duration,
    pub max_open: Duration,
    /// The success rate under which a breaker opens, over `window`.
    pub required_success_rate: f64,
    /// Also how long a failure stays "recent" for the distinct-account and -origin counts.
    pub window: Duration,
    /// Requests within `window` before the rate counts (origin; the provider needs 5×).
    pub min_requests: u32,
    /// Distinct accounts whose recent failures an origin's shared breaker (and the provider's)
    /// needs before it counts any (`KEYMETER_BREAKER_MIN_ACCOUNTS`).
    pub min_accounts: u32,
    /// Distinct origins whose recent egress failures the provider breaker needs.
    pub provider_min_origins: u32,
    /// A timeout counts against a site only when the job gave it at least this long
    /// (`KEYMETER_BREAKER_TIMEOUT_FLOOR_MS`).
    pub timeout_floor: Duration,
    /// Origin breakers, and account breakers, kept at most (each map).
    pub capacity: u64,
    /// A breaker nobody asked about for this long is forgotten.
    pub idle: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            open_for: Duration::from_secs(10),
            max_open: Duration::from_secs(120),
            required_success_rate: 0.5,
            window: Duration::from_secs(30),
            min_requests: 20,
            min_accounts: 3,
            provider_min_origins: 10,
            timeout_floor: Duration::from_secs(5),
            capacity: 10_000,
            idle: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::HalfOpen,
            2 => State::Open,
            _ => State::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Provider,
    /// A target origin's: the shared one, or one account's (see [`Scope`]).
    Host,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Provider => "provider",
            Kind::Host => "host",
        }
    }
}

/// Whom a breaker refuses: every account, or only the one whose jobs kept failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Shared,
    Account,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Shared => "shared",
            Scope::Account => "account",
        }
    }
}

/// The origin a URL's breakers are keyed by: `scheme://host[:port]` (default ports left
/// out, host lower-case), e.g. `https://example.com`, `http://127.0.0.1:8080`.
pub fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// What a finished fetch says about the site and the egress path (see [`Breakers::signal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The site answered.
    Healthy,
    /// The site looked unwell. `egress`: the failure could also be the egress path's
    /// (no connection, a reset, a timeout), as opposed to an answer or a DNS failure.
    SiteFailure { egress: bool },
    /// Says nothing about the site: a timeout shorter than the floor, or our own refusal.
    Unknown,
}

/// Writes state changes where they can be read, and says so in the log.
struct Watch {
    kind: Kind,
    scope: Scope,
    name: Arc<str>,
    state: Arc<AtomicU8>,
}

fn metric_kind(kind: Kind) -> metrics::BreakerKind {
    match kind {
        Kind::Provider => metrics::BreakerKind::Provider,
        Kind::Host => metrics::BreakerKind::Host,
    }
}

impl Watch {
    fn set(&self, state: State) {
        // Account breakers have no state series: their label would carry an account id, and
        // there can be one per account and origin.
        if self.scope == Scope::Shared {
            metrics::set_breaker_state(
                metric_kind(self.kind),
                &self.name,
                match state {
                    State::Closed => metrics::BreakerState::Closed,
                    State::HalfOpen => metrics::BreakerState::HalfOpen,
                    State::Open => metrics::BreakerState::Open,
                },
            );
        }
        let before = State::from_u8(self.state.swap(state as u8, Ordering::AcqRel));
        if before != state {
            tracing::info!(
                breaker = self.kind.as_str(),
                scope = self.scope.as_str(),
                name = %self.name,
                from = before.as_str(),
                to = state.as_str(),
                "circuit breaker changed state"
            );
        }
    }
}

impl Instrument for Watch {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.set(State::Open);
    }
    fn on_half_open(&self) {
        self.set(State::HalfOpen);
    }
    fn on_closed(&self) {
        self.set(State::Closed);
    }
}

type RatePolicy = SuccessRateOverTimeWindow<Exponential>;
type HostPolicy = OrElse<ConsecutiveFailures<Exponential>, RatePolicy>;

/// Either policy behind one type, so host and provider breakers share the code.
enum Policy {
    Host(HostPolicy),
    Provider(RatePolicy),
}

impl FailurePolicy for Policy {
    fn record_success(&mut self) {
        match self {
            Policy::Host(p) => p.record_success(),
            Policy::Provider(p) => p.record_success(),
        }
    }
    fn mark_dead_on_failure(&mut self) -> Option<Duration> {
        match self {
            Policy::Host(p) => p.mark_dead_on_failure(),
            Policy::Provider(p) => p.mark_dead_on_failure(),
        }
    }
    fn revived(&mut self) {
        match self {
            Policy::Host(p) => p.revived(),
            Policy::Provider(p) => p.revived(),
        }
    }
}

pub struct Breaker {
    kind: Kind,
    scope: Scope,
    name: Arc<str>,
    /// Set for an account's breaker.
    account: Option<Uuid>,
    machine: StateMachine<Policy, Watch>,
    state: Arc<AtomicU8>,
    /// A half-open probe is out.
    probing: AtomicBool,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    fn new(
        kind: Kind,
        scope: Scope,
        name: &str,
        account: Option<Uuid>,
        s: &BreakerSettings,
    ) -> Breaker {
        // failsafe asserts (panics) on backoffs under a second: never hand it one.
        let open_for = s.open_for.max(Duration::from_secs(1));
        let backoff = || backoff::exponential(open_for, s.max_open.max(open_for));
        let policy = match kind {
            Kind::Host => Policy::Host(
                failure_policy::consecutive_failures(s.consecutive_failures.max(1), backoff())
                    .or_else(failure_policy::success_rate_over_time_window(
                        s.required_success_rate.clamp(0.0, 1.0),
                        s.min_requests,
                        s.window,
                        backoff(),
                    )),
            ),
            Kind::Provider => Policy::Provider(failure_policy::success_rate_over_time_window(
                s.required_success_rate.clamp(0.0, 1.0),
                s.min_requests.saturating_mul(5),
                s.window,
                backoff(),
            )),
        };
        let name: Arc<str> = Arc::from(name);
        let state = Arc::new(AtomicU8::new(State::Closed as u8));
        let watch = Watch {
            kind,
            scope,
            name: name.clone(),
            state: state.clone(),
        };
        Breaker {
            kind,
            scope,
            name,
            account,
            machine: StateMachine::new(policy, watch),
            state,
            probing: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Permission for one call: `None` while open, or half-open with its probe already out.
    fn acquire(self: &Arc<Self>) -> Option<Ticket> {
        if !self.machine.is_call_permitted() {
            return None;
        }
        let probe = self.state() == State::HalfOpen;
        if probe && self.probing.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Ticket {
            breaker: self.clone(),
            probe,
        })
    }

    /// Whether a call would be let through now, without taking a probe.
    fn would_permit(&self) -> bool {
        self.machine.is_call_permitted()
            && !(self.state() == State::HalfOpen && self.probing.load(Ordering::Acquire))
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            kind: self.kind,
            scope: self.scope,
            name: self.name.to_string(),
            account_id: self.account,
            state: self.state(),
        }
    }
}

/// One call's permission, held while the call runs. Dropped (recorded or not: the job was
/// cancelled, lost its lease, or its outcome did not count), it frees a half-open probe slot.
struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

/// Recent failures, for counting distinct accounts (and origins) within the window. Short:
/// only whether a few distinct values are present matters, so the oldest entries go first.
const RECENT: usize = 64;
const PROVIDER_RECENT: usize = 256;

/// An origin's shared breaker and the recent failures that decide whether it counts one.
struct OriginEntry {
    breaker: Arc<Breaker>,
    /// (when, account, counted on the breaker yet).
    recent: Mutex<VecDeque<(Instant, Uuid, bool)>>,
}

/// A lock on short bookkeeping only; a panic elsewhere cannot leave it inconsistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OriginEntry {
    /// Notes a failure of `account`'s job; answers how many failures the shared breaker
    /// should count now: none while fewer than `min_accounts` distinct accounts failed within
    /// the window, else one per distinct account among those not yet counted (so a burst of
    /// one account's failures weighs as much as one failure).
    fn failed(&self, account: Uuid, s: &BreakerSettings) -> usize {
        let now = Instant::now();
        let mut recent = lock(&self.recent);
        while recent
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > s.window)
            || recent.len() >= RECENT
        {
            recent.pop_front();
        }
        recent.push_back((now, account, false));
        let distinct: HashSet<Uuid> = recent.iter().map(|(_, a, _)| *a).collect();
        if distinct.len() < s.min_accounts.max(1) as usize {
            return 0;
        }
        let uncounted: HashSet<Uuid> = recent
            .iter()
            .filter(|(_, _, counted)| !counted)
            .map(|(_, a, _)| *a)
            .collect();
        for entry in recent.iter_mut() {
            entry.2 = true;
        }
        uncounted.len()
    }

    /// A success: failures before it no longer run consecutively.
    fn succeeded(&self) {
        for entry in lock(&self.recent).iter_mut() {
            entry.2 = true;
        }
    }
}

/// A recent egress failure, for the provider's distinct counts: (when, origin, account).
type EgressFailure = (Instant, Arc<str>, Uuid);

/// Every permission a job needs, and what to record its outcome on.
pub struct Tickets {
    breakers: Breakers,
    account: Uuid,
    origin: Arc<str>,
    // Held for their probe slots until the outcome is recorded (or the job is dropped).
    _provider: Ticket,
    _origin: Option<Ticket>,
    _account: Option<Ticket>,
}

impl Tickets {
    /// Records the fetch's outcome on the provider, the origin and the account's breakers,
    /// following the rules in the module doc.
    pub fn record(self, signal: Signal) {
        let b = &self.breakers;
        match signal {
            Signal::Unknown => {}
            Signal::Healthy => {
                b.provider.machine.on_success();
                if let Some(entry) = b.origins.get(&self.origin) {
                    entry.succeeded();
                    entry.breaker.machine.on_success();
                }
                if let Some(ab) = b.accounts.get(&(self.account, self.origin.clone())) {
                    ab.machine.on_success();
                }
            }
            Signal::SiteFailure { egress } => {
                b.account_breaker(self.account, &self.origin)
                    .machine
                    .on_error();
                let entry = b.origin_entry(&self.origin);
                for _ in 0..entry.failed(self.account, &b.settings) {
                    entry.breaker.machine.on_error();
                }
                if egress && b.provider_counts(&self.origin, self.account) {
                    b.provider.machine.on_error();
                }
            }
        }
    }
}

/// Which breaker refused.
#[derive(Debug, Clone)]
pub struct Refused {
    pub kind: Kind,
    pub scope: Scope,
    pub name: String,
    /// A hint for `Retry-After`: the first open period.
    pub retry_after: Duration,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.scope) {
            (Kind::Provider, _) => write!(
                f,
                "The egress provider {} is failing; jobs are paused for it. Retry shortly.",
                self.name
            ),
            (Kind::Host, Scope::Shared) => write!(
                f,
                "{} has been failing (errors or timeouts); requests to it are paused. Retry shortly.",
                self.name
            ),
            (Kind::Host, Scope::Account) => write!(
                f,
                "This account's recent jobs to {} have failed (errors or timeouts); its requests \
                 to it are paused. Retry shortly.",
                self.name
            ),
        }
    }
}

/// A breaker's state for operators (`GET /admin/breakers`, metrics).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub kind: Kind,
    pub scope: Scope,
    /// The provider's name, or the origin.
    pub name: String,
    /// The account an account-scoped breaker refuses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    pub state: State,
}

/// Every breaker of the process. Cheap to clone (everything is shared).
#[derive(Clone)]
pub struct Breakers {
    settings: Arc<BreakerSettings>,
    provider: Arc<Breaker>,
    provider_recent: Arc<Mutex<VecDeque<EgressFailure>>>,
    origins: moka::sync::Cache<Arc<str>, Arc<OriginEntry>>,
    accounts: moka::sync::Cache<(Uuid, Arc<str>), Arc<Breaker>>,
}

impl fmt::Debug for Breakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breakers")
            .field("provider", &self.provider)
            .field("origins", &self.origins.entry_count())
            .field("accounts", &self.accounts.entry_count())
            .finish()
    }
}

/// Open breakers listed per scope by [`Breakers::snapshot`], at most (the counts are exact).
const SNAPSHOT_MAX: usize = 1_000;

impl Breakers {
    pub fn new(provider: &str, settings: BreakerSettings) -> Breakers {
        // An evicted origin breaker takes its metric series with it: otherwise an open
        // breaker forgotten while open would be reported open for the life of the process.
        let origins = moka::sync::Cache::builder()
            .max_capacity(settings.capacity)
            .time_to_idle(settings.idle)
            .eviction_listener(|origin: Arc<Arc<str>>, _, _| {
                metrics::forget_breaker(metrics::BreakerKind::Host, &origin);
            })
            .build();
        let accounts = moka::sync::Cache::builder()
            .max_capacity(settings.capacity)
            .time_to_idle(settings.idle)
            .build();
        Breakers {
            provider: Arc::new(Breaker::new(
                Kind::Provider,
                Scope::Shared,
                provider,
                None,
                &settings,
            )),
            provider_recent: Arc::default(),
            origins,
            accounts,
            settings: Arc::new(settings),
        }
    }

    fn origin_entry(&self, origin: &Arc<str>) -> Arc<OriginEntry> {
        self.origins.get_with(origin.clone(), || {
            Arc::new(OriginEntry {
                breaker: Arc::new(Breaker::new(
                    Kind::Host,
                    Scope::Shared,
                    origin,
                    None,
                    &self.settings,
                )),
                recent: Mutex::default(),
            })
        })
    }

    fn account_breaker(&self, account: Uuid, origin: &Arc<str>) -> Arc<Breaker> {
        self.accounts.get_with((account, origin.clone()), || {
            Arc::new(Breaker::new(
                Kind::Host,
                Scope::Account,
                origin,
                Some(account),
                &self.settings,
            ))
        })
    }

    /// Notes an egress failure; whether the provider breaker counts it: only while recent
    /// egress failures span enough distinct origins and accounts.
    fn provider_counts(&self, origin: &Arc<str>, account: Uuid) -> bool {
        let s = &self.settings;
        let now = Instant::now();
        let mut recent = lock(&self.provider_recent);
        while recent
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > s.window)
            || recent.len() >= PROVIDER_RECENT
        {
            recent.pop_front();
        }
        recent.push_back((now, origin.clone(), account));
        let origins: HashSet<&str> = recent.iter().map(|(_, o, _)| &**o).collect();
        let accounts: HashSet<Uuid> = recent.iter().map(|(_, _, a)| *a).collect();
        origins.len() >= s.provider_min_origins.max(1) as usize
            && accounts.len() >= s.min_accounts.max(1) as usize
    }

    /// What a finished fetch says about the site, given the time the job gave it.
    /// Timeouts count only with `budget` at least the floor; a DNS failure counts against the
    /// origin but is not an egress failure; TLS failures, redirect loops and HTTP answers
    /// other than 5xx/429/408 are answers (healthy); our own refusals say nothing.
    pub fn signal(&self, result: &Result<Fetched, FetchError>, budget: Duration) -> Signal {
        match result {
            Ok(_) => match classify(result) {
                Outcome::Failed {
                    counts_as_breaker_failure: true,
                    ..
                } => Signal::SiteFailure { egress: false },
                _ => Signal::Healthy,
            },
            Err(FetchError::Timeout(_)) if budget >= self.settings.timeout_floor => {
                Signal::SiteFailure { egress: true }
            }
            Err(FetchError::Timeout(_)) => Signal::Unknown,
            Err(FetchError::Connect(_) | FetchError::Network(_)) => {
                Signal::SiteFailure { egress: true }
            }
            Err(FetchError::Dns(_)) => Signal::SiteFailure { egress: false },
            Err(FetchError::NotAllowed(_) | FetchError::InvalidUrl(_)) => Signal::Unknown,
            Err(FetchError::Tls(_) | FetchError::TooManyRedirects { .. }) => Signal::Healthy,
        }
    }

    fn refused(&self, b: &Breaker) -> Refused {
        metrics::breaker_rejected(metric_kind(b.kind));
        Refused {
            kind: b.kind,
            scope: b.scope,
            name: b.name.to_string(),
            retry_after: self.settings.open_for,
        }
    }

    /// Permission for `account`'s job to call `origin` (see [`origin_of`]) through the
    /// provider.
    pub fn acquire(&self, account: Uuid, origin: &str) -> Result<Tickets, Refused> {
        let origin: Arc<str> = Arc::from(origin);
        let provider = self
            .provider
            .acquire()
            .ok_or_else(|| self.refused(&self.provider))?;
        let shared = match self.origins.get(&origin) {
            Some(e) => Some(
                e.breaker
                    .acquire()
                    .ok_or_else(|| self.refused(&e.breaker))?,
            ),
            None => None,
        };
        let own = match self.accounts.get(&(account, origin.clone())) {
            Some(b) => Some(b.acquire().ok_or_else(|| self.refused(&b))?),
            None => None,
        };
        Ok(Tickets {
            breakers: self.clone(),
            account,
            origin,
            _provider: provider,
            _origin: shared,
            _account: own,
        })
    }

    /// The fast check a route makes before creating a job: refuses while a breaker that
    /// applies to `account`'s job to `origin` is open.
    pub fn check(&self, account: Uuid, origin: &str) -> Result<(), Refused> {
        if !self.provider.would_permit() {
            return Err(self.refused(&self.provider));
        }
        let origin: Arc<str> = Arc::from(origin);
        if let Some(e) = self.origins.get(&origin) {
            if !e.breaker.would_permit() {
                return Err(self.refused(&e.breaker));
            }
        }
        if let Some(b) = self.accounts.get(&(account, origin)) {
            if !b.would_permit() {
                return Err(self.refused(&b));
            }
        }
        Ok(())
    }

    /// The provider, then every origin breaker that is not closed, then every account
    /// breaker that is not closed (closed ones are the uninteresting majority), each by
    /// name and at most [`SNAPSHOT_MAX`] per scope.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        self.origins.run_pending_tasks();
        self.accounts.run_pending_tasks();
        let mut out = vec![self.provider.snapshot()];
        let mut shared: Vec<Snapshot> = self
            .origins
            .iter()
            .filter(|(_, e)| e.breaker.state() != State::Closed)
            .map(|(_, e)| e.breaker.snapshot())
            .collect();
        shared.sort_by(|a, b| a.name.cmp(&b.name));
        shared.truncate(SNAPSHOT_MAX);
        let mut own: Vec<Snapshot> = self
            .accounts
            .iter()
            .filter(|(_, b)| b.state() != State::Closed)
            .map(|(_, b)| b.snapshot())
            .collect();
        own.sort_by(|a, b| (&a.name, a.account_id).cmp(&(&b.name, b.account_id)));
        own.truncate(SNAPSHOT_MAX);
        out.extend(shared);
        out.extend(own);
        out
    }

    /// Origin breakers this process holds (an origin gets one on its first failure).
    pub fn tracked_origins(&self) -> u64 {
        self.origins.run_pending_tasks();
        self.origins.entry_count()
    }

    /// Account breakers this process holds.
    pub fn tracked_account_breakers(&self) -> u64 {
        self.accounts.run_pending_tasks();
        self.accounts.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: Signal = Signal::SiteFailure { egress: true };

    fn quick(min_accounts: u32) -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            open_for: Duration::from_secs(1),
            max_open: Duration::from_secs(2),
            min_accounts,
            ..BreakerSettings::default()
        }
    }

    fn fail(b: &Breakers, account: Uuid, origin: &str, n: usize) {
        for _ in 0..n {
            b.acquire(account, origin).expect("closed").record(FAIL);
        }
    }

    fn shared_state(b: &Breakers, origin: &str) -> Option<State> {
        b.origins
            .get(&Arc::<str>::from(origin))
            .map(|e| e.breaker.state())
    }

    #[test]
    fn opens_after_consecutive_failures_and_refuses_fast() {
        let b = Breakers::new("direct", quick(1));
        let a = Uuid::new_v4();
        fail(&b, a, "http://a.example", 3);
        let refused = b.acquire(a, "http://a.example").err().expect("open");
        assert_eq!(refused.kind, Kind::Host);
        assert!(b.check(Uuid::new_v4(), "http://a.example").is_err());
        // Another origin, even on the same host, is unaffected.
        assert!(b.check(a, "http://a.example:8080").is_ok());
        assert!(b.check(a, "http://b.example").is_ok());
        let snap = b.snapshot();
        assert!(snap.iter().any(|s| s.name == "http://a.example"
            && s.scope == Scope::Shared
            && s.state == State::Open));
    }

    #[test]
    fn one_accounts_failures_open_only_its_own_breaker() {
        let b = Breakers::new("direct", quick(3));
        let (a, other) = (Uuid::new_v4(), Uuid::new_v4());
        fail(&b, a, "http://a.example", 3);
        let refused = b.check(a, "http://a.example").expect_err("a's own breaker");
        assert_eq!(refused.scope, Scope::Account);
        assert!(b.check(other, "http://a.example").is_ok());
        assert_eq!(shared_state(&b, "http://a.example"), Some(State::Closed));
    }

    #[test]
    fn failures_from_enough_accounts_open_the_shared_breaker_at_once() {
        let b = Breakers::new("direct", quick(3));
        for _ in 0..3 {
            fail(&b, Uuid::new_v4(), "http://down.example", 1);
        }
        assert_eq!(shared_state(&b, "http://down.example"), Some(State::Open));
        let refused = b
            .check(Uuid::new_v4(), "http://down.example")
            .expect_err("open for everyone");
        assert_eq!(refused.scope, Scope::Shared);
    }

    #[test]
    fn a_burst_from_one_account_weighs_as_one_failure() {
        let b = Breakers::new("direct", quick(2));
        fail(&b, Uuid::new_v4(), "http://x.example", 1);
        fail(&b, Uuid::new_v4(), "http://x.example", 1);
        // Two accounts, one failure each: counted as two, under the three needed.
        assert_eq!(shared_state(&b, "http://x.example"), Some(State::Closed));
        let b = Breakers::new("direct", quick(2));
        let attacker = Uuid::new_v4();
        fail(&b, attacker, "http://y.example", 2);
        // Before another account's failure the attacker's two were not counted; with it,
        // they count as one (plus the other account's one): still closed.
        fail(&b, Uuid::new_v4(), "http://y.example", 1);
        assert_eq!(shared_state(&b, "http://y.example"), Some(State::Closed));
    }

    #[test]
    fn one_probe_at_a_time_then_closes_on_success() {
        let b = Breakers::new("direct", quick(1));
        let a = Uuid::new_v4();
        fail(&b, a, "http://a.example", 3);
        std::thread::sleep(Duration::from_millis(1100));
        let probe = b.acquire(a, "http://a.example").expect("half-open probe");
        assert!(
            b.acquire(a, "http://a.example").is_err(),
            "a second caller waits for the probe"
        );
        probe.record(Signal::Healthy);
        assert!(b.acquire(a, "http://a.example").is_ok(), "closed again");
        assert_eq!(shared_state(&b, "http://a.example"), Some(State::Closed));
    }

    #[test]
    fn a_failed_probe_reopens_and_a_dropped_one_frees_the_slot() {
        let b = Breakers::new("direct", quick(1));
        let a = Uuid::new_v4();
        fail(&b, a, "http://a.example", 3);
        std::thread::sleep(Duration::from_millis(1100));
        drop(b.acquire(a, "http://a.example").expect("probe"));
        let probe = b
            .acquire(a, "http://a.example")
            .expect("slot freed by the drop");
        probe.record(FAIL);
        assert_eq!(shared_state(&b, "http://a.example"), Some(State::Open));
        assert!(b.acquire(a, "http://a.example").is_err());
    }

    #[test]
    fn non_failures_keep_it_closed() {
        let b = Breakers::new("direct", quick(1));
        let a = Uuid::new_v4();
        for _ in 0..10 {
            fail(&b, a, "http://a.example", 1);
            b.acquire(a, "http://a.example")
                .expect("closed")
                .record(Signal::Healthy);
        }
        assert_eq!(shared_state(&b, "http://a.example"), Some(State::Closed));
    }

    #[test]
    fn short_timeouts_and_our_refusals_say_nothing_about_the_site() {
        let b = Breakers::new("direct", BreakerSettings::default());
        let timeout = Err(FetchError::Timeout("late".into()));
        assert_eq!(
            b.signal(&timeout, Duration::from_millis(100)),
            Signal::Unknown
        );
        assert_eq!(b.signal(&timeout, Duration::from_secs(5)), FAIL);
        assert_eq!(
            b.signal(&Err(FetchError::Dns("no such host".into())), Duration::ZERO),
            Signal::SiteFailure { egress: false }
        );
        let refusal = Err(FetchError::NotAllowed(
            super::super::ssrf::check_ip("10.0.0.1".parse().expect("ip")).expect_err("private"),
        ));
        assert_eq!(b.signal(&refusal, Duration::from_secs(30)), Signal::Unknown);
        // Unknown outcomes never open anything, however many.
        let s = Breakers::new("direct", quick(1));
        for _ in 0..20 {
            s.acquire(Uuid::new_v4(), "http://a.example")
                .expect("closed")
                .record(Signal::Unknown);
        }
        assert!(s.check(Uuid::new_v4(), "http://a.example").is_ok());
        assert_eq!(
            s.tracked_origins(),
            0,
            "nothing is kept for an origin that never failed"
        );
    }

    fn provider_settings(min_accounts: u32) -> BreakerSettings {
        BreakerSettings {
            min_requests: 2, // the provider needs 10 within the window
            provider_min_origins: 3,
            ..quick(min_accounts)
        }
    }

    /// A provider breaker past its first (1 s) window: failsafe's rate policy judges only then,
    /// so a closed provider below means "not counted", not "too early".
    fn provider(min_accounts: u32) -> Breakers {
        let b = Breakers::new(
            "direct",
            BreakerSettings {
                window: Duration::from_secs(1),
                ..provider_settings(min_accounts)
            },
        );
        std::thread::sleep(Duration::from_millis(1100));
        b
    }

    /// Takes every permission first, then records the outcomes: what opens meanwhile does
    /// not stop the rest from being recorded.
    fn outcomes(b: &Breakers, calls: &[(Uuid, String, Signal)]) {
        let tickets: Vec<(Tickets, Signal)> = calls
            .iter()
            .map(|(a, o, s)| (b.acquire(*a, o).expect("closed"), *s))
            .collect();
        for (t, s) in tickets {
            t.record(s);
        }
    }

    #[test]
    fn the_provider_counts_only_egress_failures_across_origins_and_accounts() {
        let port = |n: usize| format!("http://127.0.0.1:{}", 1000 + n);
        // One account's failures across many origins (dead ports): never the provider.
        let b = provider(2);
        let a = Uuid::new_v4();
        outcomes(&b, &(0..30).map(|n| (a, port(n), FAIL)).collect::<Vec<_>>());
        assert_eq!(b.provider.state(), State::Closed);
        // Many accounts failing on one origin: that origin's breaker, not the provider.
        let b = provider(2);
        let one: Vec<_> = (0..30)
            .map(|_| (Uuid::new_v4(), "http://one.example".to_owned(), FAIL))
            .collect();
        outcomes(&b, &one);
        assert_eq!(b.provider.state(), State::Closed);
        assert_eq!(shared_state(&b, "http://one.example"), Some(State::Open));
        // Failures that are not the egress path's (DNS, HTTP answers), however spread.
        let b = provider(2);
        let dns = Signal::SiteFailure { egress: false };
        outcomes(
            &b,
            &(0..30)
                .map(|n| (Uuid::new_v4(), port(n), dns))
                .collect::<Vec<_>>(),
        );
        assert_eq!(b.provider.state(), State::Closed);
        // Egress failing for many accounts and origins: the provider opens (failsafe's rate
        // policy judges only once its first window has passed).
        let b = provider(2);
        outcomes(
            &b,
            &(0..30)
                .map(|n| (Uuid::new_v4(), port(n), FAIL))
                .collect::<Vec<_>>(),
        );
        assert_eq!(b.provider.state(), State::Open);
    }

    fn host_series(origin: &str) -> Option<i64> {
        metrics::host_breaker_series(origin)
    }

    #[test]
    fn an_evicted_origin_breaker_takes_its_metric_series_with_it() {
        let settings = BreakerSettings {
            idle: Duration::from_millis(300),
            ..quick(1)
        };
        let b = Breakers::new("direct", settings);
        let origin = format!("http://evicted-{}.example", Uuid::new_v4().simple());
        fail(&b, Uuid::new_v4(), &origin, 3);
        assert_eq!(host_series(&origin), Some(2), "open while it is held");
        std::thread::sleep(Duration::from_millis(600));
        b.origins.run_pending_tasks();
        assert_eq!(b.tracked_origins(), 0);
        assert_eq!(host_series(&origin), None, "forgotten with its breaker");
    }
}
