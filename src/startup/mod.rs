//! Start-up: builds everything the server needs, binds the listener, and runs the server and
//! the background tasks side by side until a shutdown signal.
//!
//! `Application::build` binds before it returns (port 0 in tests; the real port is read
//! back), so a caller knows the address before anything is served. Shutdown order matters:
//! stop accepting and drain in-flight requests (bounded by the shutdown timeout), then stop
//! background tasks, then close the pool — each step can still use the next one's resources.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use actix_cors::Cors;
use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::{from_fn, Condition};
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::cache::KeyCache;
use crate::auth::{self, AuthService};
use crate::config::Config;
use crate::db;
use crate::http::problem::ApiError;
use crate::http::{edge, extractors};
use crate::jobs::breaker::{BreakerSettings, Breakers};
use crate::jobs::queue::ConcurrencyLimits;
use crate::jobs::{AllowList, ExtractLimits, Fetcher, FetcherConfig, JobSettings, Jobs};
use crate::metrics::Metrics;
use crate::ratelimit::client_ip::ClientIpPolicy;
use crate::ratelimit::redis::RedisLimiter;
use crate::ratelimit::{IpPolicy, Limits, OnSharedFailure};
use crate::routes;
use crate::tiers::Tiers;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Pool,
    pub tiers: Tiers,
    pub auth: Arc<AuthService>,
    pub limits: Arc<Limits>,
    /// Group commit for concurrent charges (see `credits::coalesce`).
    pub charges: Arc<crate::credits::coalesce::Coalescer>,
    /// The Stripe API client, when `STRIPE_SECRET_KEY` is set.
    pub stripe: Option<crate::billing::stripe_api::StripeApi>,
    /// Scrape jobs: fetcher, breakers, queue wake-ups, webhook sender.
    pub jobs: Arc<Jobs>,
    /// This application's metrics registry (see `crate::metrics`).
    pub metrics: Arc<Metrics>,
    /// Concurrent `GET /v1/account` reads share one query.
    pub account_reads: Arc<crate::accounts::reads::AccountReads>,
    /// Bounds the Argon2 work of signups and logins.
    pub passwords: Arc<crate::accounts::password::Passwords>,
}

pub struct Application {
    port: u16,
    server: Server,
    /// The `/metrics` listener when `KEYMETER_METRICS_BIND` is set, and its port.
    metrics_server: Option<(u16, Server)>,
    state: AppState,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Workers take only this instance's waiting sync jobs once it is cancelled…
    drain_jobs: CancellationToken,
    /// …and no more jobs at all once this is.
    stop_jobs: CancellationToken,
    workers: tokio::task::JoinHandle<()>,
}

