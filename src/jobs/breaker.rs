//! Circuit breakers (failsafe): one for the egress provider (the direct path or the proxy),
//! one per target host. A job runs only when both let it through; while either is open the
//! job is refused at once (503 `upstream_unavailable`, nothing charged) instead of waiting
//! for a dead upstream's timeout.
//!
//! What failsafe leaves to us (see STYLE.md):
//! - **Half-open lets every caller through.** We let exactly one probe through at a time:
//!   the others are refused as if the breaker were still open until the probe's outcome
//!   closes or re-opens it.
//! - **State is only visible through `Instrument`.** Each breaker's instrument writes its
//!   state to an atomic the admin route and the metrics read.
//! - **No timeouts of its own.** The fetch has its own deadline, and a timeout is recorded as
//!   a failure like any other (see [`super::fetch::classify`]).
//!
//! The host breaker opens on a run of consecutive failures or a poor success rate over a
//! window; the provider breaker only on the success rate over a window with a higher minimum
//! of requests, so one dead site cannot shut the egress path for everyone.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failsafe::backoff::{self, Exponential};
use failsafe::failure_policy::{
    self, ConsecutiveFailures, FailurePolicy, OrElse, SuccessRateOverTimeWindow,
};
use failsafe::{Instrument, StateMachine};
use serde::Serialize;

use crate::metrics;

/// Tuning, from configuration (`KEYMETER_BREAKER_*`).
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Consecutive failures that open a host's breaker.
    pub consecutive_failures: u32,
    /// First open period; it doubles on every failed probe up to `max_open`.
    pub open_for: Duration,
    pub max_open: Duration,
    /// The success rate under which a breaker opens, over `window`.
    pub required_success_rate: f64,
    pub window: Duration,
    /// Requests within `window` before the rate counts (host; the provider needs 5×).
    pub min_requests: u32,
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

/// Writes state changes where they can be read, and says so in the log.
struct Watch {
    kind: Kind,
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
        metrics::set_breaker_state(
            metric_kind(self.kind),
            &self.name,
            match state {
                State::Closed => metrics::BreakerState::Closed,
                State::HalfOpen => metrics::BreakerState::HalfOpen,
                State::Open => metrics::BreakerState::Open,
            },
        );
        let before = State::from_u8(self.state.swap(state as u8, Ordering::AcqRel));
        if before != state {
            tracing::info!(
                breaker = self.kind.as_str(),
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
    name: Arc<str>,
    machine: StateMachine<Policy, Watch>,
    state: Arc<AtomicU8>,
    /// A half-open probe is out.
    probing: AtomicBool,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    fn new(kind: Kind, name: &str, s: &BreakerSettings) -> Breaker {
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
            name: name.clone(),
            state: state.clone(),
        };
        Breaker {
            kind,
            name,
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
            recorded: false,
        })
    }

    /// Whether a call would be let through now, without taking a probe.
    fn would_permit(&self) -> bool {
        self.machine.is_call_permitted()
            && !(self.state() == State::HalfOpen && self.probing.load(Ordering::Acquire))
    }
}

/// One call's permission. Record its outcome; dropped unrecorded (the job was cancelled or
/// lost its lease), it frees a probe slot without saying anything about the upstream.
pub struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    recorded: bool,
}

impl Ticket {
    pub fn record(mut self, upstream_failed: bool) {
        if upstream_failed {
            self.breaker.machine.on_error();
        } else {
            self.breaker.machine.on_success();
        }
        self.recorded = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
        let _ = self.recorded;
    }
}

/// Both tickets a job needs.
pub struct Tickets {
    provider: Ticket,
    host: Ticket,
}

impl Tickets {
    pub fn record(self, upstream_failed: bool) {
        self.provider.record(upstream_failed);
        self.host.record(upstream_failed);
    }
}

/// Which breaker refused.
#[derive(Debug, Clone)]
pub struct Refused {
    pub kind: Kind,
    pub name: String,
    /// A hint for `Retry-After`: the first open period.
    pub retry_after: Duration,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Provider => write!(
                f,
                "The egress provider {} is failing; jobs are paused for it. Retry shortly.",
                self.name
            ),
            Kind::Host => write!(
                f,
                "{} has been failing (errors or timeouts); requests to it are paused. Retry shortly.",
                self.name
            ),
        }
    }
}

/// A breaker's state for operators (`GET /admin/breakers`, metrics).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub kind: Kind,
    pub name: String,
    pub state: State,
}

