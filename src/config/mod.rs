//! Configuration: every setting the binary reads, parsed once at start-up into one typed
//! struct.
//!
//! Why one struct, parsed up front: an operator learns about a typo when the process starts,
//! not when the first request happens to touch the setting. Each failure names the variable
//! and what is wrong with it, in one line, so `keymeter serve` can print it and exit ≠ 0
//! without a panic or a backtrace. Secrets are wrapped in [`SecretString`], whose `Debug`
//! is redacted, so logging the whole struct at start-up is safe.
//!
//! One file per concern reads that concern's variables and runs its checks (ranges,
//! production requirements, settings that only make sense together): [`http`],
//! [`telemetry`], [`database`], [`auth`], [`rate_limits`], [`billing`], [`jobs`]. The shared
//! value parsers live in [`source`]. `Config` itself stays flat — its fields are what the
//! rest of the crate and the tests use. [`catalogue`] lists every variable for `--help`;
//! its tests hold it, the parsers, the README and `.env.example` together.
//!
//! Why not clap's `env` attributes: clap reads only the process environment, while tests
//! build configurations from maps ([`Config::from_source`]); and nearly every setting has a
//! check or a default that depends on another one, with an error message that must name the
//! variable — clap would parse the simple values and leave all of that here anyway.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

mod auth;
mod billing;
pub mod catalogue;
mod database;
mod events;
mod gateway;
mod http;
mod jobs;
mod rate_limits;
mod source;
mod telemetry;

pub use billing::{BillingSettings, Pack, Plan};
pub use database::DatabaseSettings;
pub use events::EventsSettings;
pub use gateway::exposed as exposed_service_tokens;
pub use jobs::JobsSettings;
pub use source::{ProcessEnv, Source};
pub use telemetry::LogFormat;

/// One bad variable: which one, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

impl Environment {
    pub fn is_production(self) -> bool {
        self == Environment::Production
    }

    fn parse(src: &dyn Source) -> Result<Environment, ConfigError> {
        match src.get("KEYMETER_ENV").as_deref().map(str::trim) {
            None | Some("development") | Some("dev") => Ok(Environment::Development),
            Some("production") | Some("prod") => Ok(Environment::Production),
            Some(other) => Err(ConfigError::new(
                "KEYMETER_ENV",
                format!("invalid value {other:?}, expected development or production"),
            )),
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Environment::Development => "development",
            Environment::Production => "production",
        })
    }
}

