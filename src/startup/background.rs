//! The background tasks that run beside the server: the LISTEN connection (key cache
//! invalidation, job wake-ups), the job workers and reaper, job webhooks, the batched
//! `last_used` writes, the purges, and the rate limiter's Redis connector and housekeeping.
//!
//! The job workers stop in two steps, apart from the rest: while requests drain they still
//! run this instance's waiting sync jobs (so those requests can answer), and only then stop
//! claiming. Everything else stops together once the jobs are settled.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AppState;
use crate::auth;
use crate::db::{self, PgConnect};

pub(super) struct Background {
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Workers take only this instance's waiting sync jobs once it is cancelled…
    drain_jobs: CancellationToken,
    /// …and no more jobs at all once this is.
    stop_jobs: CancellationToken,
    workers: JoinHandle<()>,
}

impl Background {
    /// Starts every task on the current runtime.
    pub(super) fn start(state: &AppState, pg: &PgConnect) -> Background {
        let (config, pool, jobs) = (&state.config, &state.db, &state.jobs);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut subscriptions = vec![
            auth::listener::subscription(state.auth.cache.clone()),
            jobs.wakeups.subscription(),
            state.event_sender.subscription(),
        ];
        if let Some(api) = &state.stripe {
            // Auto-recharge: crossings the charge statements NOTIFY (billing::auto_recharge).
            let recharger = crate::billing::auto_recharge::Recharger::new(
                pool.clone(),
                api.clone(),
                config.billing.clone(),
            );
            subscriptions.push(recharger.subscription());
        }
        tasks.spawn(db::listen::run(pg.clone(), subscriptions, shutdown.clone()));
        let (drain_jobs, stop_jobs) = (CancellationToken::new(), CancellationToken::new());
        let workers = tokio::spawn(jobs.clone().run_workers(
            pool.clone(),
            drain_jobs.clone(),
            stop_jobs.clone(),
            config.shutdown_job_grace,
        ));
        tasks.spawn(jobs.clone().run_reaper(pool.clone(), shutdown.clone()));
        {
            let (jobs, pool, stop) = (jobs.clone(), pool.clone(), shutdown.clone());
            tasks.spawn(async move { jobs.webhooks.run(pool, stop).await });
        }
        {
            let (events, pool, stop) = (state.event_sender.clone(), pool.clone(), shutdown.clone());
            tasks.spawn(async move { events.run(pool, stop).await });
        }
        {
            let (auth, pool, stop) = (state.auth.clone(), pool.clone(), shutdown.clone());
            tasks
                .spawn(async move { auth.last_used.run(pool, Duration::from_secs(5), stop).await });
        }
        tasks.spawn(crate::credits::grants::run_sweeper(
            pool.clone(),
            config.expiry_sweep_every,
            shutdown.clone(),
        ));
        tasks.spawn(crate::idempotency::run_purge(
            pool.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(crate::credits::gateway_charges::run_purge(
            pool.clone(),
            config.gateway_charge_retention,
            config.gateway_charge_purge_every,
            shutdown.clone(),
        ));
        tasks.spawn(crate::accounts::login::run_purge(
            pool.clone(),
            config.login_lockout,
            shutdown.clone(),
        ));
        if let Some(url) = config.redis_url.clone() {
            let (limits, stop) = (state.limits.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Some(shared) = limits.shared() {
                    shared.run_connector(url, stop).await;
                }
            });
        }
        {
            let (limits, stop) = (state.limits.clone(), shutdown.clone());
            tasks.spawn(async move { limits.run_housekeeping(stop).await });
        }
        Background {
            shutdown,
            tasks,
            drain_jobs,
            stop_jobs,
            workers,
        }
    }

    /// The shutdown signal came: workers run only this instance's waiting sync jobs now.
    pub(super) fn drain_jobs(&self) {
        self.drain_jobs.cancel();
    }

    /// No more claims; running jobs get until `bound` to finish or go back to the queue.
    /// False when the workers did not stop in time (their leases will expire).
    pub(super) async fn stop_jobs(&mut self, bound: Duration) -> bool {
        self.drain_jobs.cancel();
        self.stop_jobs.cancel();
        tokio::time::timeout(bound, &mut self.workers).await.is_ok()
    }

    /// Stops the other tasks and waits up to `bound` for their last work (the final
    /// `last_used` flush). False when they did not finish in time.
    pub(super) async fn stop_tasks(self, bound: Duration) -> bool {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(bound, self.tasks.wait()).await.is_ok()
    }
}
