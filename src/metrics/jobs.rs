//! The scrape-job and circuit-breaker metrics: the families exist (and are exposed) now; the
//! job code calls these functions as it moves jobs and breakers between states.
//!
//! Every label value here must come from a small fixed set (job states and outcomes are the
//! code's own constants, provider names come from configuration). Origins are the exception
//! the breaker gauge handles itself: customers choose them, so an origin's series exists only
//! while its shared breaker is not closed (removed when it closes or is evicted), and at most
//! [`MAX_HOST_SERIES`] of them at once, whatever origins customers send.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::families;

/// Handle to the job metrics; `metrics::jobs().transition("queued")`.
#[derive(Debug, Clone, Copy)]
pub struct Jobs;

/// The job metrics. Cheap to call from anywhere: no handle to pass around.
pub fn jobs() -> Jobs {
    Jobs
}

impl Jobs {
    /// A job entered `state` (`queued`, `running`, `succeeded`, `failed`, `cancelled`, or a
    /// retry going back to `queued`): `keymeter_job_transitions_total{state}`. Call it where
    /// the transition commits, once per job and state change.
    pub fn transition(&self, state: &str) {
        if let Some(c) = families().and_then(|f| {
            f.job_transitions
                .get_metric_with_label_values(&[state])
                .ok()
        }) {
            c.inc();
        }
    }

    /// A job finished with `outcome` (e.g. `succeeded`, `failed`, `timeout`, `blocked`,
    /// `breaker_open`, `cancelled`) after running `elapsed` (claim to finish):
    /// `keymeter_job_duration_seconds{outcome}`.
    pub fn finished(&self, outcome: &str, elapsed: Duration) {
        if let Some(h) =
            families().and_then(|f| f.job_duration.get_metric_with_label_values(&[outcome]).ok())
        {
            h.observe(elapsed.as_secs_f64());
        }
    }

    /// Jobs queued and not yet claimed: `keymeter_jobs_queue_depth`. Meant to be set from a
    /// [`super::Metrics::on_scrape`] hook counting the queue, so it is fresh at each scrape.
    pub fn set_queue_depth(&self, depth: i64) {
        if let Some(f) = families() {
            f.queue_depth.set(depth);
        }
    }

    /// How many jobs are in `state` now: `keymeter_jobs{state}`, e.g. from
    /// `SELECT status, count(*) FROM jobs GROUP BY status` in an `on_scrape` hook. A state
    /// missing from that query's answer should be set to 0, or it keeps its last value.
    pub fn set_in_state(&self, state: &str, count: i64) {
        if let Some(g) =
            families().and_then(|f| f.jobs_in_state.get_metric_with_label_values(&[state]).ok())
        {
            g.set(count);
        }
    }
}

/// Which breaker: the egress provider's (direct path or proxy) or a target origin's. An
/// account-scoped origin breaker counts its rejections as `host` and has no state series
/// (its label would carry an account id, and there may be one per account and origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerKind {
    Provider,
    Host,
}

impl BreakerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerKind::Provider => "provider",
            BreakerKind::Host => "host",
        }
    }
}

/// Origin (host) state series exported at most at once, per process. Beyond it a breaker
/// still works and `GET /admin/breakers` lists it; only its series is left out.
pub const MAX_HOST_SERIES: usize = 100;

