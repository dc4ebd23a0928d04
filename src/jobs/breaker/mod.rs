//! Circuit breakers (failsafe): one for the egress provider (the direct path or the proxy),
//! one per target **origin** (scheme, host, port) shared by every account, and one per
//! (account, origin). A job runs only when all of them let it through; while one is open the
//! job is refused at once (nothing charged) instead of waiting
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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use url::Url;
use uuid::Uuid;

use super::fetch::{classify, FetchError, Fetched, Outcome};
use crate::metrics;

mod circuit;

pub use circuit::Breaker;
use circuit::{metric_kind, Ticket};

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
mod tests;
