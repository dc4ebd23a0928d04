//! The fault schedule: a pure function of the seed and the run's length, so `SEED=… ` replays
//! exactly the same faults at the same offsets (the workload around them is concurrent and
//! not replayed to the request; the faults are).
//!
//! The generator is rand 0.8's `StdRng` (ChaCha12), seeded with `seed_from_u64`: the crate is
//! already a dependency and pinned by Cargo.lock, so a seed means the same draws on every
//! machine that builds this lockfile.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// What a fault does. Targets are instance indexes (0, 1, 2).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL the instance; start it again after `down_ms`.
    KillInstance { instance: usize, down_ms: u64 },
    /// SIGSTOP the instance for `stall_ms`, then SIGCONT: a stalled process whose job leases
    /// expire while it holds them, and whose database sessions and locks stay open.
    StopInstance { instance: usize, stall_ms: u64 },
    /// Stop PostgreSQL (`fast`: clean shutdown; `immediate`: a crash, recovery at start) and
    /// start it again after `down_ms`.
    RestartPostgres { immediate: bool, down_ms: u64 },
    /// SIGKILL redis-server and start a fresh one (empty: the rate-limit state is lost).
    RestartRedis { down_ms: u64 },
    /// Every upstream page answers `delay_ms` later, for `for_ms`.
    SlowUpstream { delay_ms: u64, for_ms: u64 },
}

impl Fault {
    /// The thing it disturbs: two faults on one target never overlap.
    fn target(&self) -> &'static str {
        match self {
            Fault::KillInstance { instance, .. } | Fault::StopInstance { instance, .. } => {
                ["instance-0", "instance-1", "instance-2"][(*instance).min(2)]
            }
            Fault::RestartPostgres { .. } => "postgres",
            Fault::RestartRedis { .. } => "redis",
            Fault::SlowUpstream { .. } => "upstream",
        }
    }

    /// How long the target stays disturbed (restart time not included).
    fn length_ms(&self) -> u64 {
        match self {
            Fault::KillInstance { down_ms, .. } => *down_ms,
            Fault::StopInstance { stall_ms, .. } => *stall_ms,
            Fault::RestartPostgres { down_ms, .. } => *down_ms,
            Fault::RestartRedis { down_ms } => *down_ms,
            Fault::SlowUpstream { for_ms, .. } => *for_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scheduled {
    /// Milliseconds after the workload starts.
    pub at_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

/// The schedule for a run of `duration_ms`: faults start from 3 s in until 8 s before the
/// end, about one every `mean_gap_ms`, overlapping across targets (several things fail at
/// once) but never on one target, and never more than two instances down or stalled at once
/// (a client always has an instance to go to, as behind a load balancer).
pub fn draw(seed: u64, duration_ms: u64, instances: usize) -> Vec<Scheduled> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mean_gap_ms = 4_000u64;
    let mut out = Vec::new();
    // (target, busy until) — a target is busy from the fault's start until it has recovered,
    // with a margin for the restart itself.
    let mut busy: Vec<(&'static str, u64, bool)> = Vec::new();
    let mut deck: Vec<u8> = Vec::new();
    let mut t = 3_000u64;
    let end = duration_ms.saturating_sub(8_000);
    while t < end {
        // Kinds come from a shuffled deck of all five, refilled when empty: every stretch of
        // five faults has one of each, so even a short run sees every kind.
        if deck.is_empty() {
            deck = vec![0u8, 1, 2, 3, 4];
            deck.shuffle(&mut rng);
        }
        let kind = deck[deck.len() - 1];
        let fault = match kind {
            0 => Fault::KillInstance {
                instance: rng.gen_range(0..instances),
                down_ms: rng.gen_range(500..4_000),
            },
            1 => Fault::StopInstance {
                instance: rng.gen_range(0..instances),
                // The job lease is 4 s in this run: most stalls outlive it.
                stall_ms: rng.gen_range(1_500..9_000),
            },
            2 => Fault::RestartPostgres {
                immediate: rng.gen_bool(0.5),
                down_ms: rng.gen_range(500..4_000),
            },
            3 => Fault::RestartRedis {
                down_ms: rng.gen_range(300..3_000),
            },
            _ => Fault::SlowUpstream {
                delay_ms: rng.gen_range(300..2_500),
                for_ms: rng.gen_range(2_000..8_000),
            },
        };
        let target = fault.target();
        busy.retain(|(_, until, _)| *until > t);
        let instance_fault = target.starts_with("instance");
        let instances_busy = busy.iter().filter(|(_, _, i)| *i).count();
        let clash = busy.iter().any(|(b, _, _)| *b == target)
            || (instance_fault && instances_busy >= instances.saturating_sub(1));
        if !clash {
            // Restarting a keymeter (debug build, migrations checked) or PostgreSQL takes a
            // few seconds of its own.
            let margin = if target == "upstream" { 500 } else { 6_000 };
            busy.push((target, t + fault.length_ms() + margin, instance_fault));
            out.push(Scheduled { at_ms: t, fault });
            deck.pop();
        }
        // Exponential-ish gaps: mostly short, sometimes long, so faults pile up at times.
        let u: f64 = rng.gen_range(0.05..1.0);
        t += ((-u.ln()) * mean_gap_ms as f64) as u64 + 200;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = serde_json::to_string(&draw(42, 60_000, 3)).unwrap();
        let b = serde_json::to_string(&draw(42, 60_000, 3)).unwrap();
        let c = serde_json::to_string(&draw(43, 60_000, 3)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