/// Every breaker of the process. Host breakers live in a bounded cache that forgets hosts
/// unused for an hour, so a crawl of a million sites cannot grow it without bound.
#[derive(Clone)]
pub struct Breakers {
    settings: BreakerSettings,
    provider: Arc<Breaker>,
    hosts: moka::sync::Cache<String, Arc<Breaker>>,
}

impl fmt::Debug for Breakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breakers")
            .field("provider", &self.provider)
            .field("hosts", &self.hosts.entry_count())
            .finish()
    }
}

impl Breakers {
    pub fn new(provider: &str, settings: BreakerSettings) -> Breakers {
        Breakers {
            provider: Arc::new(Breaker::new(Kind::Provider, provider, &settings)),
            hosts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            settings,
        }
    }

    fn host(&self, host: &str) -> Arc<Breaker> {
        let key = host.to_ascii_lowercase();
        self.hosts.get_with(key.clone(), || {
            Arc::new(Breaker::new(Kind::Host, &key, &self.settings))
        })
    }

    fn refused(&self, b: &Breaker) -> Refused {
        metrics::breaker_rejected(metric_kind(b.kind));
        Refused {
            kind: b.kind,
            name: b.name.to_string(),
            retry_after: self.settings.open_for,
        }
    }

    /// Permission to call `host` through the provider.
    pub fn acquire(&self, host: &str) -> Result<Tickets, Refused> {
        let provider = self
            .provider
            .acquire()
            .ok_or_else(|| self.refused(&self.provider))?;
        let hb = self.host(host);
        let host = hb.acquire().ok_or_else(|| self.refused(&hb))?;
        Ok(Tickets { provider, host })
    }

    /// The fast check a route makes before creating a job: refuses while a breaker is open.
    pub fn check(&self, host: &str) -> Result<(), Refused> {
        if !self.provider.would_permit() {
            return Err(self.refused(&self.provider));
        }
        let hb = self.host(host);
        if !hb.would_permit() {
            return Err(self.refused(&hb));
        }
        Ok(())
    }

    /// The provider and every host breaker that is not closed (closed hosts are the
    /// uninteresting majority).
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let mut out = vec![Snapshot {
            kind: Kind::Provider,
            name: self.provider.name.to_string(),
            state: self.provider.state(),
        }];
        let mut hosts: Vec<Snapshot> = self
            .hosts
            .iter()
            .filter(|(_, b)| b.state() != State::Closed)
            .map(|(_, b)| Snapshot {
                kind: Kind::Host,
                name: b.name.to_string(),
                state: b.state(),
            })
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(hosts);
        out
    }

    pub fn tracked_hosts(&self) -> u64 {
        self.hosts.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            open_for: Duration::from_secs(1),
            max_open: Duration::from_secs(2),
            ..BreakerSettings::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_refuses_fast() {
        let b = Breakers::new("direct", quick());
        for _ in 0..3 {
            b.acquire("a.example").expect("closed").record(true);
        }
        let refused = b.acquire("a.example").err().expect("open");
        assert_eq!(refused.kind, Kind::Host);
        assert!(b.check("a.example").is_err());
        // Another host is unaffected.
        assert!(b.check("b.example").is_ok());
        let snap = b.snapshot();
        assert!(snap
            .iter()
            .any(|s| s.name == "a.example" && s.state == State::Open));
    }

    #[test]
    fn one_probe_at_a_time_then_closes_on_success() {
        let b = Breakers::new("direct", quick());
        for _ in 0..3 {
            b.acquire("a.example").expect("closed").record(true);
        }
        std::thread::sleep(Duration::from_millis(1100));
        let probe = b.acquire("a.example").expect("half-open probe");
        assert!(
            b.acquire("a.example").is_err(),
            "a second caller waits for the probe"
        );
        probe.record(false);
        assert!(b.acquire("a.example").is_ok(), "closed again");
        assert_eq!(b.host("a.example").state(), State::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_and_a_dropped_one_frees_the_slot() {
        let b = Breakers::new("direct", quick());
        for _ in 0..3 {
            b.acquire("a.example").expect("closed").record(true);
        }
        std::thread::sleep(Duration::from_millis(1100));
        drop(b.acquire("a.example").expect("probe"));
        let probe = b.acquire("a.example").expect("slot freed by the drop");
        probe.record(true);
        assert_eq!(b.host("a.example").state(), State::Open);
        assert!(b.acquire("a.example").is_err());
    }

    #[test]
    fn non_failures_keep_it_closed() {
        let b = Breakers::new("direct", quick());
        for _ in 0..10 {
            b.acquire("a.example").expect("closed").record(true);
            b.acquire("a.example").expect("closed").record(false);
        }
        assert_eq!(b.host("a.example").state(), State::Closed);
    }
}