/// How long, after the jobs' grace, putting unfinished jobs back in the queue may take.
pub const SHUTDOWN_RELEASE_BOUND: Duration = Duration::from_secs(1);
/// How long the background tasks get to finish once the jobs are settled.
pub const SHUTDOWN_TAIL_BOUND: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Config {
    pub env: Environment,
    pub bind: SocketAddr,
    /// `KEYMETER_METRICS_BIND`: a separate listener serving only `/metrics`, without a
    /// token. Unset: `/metrics` is on `bind`, behind the admin token.
    pub metrics_bind: Option<SocketAddr>,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub database: DatabaseSettings,
    /// Largest request body accepted on any route, in bytes.
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// On SIGTERM: how long in-flight requests may drain (`KEYMETER_SHUTDOWN_TIMEOUT_SECS`).
    pub shutdown_timeout: Duration,
    /// Then how long running jobs may still finish before they go back to the queue
    /// (`KEYMETER_SHUTDOWN_JOB_GRACE_SECS`). See [`Config::shutdown_budget`].
    pub shutdown_job_grace: Duration,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: where to export traces (OTLP over HTTP, protobuf);
    /// `None` exports nothing.
    pub otel_endpoint: Option<String>,
    /// HTTP worker threads; `None` lets actix pick one per core.
    pub http_workers: Option<usize>,
    /// Origins allowed by CORS; empty means CORS stays off.
    pub cors_origins: Vec<String>,
    pub admin_token: Option<SecretString>,
    pub signup_enabled: bool,
    pub signup_credits: i64,
    /// `KEYMETER_SIGNUP_CREDITS_TTL_DAYS`: signup credits expire this long after signup
    /// (an expiring grant, see `credits::grants`); `None`: they never expire.
    pub signup_credits_ttl: Option<Duration>,
    /// Path of the tiers TOML file (`KEYMETER_TIERS`); `None` uses the built-in tiers.
    pub tiers_path: Option<String>,
    /// Take the client IP from `X-Forwarded-For` (only behind a proxy that sets it).
    pub trust_forwarded: bool,
    /// `KEYMETER_TRUSTED_PROXIES`: our own proxies' addresses; the client is the rightmost
    /// `X-Forwarded-For` hop outside them. Empty: the TCP peer is the one proxy.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Per-IP limit for routes without a key (signup, login).
    pub ip_rate_per_minute: u32,
    pub ip_burst: u32,
    /// Failed authentications an IP may make per minute before it is throttled.
    pub auth_failures_per_minute: u32,
    /// Five failed logins within this window lock the email for as long again.
    pub login_lockout: Duration,
    /// Argon2 hashes and verifications at a time (default: one per core), and attempts that
    /// may wait for one; beyond them signup and login answer 503 `password_hashing_busy`.
    pub password_hash_concurrency: usize,
    pub password_hash_queue: usize,
    /// Key cache: entry lifetime (the backstop for a lost invalidation) and size.
    pub key_cache_ttl: Duration,
    pub key_cache_capacity: u64,
    /// `Some(url)` when `KEYMETER_RATE_LIMIT_BACKEND=redis`.
    pub redis_url: Option<SecretString>,
    /// When Redis cannot answer: fall back to memory (`memory`) or refuse with 503 (`refuse`).
    pub rate_limit_refuse_without_redis: bool,
    pub redis_timeout: Duration,
    pub billing: BillingSettings,
    /// Group-commit concurrent charges (see `credits::coalesce`).
    pub charge_coalescing: bool,
    /// Body limit of the Stripe webhook route (events can exceed the API's default limit).
    pub webhook_body_limit: usize,
    pub jobs: JobsSettings,
    /// `KEYMETER_GATEWAY_ROUTES`: the file the priced routes were read from, if any.
    pub gateway_routes_path: Option<String>,
    /// The priced routes of gateway mode (empty: every proxied route is unmetered, 404).
    pub gateway_routes: crate::gateway::RouteTable,
    /// `KEYMETER_SERVICE_TOKENS`: what the operator's servers authenticate with.
    pub service_tokens: Vec<SecretString>,
    /// `KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS`: how long a gateway charge stays refundable
    /// and its request id replayable (see `credits::gateway_charges::purge`).
    pub gateway_charge_retention: Duration,
    /// How often each instance purges gateway charges past their retention (not a variable;
    /// tests shorten it).
    pub gateway_charge_purge_every: Duration,
    /// Account events' webhook endpoints (see `crate::events::delivery`).
    pub events: EventsSettings,
    /// How often each instance expires due credit grants (not a variable: the issue fixes
    /// "within a minute"; tests shorten it).
    pub expiry_sweep_every: Duration,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    /// Reads every variable from `src` and checks it; the first bad one is the error.
    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let env = Environment::parse(src)?;
        let http = http::parse(src)?;
        let telemetry = telemetry::parse(src, env)?;
        let database = database::parse(src)?;
        let auth = auth::parse(src, env)?;
        let limits = rate_limits::parse(src)?;
        let (billing, webhook_body_limit) = billing::parse(src, env)?;
        let charge_coalescing = source::boolean(src, "KEYMETER_CHARGE_COALESCING", true)?;
        let jobs = jobs::parse(src, env, http.bind)?;
        let gateway = gateway::parse(src, env)?;
        let events = events::parse(src, env, http.bind)?;
        Ok(Config {
            env,
            bind: http.bind,
            metrics_bind: http.metrics_bind,
            log_filter: telemetry.log_filter,
            log_format: telemetry.log_format,
            database,
            body_limit: http.body_limit,
            request_timeout: http.request_timeout,
            shutdown_timeout: http.shutdown_timeout,
            shutdown_job_grace: http.shutdown_job_grace,
            otel_endpoint: telemetry.otel_endpoint,
            http_workers: http.http_workers,
            cors_origins: http.cors_origins,
            admin_token: auth.admin_token,
            signup_enabled: auth.signup_enabled,
            signup_credits: auth.signup_credits,
            signup_credits_ttl: auth.signup_credits_ttl,
            tiers_path: limits.tiers_path,
            trust_forwarded: http.trust_forwarded,
            trusted_proxies: http.trusted_proxies,
            ip_rate_per_minute: limits.ip_rate_per_minute,
            ip_burst: limits.ip_burst,
            auth_failures_per_minute: limits.auth_failures_per_minute,
            login_lockout: auth.login_lockout,
            password_hash_concurrency: auth.password_hash_concurrency,
            password_hash_queue: auth.password_hash_queue,
            key_cache_ttl: auth.key_cache_ttl,
            key_cache_capacity: auth.key_cache_capacity,
            redis_url: limits.redis_url,
            rate_limit_refuse_without_redis: limits.rate_limit_refuse_without_redis,
            redis_timeout: limits.redis_timeout,
            billing,
            charge_coalescing,
            webhook_body_limit,
            jobs,
            gateway_routes_path: gateway.routes_path,
            gateway_routes: gateway.routes,
            service_tokens: gateway.service_tokens,
            gateway_charge_retention: gateway.charge_retention,
            gateway_charge_purge_every: crate::credits::gateway_charges::PURGE_EVERY,
            events,
            expiry_sweep_every: crate::credits::grants::SWEEP_EVERY,
        })
    }

    /// The longest a graceful shutdown can take, from SIGTERM to exit: the drain, then the
    /// running jobs' grace, then [`SHUTDOWN_RELEASE_BOUND`] to put unfinished jobs back in the
    /// queue, then [`SHUTDOWN_TAIL_BOUND`] for the background tasks' last work (the final
    /// `last_used` flush). `Application::run_until` bounds each step by exactly these.
    pub fn shutdown_budget(&self) -> Duration {
        self.shutdown_timeout
            + self.shutdown_job_grace
            + SHUTDOWN_RELEASE_BOUND
            + SHUTDOWN_TAIL_BOUND
    }

    /// The database URL, or the error `serve` reports when it is missing.
    pub fn database_url(&self) -> Result<&SecretString, ConfigError> {
        self.database.url()
    }
}

#[cfg(test)]
mod tests {
    use super::source::vars;
    use super::*;

    #[test]
    fn defaults_are_development_on_localhost() {
        let c = Config::from_source(&vars(&[])).expect("defaults parse");
        assert_eq!(c.env, Environment::Development);
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.body_limit, 65536);
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert!(c.database.url.is_none());
        assert!(c.database_url().is_err());
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let e = Config::from_source(&vars(&[("KEYMETER_BIND", "nope")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_BIND");
        let e = Config::from_source(&vars(&[("KEYMETER_BODY_LIMIT", "0")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_BODY_LIMIT");
        let e = Config::from_source(&vars(&[("KEYMETER_ENV", "staging")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_ENV");
        let e = Config::from_source(&vars(&[("KEYMETER_CHARGE_COALESCING", "maybe")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_CHARGE_COALESCING");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Config::from_source(&vars(&[
            ("DATABASE_URL", "postgres://u:hunter2@localhost/db"),
            ("KEYMETER_ADMIN_TOKEN", "tok-supersecret"),
        ]))
        .expect("parses");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("supersecret"), "{dbg}");
    }
}
