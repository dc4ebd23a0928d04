//! The application state: what every handler can reach, and how it is put together from the
//! configuration, the tiers and the database pool.

use std::sync::Arc;

use deadpool_postgres::Pool;

use crate::auth::cache::KeyCache;
use crate::auth::AuthService;
use crate::config::Config;
use crate::jobs::breaker::{BreakerSettings, Breakers};
use crate::jobs::queue::ConcurrencyLimits;
use crate::jobs::{AllowList, ExtractLimits, Fetcher, FetcherConfig, JobSettings, Jobs};
use crate::metrics::Metrics;
use crate::ratelimit::client_ip::ClientIpPolicy;
use crate::ratelimit::redis::RedisLimiter;
use crate::ratelimit::{IpPolicy, Limits, OnSharedFailure};
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
    /// Gateway mode: the priced routes, their charge lane, the service tokens.
    pub gateway: Arc<crate::gateway::Gateway>,
    /// Account events' webhook deliveries (and the guard endpoint URLs are vetted by).
    pub event_sender: Arc<crate::events::delivery::Sender>,
}

impl AppState {
    /// Everything the handlers share, built once. Nothing here runs yet: the background
    /// tasks that keep it fresh are started by `background::start`.
    pub(super) fn build(config: Config, tiers: Tiers, pool: Pool) -> anyhow::Result<AppState> {
        let cache = KeyCache::new(
            config.key_cache_capacity,
            config.key_cache_ttl,
            std::time::Duration::from_secs(5),
        );
        let auth = AuthService::new(pool.clone(), cache.clone());
        let metrics = Arc::new(Metrics::new(pool.clone(), cache)?);
        let limits = Arc::new(build_limits(&config, &tiers));
        let passwords = Arc::new(crate::accounts::password::Passwords::new(
            config.password_hash_concurrency,
            config.password_hash_queue,
        )?);
        for c in passwords.collectors() {
            metrics.register(c)?;
        }
        let jobs = Arc::new(build_jobs(&config, &tiers)?);
        let gateway = Arc::new(crate::gateway::Gateway {
            routes: config.gateway_routes.clone(),
            service_tokens: crate::gateway::ServiceTokens::new(
                &crate::config::exposed_service_tokens(&config.service_tokens),
            ),
        });
        let event_sender = Arc::new(crate::events::delivery::Sender::new(
            AllowList::parse(&config.jobs.scrape_allow)?,
            config.events.clone(),
        )?);
        let config = Arc::new(config);
        let state = AppState {
            config: config.clone(),
            db: pool,
            tiers,
            auth,
            limits,
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
            jobs,
            metrics,
            account_reads: Arc::new(crate::accounts::reads::AccountReads::new(
                tokio::runtime::Handle::current(),
            )),
            passwords,
            gateway,
            event_sender,
        };
        state.read_queue_gauges_on_scrape();
        Ok(state)
    }

    /// Queue depth, jobs by state and the backlog's age, read when `/metrics` is scraped.
    fn read_queue_gauges_on_scrape(&self) {
        let (pool, backlog, jobs) = (self.db.clone(), self.metrics.backlog(), self.jobs.clone());
        self.metrics.on_scrape(move || {
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
}

/// The rate limits: per tier, per IP, per failed authentication, shared through Redis when
/// it is configured.
fn build_limits(config: &Config, tiers: &Tiers) -> Limits {
    let limits = Limits::new(
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
    if config.redis_url.is_none() {
        return limits;
    }
    let on_failure = if config.rate_limit_refuse_without_redis {
        OnSharedFailure::Refuse
    } else {
        OnSharedFailure::Memory
    };
    limits.with_shared(RedisLimiter::new(config.redis_timeout), on_failure)
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
        finisher: crate::jobs::queue::Finisher::new(tokio::runtime::Handle::current()),
        creator: crate::jobs::queue::Creator::new(tokio::runtime::Handle::current()),
        inline: crate::jobs::runner::Inline::new(),
    })
}
