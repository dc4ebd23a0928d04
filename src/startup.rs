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
use actix_web::dev::Server;
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
use crate::error::ApiError;
use crate::http::{edge, extractors};
use crate::ratelimit::redis::RedisLimiter;
use crate::ratelimit::tiers::Tiers;
use crate::ratelimit::{self, IpPolicy, Limits, OnSharedFailure};
use crate::routes;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Pool,
    pub tiers: Tiers,
    pub auth: Arc<AuthService>,
    pub limits: Arc<Limits>,
    /// Group commit for concurrent charges to one account.
    pub charges: Arc<crate::credits::coalesce::Coalescer>,
    /// The Stripe API client, when `STRIPE_SECRET_KEY` is set.
    pub stripe: Option<crate::billing::stripe_api::StripeApi>,
}

pub struct Application {
    port: u16,
    server: Server,
    state: AppState,
    shutdown: CancellationToken,
    tasks: TaskTracker,
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
        let where_ = db::describe(&pg);
        let pool = db::build_pool(pg.clone(), &config.database)?;
        db::wait_until_reachable(&pool, &where_, config.database.startup_retry).await?;
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

        let cache = KeyCache::new(
            config.key_cache_capacity,
            config.key_cache_ttl,
            std::time::Duration::from_secs(5),
        );
        let auth = AuthService::new(pool.clone(), cache.clone());
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
            config.trust_forwarded,
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
        let config = Arc::new(config);
        let state = AppState {
            config: config.clone(),
            db: pool.clone(),
            tiers,
            auth: auth.clone(),
            limits: limits.clone(),
            charges: Arc::default(),
            stripe: match &config.billing.secret_key {
                Some(k) => Some(crate::billing::stripe_api::StripeApi::new(
                    &config.billing.api_base,
                    k.clone(),
                )?),
                None => None,
            },
        };
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(auth::listener::run(pg.clone(), cache, shutdown.clone()));
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
            let charges = state.charges.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = tick.tick() => charges.housekeeping(),
                        () = stop.cancelled() => return,
                    }
                }
            });
            let stop = shutdown.clone();
            tasks.spawn(async move { limits.run_housekeeping(stop).await });
        }

        let server = build_server(listener, state.clone())?;
        Ok(Application {
            port,
            server,
            state,
            shutdown,
            tasks,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` completes (or the server fails), then shuts down in order.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = self.server;
        tokio::pin!(server);
        tokio::select! {
            res = &mut server => {
                res.context("HTTP server failed")?;
            }
            () = signal => {
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
        // Pooled connections opened by requests live on the HTTP workers' runtimes, which
        // have just stopped; drop them so the background tasks' last work (the final
        // last_used flush) opens fresh ones on this runtime.
        self.state.db.retain(|_, _| false);
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.state.config.shutdown_timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the shutdown timeout");
        }
        self.state.db.close();
        tracing::info!("stopped");
        Ok(())
    }
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
            .configure(routes_config)
            .default_service(web::to(not_found))
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

/// The edge enforces the configured webhook limit before routing; this is only the
/// extractor's ceiling.
const WEBHOOK_BODY_LIMIT_MAX: usize = 16 * 1024 * 1024;

/// Every route, registered explicitly in one place. Routes without a key sit behind the
/// per-IP gate; everything else under `/v1` behind the keyed gate (authenticate, then the
/// tier's limit).
///
/// Each route must be documented in `crate::openapi` (`tests/api/openapi.rs` reads the
/// routes back from the router and fails on any the document lacks, or vice versa).
pub fn routes_config(cfg: &mut web::ServiceConfig) {
    use routes::{accounts, admin, billing, credits, health, keys};
    cfg.service(web::resource("/health/live").route(web::get().to(health::live)))
        .service(web::resource("/health/ready").route(web::get().to(health::ready)))
        .service(web::resource("/openapi.json").route(web::get().to(crate::openapi::openapi_json)))
        .service(web::resource("/docs").route(web::get().to(crate::openapi::docs_page)))
        .service(
            web::resource("/v1/signup")
                .wrap(from_fn(ratelimit::gate::public))
                .route(web::post().to(accounts::signup)),
        )
        .service(
            web::resource("/v1/login")
                .wrap(from_fn(ratelimit::gate::public))
                .route(web::post().to(accounts::login)),
        )
        .service(
            // Stripe authenticates by signature, not by key; its deliveries come in bursts
            // from Stripe's addresses, so no per-IP limit either.
            web::resource("/v1/billing/webhook")
                .app_data(web::PayloadConfig::new(WEBHOOK_BODY_LIMIT_MAX))
                .route(web::post().to(billing::webhook)),
        )
        .service(
            web::scope("/v1")
                .wrap(from_fn(ratelimit::gate::keyed))
                .service(web::resource("/account").route(web::get().to(accounts::get_account)))
                .service(
                    web::resource("/keys")
                        .route(web::get().to(keys::list))
                        .route(web::post().to(keys::create)),
                )
                .service(
                    web::resource("/keys/{id}")
                        .route(web::get().to(keys::get))
                        .route(web::delete().to(keys::revoke)),
                )
                .service(web::resource("/keys/{id}/rotate").route(web::post().to(keys::rotate)))
                .service(web::resource("/credits").route(web::get().to(credits::summary)))
                .service(
                    web::resource("/credits/ledger").route(web::get().to(credits::ledger_page)),
                )
                .service(web::resource("/credits/charge").route(web::post().to(credits::charge)))
                .service(web::resource("/usage").route(web::get().to(credits::usage)))
                .service(web::resource("/billing").route(web::get().to(billing::summary)))
                .service(
                    web::resource("/billing/checkout").route(web::post().to(billing::checkout)),
                ),
        )
        .service(
            web::scope("/admin")
                .service(web::resource("/accounts").route(web::post().to(admin::create_account)))
                .service(web::resource("/accounts/{id}").route(web::get().to(admin::get_account)))
                .service(
                    web::resource("/accounts/{id}/keys").route(web::post().to(admin::create_key)),
                )
                .service(
                    web::resource("/accounts/{id}/tier")
                        .route(web::put().to(admin::set_tier))
                        .route(web::post().to(admin::set_tier_post)),
                )
                .service(
                    web::resource("/accounts/{id}/suspend").route(web::post().to(admin::suspend)),
                )
                .service(
                    web::resource("/accounts/{id}/unsuspend")
                        .route(web::post().to(admin::unsuspend)),
                )
                .service(
                    web::resource("/accounts/{id}/credits")
                        .route(web::post().to(admin::grant_credits)),
                )
                .service(
                    web::resource("/keys/{id}/revoke").route(web::post().to(admin::revoke_key)),
                ),
        );
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("No route matches this path.".into()))
}
