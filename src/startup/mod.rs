//! Start-up: builds everything the server needs, binds the listener, and runs the server and
//! the background tasks side by side until a shutdown signal.
//!
//! `Application::build` binds before it returns (port 0 in tests; the real port is read
//! back), so a caller knows the address before anything is served. Shutdown order matters:
//! stop accepting and drain in-flight requests (bounded by the shutdown timeout), then stop
//! background tasks, then close the pool — each step can still use the next one's resources.
//!
//! The pieces: [`state`] builds the [`AppState`] the handlers share, [`background`] starts
//! and stops the tasks beside the server, [`server`] builds the HTTP servers. This file
//! puts them in order.

use std::future::Future;
use std::net::TcpListener;

use actix_web::dev::{Server, ServerHandle};
use anyhow::Context;

use crate::config::Config;
use crate::db;
use crate::tiers::Tiers;

mod background;
mod server;
mod state;

pub use state::AppState;

use background::Background;

pub struct Application {
    port: u16,
    server: Server,
    /// The `/metrics` listener when `KEYMETER_METRICS_BIND` is set, and its port.
    metrics_server: Option<(u16, Server)>,
    state: AppState,
    background: Background,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let tiers = Tiers::load(config.tiers_path.as_deref())?;
        for plan in &config.billing.plans {
            if tiers.get(&plan.tier).is_none() {
                anyhow::bail!(
                    "KEYMETER_PLANS: plan {} names tier {:?}, which is not configured",
                    plan.name,
                    plan.tier
                );
            }
        }
        let (pool, pg) = db::connect(&config.database).await?;
        if config.database.auto_migrate {
            let applied = db::migrations::run(&pg).await?;
            if !applied.is_empty() {
                tracing::info!(migrations = ?applied, "applied migrations");
            }
        } else {
            db::migrations::check(&pg).await?;
        }

        // The tiers' low-balance thresholds, where the charge statement reads them.
        {
            let client = pool
                .get()
                .await
                .context("syncing the tiers' alert defaults")?;
            crate::credits::alerts::sync_tier_defaults(&client, &tiers)
                .await
                .context("syncing the tiers' alert defaults")?;
        }

        let listener =
            TcpListener::bind(config.bind).with_context(|| format!("binding {}", config.bind))?;
        let port = listener.local_addr()?.port();
        let metrics_listener = match config.metrics_bind {
            Some(addr) => Some(
                TcpListener::bind(addr).with_context(|| format!("binding metrics on {addr}"))?,
            ),
            None => None,
        };

        let state = AppState::build(config, tiers, pool)?;
        let background = Background::start(&state, &pg);

        let server = server::build_server(listener, state.clone())?;
        let metrics_server = match metrics_listener {
            Some(l) => {
                let port = l.local_addr()?.port();
                tracing::info!(port, "serving /metrics on its own listener");
                Some((
                    port,
                    server::build_metrics_server(l, state.metrics.clone())?,
                ))
            }
            None => None,
        };
        Ok(Application {
            port,
            server,
            metrics_server,
            state,
            background,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the `/metrics` listener, when `KEYMETER_METRICS_BIND` is set.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_server.as_ref().map(|(port, _)| *port)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` completes (or the server fails), then shuts down in order.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = self.server;
        // The metrics listener runs on its own task and stops after the main server has
        // drained, so the drain itself can still be watched.
        let metrics_server: Option<(ServerHandle, _)> = self
            .metrics_server
            .map(|(_, s)| (s.handle(), tokio::spawn(s)));
        tokio::pin!(server);
        tokio::select! {
            res = &mut server => {
                res.context("HTTP server failed")?;
            }
            () = signal => {
                // Workers keep running this instance's waiting sync jobs while requests drain.
                self.background.drain_jobs();
                // actix closes whatever is still open when the drain times out; just before,
                // sync scrapes still waiting answer 202 with their job (which stays queued or
                // is put back, and ends on another instance) rather than losing the client.
                let wakeups = self.state.jobs.wakeups.clone();
                let handoff_at = handoff_delay(self.state.config.shutdown_timeout);
                tokio::spawn(async move {
                    tokio::time::sleep(handoff_at).await;
                    wakeups.hand_off();
                });
                tracing::info!(
                    timeout_s = self.state.config.shutdown_timeout.as_secs(),
                    "shutdown requested; draining in-flight requests"
                );
                // Graceful: stop accepting, let in-flight requests finish within the timeout.
                // The server future must keep being polled for the stop command to run.
                let (_, res) = tokio::join!(handle.stop(true), &mut server);
                res.context("HTTP server failed while stopping")?;
            }
        }
        // Every step after the drain is bounded so the whole shutdown stays within
        // `Config::shutdown_budget` (SIGTERM → exit ≤ 28 s with the defaults).
        let config = self.state.config.clone();
        // Pooled connections opened by requests live on the HTTP workers' runtimes, which
        // have just stopped; drop them so the background tasks' last work (the final
        // last_used flush) opens fresh ones on this runtime.
        self.state.db.retain(|_, _| false);
        // No more claims; running jobs get the jobs' grace, then go back to the queue. The
        // metrics listener stops meanwhile (its own drain is 1 s), so the drain itself could
        // still be watched.
        let workers_bound = config.shutdown_job_grace + crate::config::SHUTDOWN_RELEASE_BOUND;
        let stop_metrics = async {
            if let Some((handle, task)) = metrics_server {
                handle.stop(true).await;
                if let Ok(Err(e)) = task.await {
                    tracing::warn!(error = %e, "metrics server failed");
                }
            }
        };
        let (workers_stopped, ()) =
            tokio::join!(self.background.stop_jobs(workers_bound), stop_metrics);
        if !workers_stopped {
            tracing::warn!("job workers did not stop in time; their leases will expire");
        }
        if !self
            .background
            .stop_tasks(crate::config::SHUTDOWN_TAIL_BOUND)
            .await
        {
            tracing::warn!("background tasks did not stop in time");
        }
        self.state.db.close();
        tracing::info!("stopped");
        Ok(())
    }
}

/// When, after the shutdown signal, waiting sync scrapes hand their jobs off: a second before
/// the drain timeout (half of it for very short timeouts), time enough to write the answers.
fn handoff_delay(shutdown_timeout: std::time::Duration) -> std::time::Duration {
    let margin = std::time::Duration::from_secs(1).min(shutdown_timeout / 2);
    shutdown_timeout.saturating_sub(margin)
}