/// The scrape-job service from the configuration.
fn build_jobs(config: &Config, tiers: &Tiers) -> anyhow::Result<Jobs> {
    let s = &config.jobs;
    let allow = AllowList::parse(&s.scrape_allow)?;
    let fetcher = Fetcher::new(FetcherConfig {
        user_agent: s.user_agent.clone(),
        connect_timeout: s.connect_timeout,
        max_body_bytes: s.max_body_bytes,
        max_redirects: 5,
        proxy_url: s.proxy_url.clone(),
        allow: allow.clone(),
    })?;
    let breakers = Breakers::new(
        &fetcher.provider(),
        BreakerSettings {
            consecutive_failures: s.breaker_failures,
            open_for: s.breaker_open,
            max_open: s.breaker_max_open,
            min_accounts: s.breaker_min_accounts,
            timeout_floor: s.breaker_timeout_floor,
            ..BreakerSettings::default()
        },
    );
    let webhooks = crate::jobs::webhooks::Sender::new(
        allow,
        crate::jobs::webhooks::WebhookSettings {
            signing_key: s.webhook_signing_key.clone(),
            max_attempts: s.webhook_attempts,
            retry_base: s.webhook_retry_base,
            timeout: std::time::Duration::from_secs(10),
            max_in_flight: s.webhook_concurrency,
            per_account: s.webhook_per_account,
            per_destination: s.webhook_per_destination,
        },
    )?;
    Ok(Jobs {
        instance: uuid::Uuid::now_v7(),
        fetcher,
        breakers,
        wakeups: Arc::default(),
        limits: ConcurrencyLimits::from_tiers(tiers),
        settings: JobSettings {
            workers: s.workers,
            lease: s.lease,
            poll: s.poll,
            retention: s.retention,
            extract: ExtractLimits::default(),
        },
        webhooks,
    })
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
        let url = config.database_url()?.clone();
        let pg = db::pg_config(&url, &config.database)?;
        let pool = db::build_pool(&pg, &config.database)?;
        db::wait_until_reachable(&pool, &pg, config.database.startup_retry).await?;
        if config.database.auto_migrate {
            let applied = db::migrations::run(&pg).await?;
            if !applied.is_empty() {
                tracing::info!(migrations = ?applied, "applied migrations");
            }
        } else {
            db::migrations::check(&pg).await?;
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

        let cache = KeyCache::new(
            config.key_cache_capacity,
            config.key_cache_ttl,
            std::time::Duration::from_secs(5),
        );
        let auth = AuthService::new(pool.clone(), cache.clone());
        let metrics = Arc::new(Metrics::new(pool.clone(), cache.clone())?);
        let mut limits = Limits::new(
            tiers.clone(),
            IpPolicy {
                per_minute: config.ip_rate_per_minute,
                burst: config.ip_burst,
            },
            IpPolicy {
                per_minute: config.auth_failures_per_minute,
                burst: config.auth_failures_per_minute,
            },
            ClientIpPolicy {
                trust_forwarded: config.trust_forwarded,
                trusted_proxies: config.trusted_proxies.clone(),
            },
        );
        if config.redis_url.is_some() {
            let on_failure = if config.rate_limit_refuse_without_redis {
                OnSharedFailure::Refuse
            } else {
                OnSharedFailure::Memory
            };
            limits = limits.with_shared(RedisLimiter::new(config.redis_timeout), on_failure);
        }
        let limits = Arc::new(limits);
        let passwords = Arc::new(crate::accounts::password::Passwords::new(
            config.password_hash_concurrency,
            config.password_hash_queue,
        )?);
        for c in passwords.collectors() {
            metrics.register(c)?;
        }
        let jobs = Arc::new(build_jobs(&config, &tiers)?);
        let config = Arc::new(config);
        let state = AppState {
            config: config.clone(),
            db: pool.clone(),
            tiers,
            auth: auth.clone(),
            limits: limits.clone(),
            charges: Arc::new(crate::credits::coalesce::Coalescer::new(
                tokio::runtime::Handle::current(),
            )),
            stripe: match &config.billing.secret_key {
                Some(k) => Some(crate::billing::stripe_api::StripeApi::new(
                    &config.billing.api_base,
                    k.clone(),
                )?),
                None => None,
            },
            jobs: jobs.clone(),
            metrics: metrics.clone(),
            account_reads: Arc::new(crate::accounts::reads::AccountReads::new(
                tokio::runtime::Handle::current(),
            )),
            passwords,
        };
        {
            // Queue depth, jobs by state and the backlog's age, read when /metrics is scraped.
            let (pool, backlog, jobs) = (pool.clone(), metrics.backlog(), jobs.clone());
            metrics.on_scrape(move || {
                let (pool, backlog, jobs) = (pool.clone(), backlog.clone(), jobs.clone());
                async move {
                    let Ok(client) = pool.get().await else { return };
                    if let Ok(b) = crate::jobs::queue::backlog(&client, &jobs.limits).await {
                        backlog.set_oldest_claimable(b.oldest_claimable_secs);
                        backlog.set_webhooks(
                            b.webhooks_pending,
                            b.webhooks_retrying,
                            b.webhooks_failing_accounts,
                            b.webhooks_overdue_secs,
                        );
                    }
                    let Ok(depth) = crate::jobs::queue::depth(&client).await else {
                        return;
                    };
                    let m = crate::metrics::jobs();
                    let count = |s: &str| depth.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
                    m.set_queue_depth(count("queued"));
                    m.set_in_state("queued", count("queued"));
                    m.set_in_state("running", count("running"));
                }
            });
        }
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(db::listen::run(
            pg.clone(),
            vec![
                auth::listener::subscription(cache),
                jobs.wakeups.subscription(),
            ],
            shutdown.clone(),
        ));
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
            let (auth, pool, stop) = (auth.clone(), pool.clone(), shutdown.clone());
            tasks.spawn(async move {
                auth.last_used
                    .run(pool, std::time::Duration::from_secs(5), stop)
                    .await
            });
        }
        tasks.spawn(crate::idempotency::run_purge(
            pool.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(crate::accounts::login::run_purge(
            pool.clone(),
            config.login_lockout,
            shutdown.clone(),
        ));
        if let Some(url) = state.config.redis_url.clone() {
            let (limits, stop) = (limits.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Some(shared) = limits.shared() {
                    shared.run_connector(url, stop).await;
                }
            });
        }
        {
            let (limits, stop) = (limits.clone(), shutdown.clone());
            tasks.spawn(async move { limits.run_housekeeping(stop).await });
        }

        let server = build_server(listener, state.clone())?;
        let metrics_server = match metrics_listener {
            Some(l) => {
                let port = l.local_addr()?.port();
                tracing::info!(port, "serving /metrics on its own listener");
                Some((port, build_metrics_server(l, metrics)?))
            }
            None => None,
        };
        Ok(Application {
            port,
            server,
            metrics_server,
            state,
            shutdown,
            tasks,
            drain_jobs,
            stop_jobs,
            workers,
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
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
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
                self.drain_jobs.cancel();
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
        self.drain_jobs.cancel();
        self.stop_jobs.cancel();
        let workers_bound = config.shutdown_job_grace + crate::config::SHUTDOWN_RELEASE_BOUND;
        let stop_metrics = async {
            if let Some((handle, task)) = metrics_server {
                handle.stop(true).await;
                if let Ok(Err(e)) = task.await {
                    tracing::warn!(error = %e, "metrics server failed");
                }
            }
        };
        let (workers, ()) = tokio::join!(
            tokio::time::timeout(workers_bound, self.workers),
            stop_metrics
        );
        if workers.is_err() {
            tracing::warn!("job workers did not stop in time; their leases will expire");
        }
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(crate::config::SHUTDOWN_TAIL_BOUND, self.tasks.wait())
            .await
            .is_err()
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

fn build_server(listener: TcpListener, state: AppState) -> anyhow::Result<Server> {
    let config = state.config.clone();
    let edge_settings = web::Data::new(edge::EdgeSettings {
        body_limit: config.body_limit,
        webhook_body_limit: config.webhook_body_limit,
        request_timeout: config.request_timeout,
        production: config.env.is_production(),
    });
    let data = web::Data::new(state);
    let cors_origins = config.cors_origins.clone();
    let body_limit = config.body_limit;
    let metrics_on_main = config.metrics_bind.is_none();
    let mut server = HttpServer::new(move || {
        let mut cors = Cors::default()
            .allow_any_method()
            .allow_any_header()
            .expose_any_header()
            .max_age(600);
        for origin in &cors_origins {
            cors = cors.allowed_origin(origin);
        }
        App::new()
            .app_data(data.clone())
            .app_data(edge_settings.clone())
            .app_data(extractors::json_config(body_limit))
            .app_data(web::PayloadConfig::new(body_limit))
            .app_data(extractors::path_config())
            .app_data(extractors::query_config())
            .configure(routes::configure)
            .configure(|cfg| metrics_route(cfg, metrics_on_main))
            .default_service(web::to(not_found))
            .wrap(from_fn(crate::http::compress::compress))
            .wrap(Condition::new(!cors_origins.is_empty(), cors))
            .wrap(from_fn(edge::edge))
    })
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout.as_secs())
    .listen(listener)?;
    if let Some(n) = config.http_workers {
        server = server.workers(n);
    }
    Ok(server.run())
}

/// `/metrics` on the public listener, behind the admin token — unless it has a listener of
/// its own, in which case the public one does not have the route.
fn metrics_route(cfg: &mut web::ServiceConfig, on_main_listener: bool) {
    if on_main_listener {
        cfg.service(
            web::resource("/metrics").route(web::get().to(routes::metrics::with_admin_token)),
        );
    }
}

/// The `KEYMETER_METRICS_BIND` listener: `GET /metrics` and nothing else, one worker.
fn build_metrics_server(listener: TcpListener, metrics: Arc<Metrics>) -> anyhow::Result<Server> {
    let data = web::Data::from(metrics);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .service(
                web::resource("/metrics")
                    .route(web::get().to(routes::metrics::on_metrics_listener)),
            )
            .default_service(web::to(not_found))
    })
    .disable_signals()
    .workers(1)
    // A scrape is quick; the shutdown budget leaves it a second after the main drain.
    .shutdown_timeout(1)
    .listen(listener)?;
    Ok(server.run())
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("No route matches this path.".into()))
}