/// The origins that have a state series now: what bounds them, and what a close or an
/// eviction removes. A short critical section, never held across an await.
static HOST_SERIES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A breaker's state; the gauge's value is the discriminant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// Records that breaker `kind`/`name` is now in `state`:
/// `keymeter_breaker_state{kind, name}` = 0 closed, 1 half-open, 2 open. Call it from the
/// breaker's state-change hook (or set every breaker from an `on_scrape` hook).
///
/// A closed **host** breaker's series is removed instead of set to 0: origins are chosen by
/// customers, and keeping a series per origin ever fetched would grow without bound. An
/// absent host series therefore means closed (or beyond [`MAX_HOST_SERIES`]). Provider
/// breakers are few and always present.
pub fn set_breaker_state(kind: BreakerKind, name: &str, state: BreakerState) {
    let Some(f) = families() else { return };
    let labels = [kind.as_str(), name];
    match kind {
        BreakerKind::Provider => {}
        BreakerKind::Host => {
            let mut exported = HOST_SERIES.lock().unwrap_or_else(PoisonError::into_inner);
            if state == BreakerState::Closed {
                exported.remove(name);
                let _ = f.breaker_state.remove_label_values(&labels);
                return;
            }
            if !exported.contains(name) {
                if exported.len() >= MAX_HOST_SERIES {
                    return;
                }
                exported.insert(name.to_owned());
            }
            // Set under the lock, so a concurrent close cannot leave a series behind.
            if let Ok(g) = f.breaker_state.get_metric_with_label_values(&labels) {
                g.set(state as i64);
            }
            return;
        }
    }
    if let Ok(g) = f.breaker_state.get_metric_with_label_values(&labels) {
        g.set(state as i64);
    }
}

/// Drops a breaker's series, e.g. when the breaker itself is evicted from its registry.
pub fn forget_breaker(kind: BreakerKind, name: &str) {
    let Some(f) = families() else { return };
    if kind == BreakerKind::Host {
        let mut exported = HOST_SERIES.lock().unwrap_or_else(PoisonError::into_inner);
        exported.remove(name);
        let _ = f.breaker_state.remove_label_values(&[kind.as_str(), name]);
        return;
    }
    let _ = f.breaker_state.remove_label_values(&[kind.as_str(), name]);
}

/// The value of a host breaker's state series, if it has one (for tests).
#[cfg(test)]
pub(crate) fn host_breaker_series(name: &str) -> Option<i64> {
    let f = families()?;
    let exported = HOST_SERIES.lock().unwrap_or_else(PoisonError::into_inner);
    exported.contains(name).then(|| {
        f.breaker_state
            .get_metric_with_label_values(&["host", name])
            .map(|g| g.get())
            .unwrap_or_default()
    })
}

/// A job was refused because a breaker of `kind` was open (or its half-open probe slot was
/// taken): `keymeter_breaker_rejections_total{kind}`. By kind only — per origin it would be
/// unbounded; `keymeter_breaker_state` says which shared breakers are open.
pub fn breaker_rejected(kind: BreakerKind) {
    if let Some(c) = families().and_then(|f| {
        f.breaker_rejections
            .get_metric_with_label_values(&[kind.as_str()])
            .ok()
    }) {
        c.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_host_breaker_leaves_no_series() {
        let f = families().unwrap();
        let name = "closed-test.example:443";
        set_breaker_state(BreakerKind::Host, name, BreakerState::Open);
        assert_eq!(
            f.breaker_state
                .get_metric_with_label_values(&["host", name])
                .unwrap()
                .get(),
            2
        );
        set_breaker_state(BreakerKind::Host, name, BreakerState::Closed);
        assert!(f
            .breaker_state
            .remove_label_values(&["host", name])
            .is_err());
        set_breaker_state(BreakerKind::Provider, "direct", BreakerState::Closed);
        assert_eq!(
            f.breaker_state
                .get_metric_with_label_values(&["provider", "direct"])
                .unwrap()
                .get(),
            0
        );
    }

    #[test]
    fn job_metrics_record() {
        let f = families().unwrap();
        jobs().transition("queued");
        jobs().finished("succeeded", Duration::from_millis(300));
        jobs().set_queue_depth(3);
        jobs().set_in_state("running", 2);
        breaker_rejected(BreakerKind::Provider);
        assert!(
            f.job_transitions
                .get_metric_with_label_values(&["queued"])
                .unwrap()
                .get()
                >= 1
        );
        assert!(
            f.job_duration
                .get_metric_with_label_values(&["succeeded"])
                .unwrap()
                .get_sample_count()
                >= 1
        );
        assert_eq!(
            f.jobs_in_state
                .get_metric_with_label_values(&["running"])
                .unwrap()
                .get(),
            2
        );
    }
}
