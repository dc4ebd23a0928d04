//! One circuit breaker: failsafe's state machine with its policy, the instrument that makes
//! its state readable, and the single half-open probe failsafe does not enforce itself.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failsafe::backoff::{self, Exponential};
use failsafe::failure_policy::{
    self, ConsecutiveFailures, FailurePolicy, OrElse, SuccessRateOverTimeWindow,
};
use failsafe::{Instrument, StateMachine};
use uuid::Uuid;

use super::{BreakerSettings, Kind, Scope, Snapshot, State};
use crate::metrics;

/// Writes state changes where they can be read, and says so in the log.
pub(super) struct Watch {
    pub(super) kind: Kind,
    pub(super) scope: Scope,
    pub(super) name: Arc<str>,
    pub(super) state: Arc<AtomicU8>,
}

pub(super) fn metric_kind(kind: Kind) -> metrics::BreakerKind {
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
pub(super) enum Policy {
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
    pub(super) kind: Kind,
    pub(super) scope: Scope,
    pub(super) name: Arc<str>,
    /// Set for an account's breaker.
    pub(super) account: Option<Uuid>,
    pub(super) machine: StateMachine<Policy, Watch>,
    pub(super) state: Arc<AtomicU8>,
    /// A half-open probe is out.
    pub(super) probing: AtomicBool,
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
    pub(super) fn new(
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
    pub(super) fn acquire(self: &Arc<Self>) -> Option<Ticket> {
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
    pub(super) fn would_permit(&self) -> bool {
        self.machine.is_call_permitted()
            && !(self.state() == State::HalfOpen && self.probing.load(Ordering::Acquire))
    }

    pub(super) fn snapshot(&self) -> Snapshot {
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
pub(super) struct Ticket {
    pub(super) breaker: Arc<Breaker>,
    pub(super) probe: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}
