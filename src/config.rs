//! Configuration: every setting the binary reads, parsed once at start-up into one typed
//! struct.
//!
//! Why one struct, parsed up front: an operator learns about a typo when the process starts,
//! not when the first request happens to touch the setting. Each failure names the variable
//! and what is wrong with it, in one line, so `keymeter serve` can print it and exit ≠ 0
//! without a panic or a backtrace. Secrets are wrapped in [`SecretString`], whose `Debug`
//! is redacted, so logging the whole struct at start-up is safe.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

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
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Environment::Development => "development",
            Environment::Production => "production",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Database settings. The URL is a secret: it usually carries a password.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: Option<SecretString>,
    pub pool_size: usize,
    /// How long a request waits for a pooled connection before it gets a 503.
    pub pool_wait_timeout: Duration,
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout`: no query may run longer, whatever the caller forgot.
    pub statement_timeout: Duration,
    /// How long start-up keeps retrying an unreachable database before giving up.
    pub startup_retry: Duration,
    pub auto_migrate: bool,
    /// `KEYMETER_DB_CA_FILE`: PEM roots that the server's certificate must chain to under
    /// `sslmode=verify-ca`/`verify-full` (and `require`, as in libpq); the public roots
    /// when unset.
    pub ca_file: Option<std::path::PathBuf>,
}

/// A credit pack: one Stripe price buys a fixed number of credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    pub name: String,
    pub price_id: String,
    pub credits: i64,
}

/// A plan: a recurring Stripe price that puts the account on a tier and grants credits each
/// paid period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub price_id: String,
    pub tier: String,
    pub monthly_credits: i64,
}

#[derive(Debug, Clone)]
pub struct BillingSettings {
    pub secret_key: Option<SecretString>,
    /// Several during a rotation: a delivery signed with any of them is accepted.
    pub webhook_secrets: Vec<SecretString>,
    pub api_base: String,
    pub packs: Vec<Pack>,
    pub plans: Vec<Plan>,
}

impl BillingSettings {
    pub fn enabled(&self) -> bool {
        self.secret_key.is_some() || !self.webhook_secrets.is_empty()
    }

    pub fn pack(&self, name: &str) -> Option<&Pack> {
        self.packs.iter().find(|p| p.name == name)
    }

    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }

    pub fn plan_by_price(&self, price_id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.price_id == price_id)
    }
}

fn item_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The entries of a `name:price_id:…,…` list: each split into `shape`'s field count, with a
/// valid name and a non-empty price id, neither listed twice. `build` turns the fields into
/// the item (`None` for a bad value).
fn price_list<T>(
    src: &dyn Source,
    var: &'static str,
    shape: &str,
    build: impl Fn(&[&str]) -> Option<T>,
) -> Result<Vec<(String, String, T)>, ConfigError> {
    let Some(raw) = src.get(var) else {
        return Ok(Vec::new());
    };
    let arity = shape.split(':').count();
    let mut out: Vec<(String, String, T)> = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = item.split(':').map(str::trim).collect();
        let bad = || ConfigError::new(var, format!("invalid entry {item:?}, expected {shape}"));
        if parts.len() != arity || !item_name_ok(parts[0]) || parts[1].is_empty() {
            return Err(bad());
        }
        let built = build(&parts).ok_or_else(bad)?;
        if out.iter().any(|(n, p, _)| n == parts[0] || p == parts[1]) {
            return Err(ConfigError::new(
                var,
                format!("{:?} or its price is listed twice", parts[0]),
            ));
        }
        out.push((parts[0].to_owned(), parts[1].to_owned(), built));
    }
    Ok(out)
}

fn parse_packs(src: &dyn Source) -> Result<Vec<Pack>, ConfigError> {
    let entries = price_list(src, "KEYMETER_CREDIT_PACKS", "name:price_id:credits", |f| {
        f[2].parse::<i64>().ok().filter(|c| *c > 0)
    })?;
    Ok(entries
        .into_iter()
        .map(|(name, price_id, credits)| Pack {
            name,
            price_id,
            credits,
        })
        .collect())
}

fn parse_plans(src: &dyn Source) -> Result<Vec<Plan>, ConfigError> {
    let entries = price_list(
        src,
        "KEYMETER_PLANS",
        "name:price_id:tier:monthly_credits",
        |f| {
            let credits = f[3].parse::<i64>().ok().filter(|c| *c >= 0)?;
            item_name_ok(f[2]).then(|| (f[2].to_owned(), credits))
        },
    )?;
    Ok(entries
        .into_iter()
        .map(|(name, price_id, (tier, monthly_credits))| Plan {
            name,
            price_id,
            tier,
            monthly_credits,
        })
        .collect())
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
}

/// Scrape jobs: workers, outbound fetching, breakers, job webhooks.
#[derive(Debug, Clone)]
pub struct JobsSettings {
    /// Workers per instance (`KEYMETER_JOB_WORKERS`).
    pub workers: usize,
    pub lease: Duration,
    pub poll: Duration,
    /// Finished jobs (with their results) are deleted this long after they end.
    pub retention: Duration,
    /// `host:port` pairs the SSRF guard lets through (tests, development only).
    pub scrape_allow: String,
    pub proxy_url: Option<SecretString>,
    pub user_agent: String,
    pub connect_timeout: Duration,
    pub max_body_bytes: usize,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    pub breaker_max_open: Duration,
    /// Distinct accounts whose failures an origin's shared breaker needs
    /// (`KEYMETER_BREAKER_MIN_ACCOUNTS`): fewer only open their own account-scoped breakers.
    pub breaker_min_accounts: u32,
    /// A job timeout counts against the site only when the job gave it at least this long
    /// (`KEYMETER_BREAKER_TIMEOUT_FLOOR_MS`).
    pub breaker_timeout_floor: Duration,
    /// Derives every account's job-webhook signing secret; `None` (production without
    /// `KEYMETER_WEBHOOK_SIGNING_KEY`) turns job webhooks off.
    pub webhook_signing_key: Option<SecretString>,
    pub webhook_attempts: i32,
    pub webhook_retry_base: Duration,
    /// Job webhooks in flight per instance: in all, per account, per destination origin.
    pub webhook_concurrency: usize,
    pub webhook_per_account: usize,
    pub webhook_per_destination: usize,
}

/// The development default of `KEYMETER_WEBHOOK_SIGNING_KEY`. It is in the source, so anyone
/// can derive every account's job-webhook secret from it and forge deliveries: it is used only
/// in development on a loopback address, and refused (even when set explicitly) in production
/// or when `KEYMETER_BIND` is reachable from other machines.
const DEV_WEBHOOK_SIGNING_KEY: &str = "keymeter-development-webhook-signing-key";

fn jobs_settings(
    src: &dyn Source,
    env: Environment,
    bind: SocketAddr,
) -> Result<JobsSettings, ConfigError> {
    let scrape_allow = src.get("KEYMETER_SCRAPE_ALLOW").unwrap_or_default();
    if !scrape_allow.trim().is_empty() {
        if env.is_production() {
            return Err(ConfigError::new(
                "KEYMETER_SCRAPE_ALLOW",
                "is refused in production (it exempts addresses from the SSRF guard)",
            ));
        }
        crate::jobs::AllowList::parse(&scrape_allow)
            .map_err(|e| ConfigError::new("KEYMETER_SCRAPE_ALLOW", e.to_string()))?;
    }
    let proxy_url = src.get("KEYMETER_PROXY_URL").map(SecretString::from);
    if let Some(p) = &proxy_url {
        let ok = url::Url::parse(p.expose_secret())
            .map(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .unwrap_or(false);
        if !ok {
            // Never echo the value: it may carry the provider's credentials.
            return Err(ConfigError::new(
                "KEYMETER_PROXY_URL",
                "must be http(s)://[user:password@]host:port",
            ));
        }
    }
    let public = env.is_production() || !bind.ip().is_loopback();
    let webhook_signing_key = match src.get("KEYMETER_WEBHOOK_SIGNING_KEY") {
        Some(k) if k == DEV_WEBHOOK_SIGNING_KEY && public => {
            return Err(ConfigError::new(
                "KEYMETER_WEBHOOK_SIGNING_KEY",
                "must not be the published development key in production or when KEYMETER_BIND is not a loopback address",
            ))
        }
        Some(k) if k.len() >= 32 => Some(SecretString::from(k)),
        Some(_) => {
            return Err(ConfigError::new(
                "KEYMETER_WEBHOOK_SIGNING_KEY",
                "must be at least 32 characters",
            ))
        }
        // Production without a key: job webhooks are off (a job asking for one gets a 422).
        None if env.is_production() => None,
        None if public => {
            return Err(ConfigError::new(
                "KEYMETER_WEBHOOK_SIGNING_KEY",
                format!(
                    "must be set (32+ random characters) when KEYMETER_BIND ({bind}) is not a loopback address: the built-in development key is public"
                ),
            ))
        }
        None => Some(SecretString::from(DEV_WEBHOOK_SIGNING_KEY)),
    };
    // failsafe's backoff counts whole seconds (and refuses less than one).
    let breaker_open = secs(src, "KEYMETER_BREAKER_OPEN_SECS", 10)?;
    let breaker_max_open = secs(src, "KEYMETER_BREAKER_MAX_OPEN_SECS", 120)?;
    if breaker_max_open < breaker_open {
        return Err(ConfigError::new(
            "KEYMETER_BREAKER_MAX_OPEN_SECS",
            "must be at least KEYMETER_BREAKER_OPEN_SECS",
        ));
    }
    let breaker_timeout_floor = millis(src, "KEYMETER_BREAKER_TIMEOUT_FLOOR_MS", 5_000)?;
    // Above the longest job timeout no timeout would ever count, hiding sites that hang.
    if breaker_timeout_floor > Duration::from_millis(60_000) {
        return Err(ConfigError::new(
            "KEYMETER_BREAKER_TIMEOUT_FLOOR_MS",
            "must be at most 60000 (the longest job timeout)",
        ));
    }
    let webhook_attempts = positive(src, "KEYMETER_JOB_WEBHOOK_ATTEMPTS", 6i32, "a count")?;
    let workers = positive(src, "KEYMETER_JOB_WORKERS", 16usize, "a worker count")?;
    if workers > 1024 {
        return Err(ConfigError::new(
            "KEYMETER_JOB_WORKERS",
            "must be at most 1024",
        ));
    }
    Ok(JobsSettings {
        workers,
        lease: secs(src, "KEYMETER_JOB_LEASE_SECS", 30)?,
        poll: millis(src, "KEYMETER_JOB_POLL_MS", 1_000)?,
        retention: Duration::from_secs(
            positive(
                src,
                "KEYMETER_JOB_RETENTION_DAYS",
                30u64,
                "a number of days",
            )? * 86_400,
        ),
        scrape_allow,
        proxy_url,
        user_agent: src.get("KEYMETER_SCRAPE_USER_AGENT").unwrap_or_else(|| {
            concat!("keymeter/", env!("CARGO_PKG_VERSION"), " (+scrape)").to_owned()
        }),
        connect_timeout: millis(src, "KEYMETER_SCRAPE_CONNECT_TIMEOUT_MS", 10_000)?,
        max_body_bytes: positive(
            src,
            "KEYMETER_SCRAPE_MAX_BODY_BYTES",
            5 * 1024 * 1024usize,
            "a size in bytes",
        )?,
        breaker_failures: positive(src, "KEYMETER_BREAKER_FAILURES", 5u32, "a count")?,
        breaker_open,
        breaker_max_open,
        breaker_min_accounts: positive(
            src,
            "KEYMETER_BREAKER_MIN_ACCOUNTS",
            3u32,
            "a number of accounts",
        )?,
        breaker_timeout_floor,
        webhook_signing_key,
        webhook_attempts,
        webhook_retry_base: millis(src, "KEYMETER_JOB_WEBHOOK_RETRY_MS", 10_000)?,
        webhook_concurrency: positive(
            src,
            "KEYMETER_JOB_WEBHOOK_CONCURRENCY",
            64usize,
            "a count of deliveries",
        )?,
        webhook_per_account: positive(
            src,
            "KEYMETER_JOB_WEBHOOK_PER_ACCOUNT",
            8usize,
            "a count of deliveries",
        )?,
        webhook_per_destination: positive(
            src,
            "KEYMETER_JOB_WEBHOOK_PER_DESTINATION",
            8usize,
            "a count of deliveries",
        )?,
    })
}

/// Where variables come from: the process environment in production, a map in tests.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => Some(v),
            _ => None,
        }
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    }
}

fn parsed<T: FromStr>(
    src: &dyn Source,
    var: &'static str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    match src.get(var) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse::<T>()
            .map_err(|_| ConfigError::new(var, format!("invalid value {raw:?}, expected {what}"))),
    }
}

fn positive<T: FromStr + PartialOrd + Default + Copy>(
    src: &dyn Source,
    var: &'static str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    let v = parsed(src, var, default, what)?;
    if v <= T::default() {
        return Err(ConfigError::new(
            var,
            format!("must be greater than 0 ({what})"),
        ));
    }
    Ok(v)
}

fn millis(src: &dyn Source, var: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
    positive(src, var, default_ms, "a whole number of milliseconds").map(Duration::from_millis)
}

fn secs(src: &dyn Source, var: &'static str, default_s: u64) -> Result<Duration, ConfigError> {
    positive(src, var, default_s, "a whole number of seconds").map(Duration::from_secs)
}

/// `KEYMETER_TRUSTED_PROXIES`: comma-separated CIDRs (`10.0.0.0/8`, `fd00::/8`) or single
/// addresses.
fn trusted_proxies(src: &dyn Source) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    const VAR: &str = "KEYMETER_TRUSTED_PROXIES";
    let Some(raw) = src.get(VAR) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    ConfigError::new(
                        VAR,
                        format!(
                            "invalid entry {s:?}, expected a CIDR like 10.0.0.0/8 or an address"
                        ),
                    )
                })
        })
        .collect()
}

fn boolean(src: &dyn Source, var: &'static str, default: bool) -> Result<bool, ConfigError> {
    match src.get(var).map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) => match v.as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::new(
                var,
                format!("invalid value {v:?}, expected true or false"),
            )),
        },
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let env = match src.get("KEYMETER_ENV").as_deref().map(str::trim) {
            None | Some("development") | Some("dev") => Environment::Development,
            Some("production") | Some("prod") => Environment::Production,
            Some(other) => {
                return Err(ConfigError::new(
                    "KEYMETER_ENV",
                    format!("invalid value {other:?}, expected development or production"),
                ))
            }
        };
        let bind = parsed(
            src,
            "KEYMETER_BIND",
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            "host:port, e.g. 127.0.0.1:8080",
        )?;
        let metrics_bind = match src.get("KEYMETER_METRICS_BIND") {
            None => None,
            Some(_) => Some(parsed(
                src,
                "KEYMETER_METRICS_BIND",
                bind,
                "host:port, e.g. 127.0.0.1:9090",
            )?),
        };
        if metrics_bind.is_some_and(|m| m == bind && m.port() != 0) {
            return Err(ConfigError::new(
                "KEYMETER_METRICS_BIND",
                format!("must differ from KEYMETER_BIND ({bind})"),
            ));
        }
        let log_filter = src.get("KEYMETER_LOG").unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_filter).is_err() {
            return Err(ConfigError::new(
                "KEYMETER_LOG",
                format!("invalid filter {log_filter:?}, expected e.g. info or keymeter=debug,info"),
            ));
        }
        let log_format = match src.get("KEYMETER_LOG_FORMAT").as_deref().map(str::trim) {
            None => match env {
                Environment::Production => LogFormat::Json,
                Environment::Development => LogFormat::Pretty,
            },
            Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError::new(
                    "KEYMETER_LOG_FORMAT",
                    format!("invalid value {other:?}, expected json or pretty"),
                ))
            }
        };

        let url = src.get("DATABASE_URL");
        if let Some(u) = &url {
            // Never echo the value: it may hold a password (the error names only sslmode).
            crate::db::tls::parse_url(u)
                .map_err(|e| ConfigError::new("DATABASE_URL", e.to_string()))?;
        }
        let ca_file = match src.get("KEYMETER_DB_CA_FILE") {
            None => None,
            Some(p) => {
                let path = std::path::PathBuf::from(p);
                crate::db::tls::load_ca_file(&path)
                    .map_err(|e| ConfigError::new("KEYMETER_DB_CA_FILE", e))?;
                Some(path)
            }
        };
        let database = DatabaseSettings {
            url: url.map(SecretString::from),
            pool_size: positive(src, "KEYMETER_DB_POOL_SIZE", 16usize, "a connection count")?,
            pool_wait_timeout: millis(src, "KEYMETER_DB_POOL_TIMEOUT_MS", 2_000)?,
            connect_timeout: millis(src, "KEYMETER_DB_CONNECT_TIMEOUT_MS", 2_000)?,
            statement_timeout: millis(src, "KEYMETER_DB_STATEMENT_TIMEOUT_MS", 5_000)?,
            startup_retry: secs(src, "KEYMETER_DB_STARTUP_RETRY_SECS", 10)?,
            auto_migrate: boolean(src, "KEYMETER_AUTO_MIGRATE", true)?,
            ca_file,
        };

        let body_limit = positive(
            src,
            "KEYMETER_BODY_LIMIT",
            64 * 1024usize,
            "a size in bytes",
        )?;
        let request_timeout = secs(src, "KEYMETER_REQUEST_TIMEOUT_SECS", 75)?;
        // 20 s of drain + 5 s for running jobs + the fixed tail fits an orchestrator's usual
        // 30-second grace period (Kubernetes' default) before SIGKILL.
        let shutdown_timeout = secs(src, "KEYMETER_SHUTDOWN_TIMEOUT_SECS", 20)?;
        let shutdown_job_grace = secs(
            src,
            "KEYMETER_SHUTDOWN_JOB_GRACE_SECS",
            shutdown_timeout.as_secs().min(5),
        )?;
        let otel_raw = src.get("OTEL_EXPORTER_OTLP_ENDPOINT");
        let otel_endpoint = match otel_raw.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => {
                // No credentials in the URL: the whole configuration is logged at start-up.
                let ok = url::Url::parse(raw).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host_str().is_some()
                        && u.username().is_empty()
                        && u.password().is_none()
                });
                if !ok {
                    return Err(ConfigError::new(
                        "OTEL_EXPORTER_OTLP_ENDPOINT",
                        "must be an http:// or https:// URL without credentials, e.g. http://127.0.0.1:4318",
                    ));
                }
                Some(raw.trim_end_matches('/').to_owned())
            }
        };
        let http_workers = match src.get("KEYMETER_HTTP_WORKERS") {
            None => None,
            Some(_) => Some(positive(
                src,
                "KEYMETER_HTTP_WORKERS",
                1usize,
                "a thread count",
            )?),
        };
        let cors_origins: Vec<String> = src
            .get("KEYMETER_CORS_ORIGINS")
            .map(|s| {
                s.split(',')
                    .map(|o| o.trim().to_owned())
                    .filter(|o| !o.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for o in &cors_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(ConfigError::new(
                    "KEYMETER_CORS_ORIGINS",
                    format!("invalid origin {o:?}, expected e.g. https://app.example.com"),
                ));
            }
        }

        let admin_token = src.get("KEYMETER_ADMIN_TOKEN").map(SecretString::from);
        if let Some(t) = &admin_token {
            if env.is_production() && t.expose_secret().len() < 32 {
                return Err(ConfigError::new(
                    "KEYMETER_ADMIN_TOKEN",
                    "must be at least 32 characters in production",
                ));
            }
        }
        let signup_enabled = boolean(src, "KEYMETER_SIGNUP_ENABLED", true)?;
        let signup_credits = parsed(
            src,
            "KEYMETER_SIGNUP_CREDITS",
            0i64,
            "a whole number of credits",
        )?;
        if signup_credits < 0 {
            return Err(ConfigError::new(
                "KEYMETER_SIGNUP_CREDITS",
                "must not be negative",
            ));
        }
        let tiers_path = src.get("KEYMETER_TIERS");
        let trust_forwarded = boolean(src, "KEYMETER_TRUST_FORWARDED", false)?;
        let trusted_proxies = trusted_proxies(src)?;
        if !trusted_proxies.is_empty() && !trust_forwarded {
            return Err(ConfigError::new(
                "KEYMETER_TRUSTED_PROXIES",
                "has no effect unless KEYMETER_TRUST_FORWARDED=true",
            ));
        }
        let ip_rate_per_minute = positive(
            src,
            "KEYMETER_IP_RATE_PER_MINUTE",
            60u32,
            "requests per minute",
        )?;
        let ip_burst = positive(src, "KEYMETER_IP_BURST", 20u32, "a request count")?;
        let auth_failures_per_minute = positive(
            src,
            "KEYMETER_AUTH_FAILURES_PER_MINUTE",
            20u32,
            "failures per minute",
        )?;
        let login_lockout = secs(src, "KEYMETER_LOGIN_LOCKOUT_SECS", 900)?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let password_hash_concurrency = positive(
            src,
            "KEYMETER_PASSWORD_HASH_CONCURRENCY",
            cores,
            "a count of hashes at a time",
        )?;
        let password_hash_queue = parsed(
            src,
            "KEYMETER_PASSWORD_HASH_QUEUE",
            password_hash_concurrency.saturating_mul(4),
            "a count of waiting attempts (0 or more)",
        )?;
        let key_cache_ttl = secs(src, "KEYMETER_KEY_CACHE_TTL_SECS", 30)?;
        if key_cache_ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "KEYMETER_KEY_CACHE_TTL_SECS",
                "must be at most 60 (it bounds how long a missed revocation could go unnoticed)",
            ));
        }
        let key_cache_capacity = positive(
            src,
            "KEYMETER_KEY_CACHE_CAPACITY",
            100_000u64,
            "an entry count",
        )?;
        let redis_url = match src
            .get("KEYMETER_RATE_LIMIT_BACKEND")
            .as_deref()
            .map(str::trim)
        {
            None | Some("memory") => None,
            Some("redis") => {
                let url = src.get("REDIS_URL").ok_or_else(|| {
                    ConfigError::new(
                        "REDIS_URL",
                        "is required when KEYMETER_RATE_LIMIT_BACKEND=redis (e.g. redis://127.0.0.1:6379/)",
                    )
                })?;
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("unix://"))
                {
                    return Err(ConfigError::new(
                        "REDIS_URL",
                        "must start with redis://, rediss:// or unix://",
                    ));
                }
                Some(SecretString::from(url))
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "KEYMETER_RATE_LIMIT_BACKEND",
                    format!("invalid value {other:?}, expected memory or redis"),
                ))
            }
        };
        let rate_limit_refuse_without_redis = match src
            .get("KEYMETER_RATE_LIMIT_ON_REDIS_ERROR")
            .as_deref()
            .map(str::trim)
        {
            None | Some("memory") => false,
            Some("refuse") => true,
            Some(other) => {
                return Err(ConfigError::new(
                    "KEYMETER_RATE_LIMIT_ON_REDIS_ERROR",
                    format!("invalid value {other:?}, expected memory or refuse"),
                ))
            }
        };
        let redis_timeout = millis(src, "KEYMETER_REDIS_TIMEOUT_MS", 100)?;
        let billing = BillingSettings {
            secret_key: src.get("STRIPE_SECRET_KEY").map(SecretString::from),
            webhook_secrets: src
                .get("STRIPE_WEBHOOK_SECRET")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| SecretString::from(s.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            api_base: src
                .get("STRIPE_API_BASE")
                .unwrap_or_else(|| "https://api.stripe.com".to_owned())
                .trim_end_matches('/')
                .to_owned(),
            packs: parse_packs(src)?,
            plans: parse_plans(src)?,
        };
        if !(billing.api_base.starts_with("https://") || billing.api_base.starts_with("http://")) {
            return Err(ConfigError::new(
                "STRIPE_API_BASE",
                "must be an http(s) URL",
            ));
        }
        let billing_configured =
            billing.enabled() || !billing.packs.is_empty() || !billing.plans.is_empty();
        if env.is_production() && billing_configured {
            if billing.secret_key.is_none() {
                return Err(ConfigError::new(
                    "STRIPE_SECRET_KEY",
                    "is required in production when billing is configured",
                ));
            }
            if billing.webhook_secrets.is_empty() {
                return Err(ConfigError::new(
                    "STRIPE_WEBHOOK_SECRET",
                    "is required in production when billing is configured",
                ));
            }
            if billing.api_base.starts_with("http://") {
                return Err(ConfigError::new(
                    "STRIPE_API_BASE",
                    "must be https in production",
                ));
            }
        }
        let charge_coalescing = boolean(src, "KEYMETER_CHARGE_COALESCING", true)?;
        let webhook_body_limit = positive(
            src,
            "KEYMETER_WEBHOOK_BODY_LIMIT",
            1024 * 1024usize,
            "a size in bytes",
        )?;

        Ok(Config {
            env,
            bind,
            metrics_bind,
            log_filter,
            log_format,
            database,
            body_limit,
            request_timeout,
            shutdown_timeout,
            shutdown_job_grace,
            otel_endpoint,
            http_workers,
            cors_origins,
            admin_token,
            signup_enabled,
            signup_credits,
            tiers_path,
            trust_forwarded,
            trusted_proxies,
            ip_rate_per_minute,
            ip_burst,
            auth_failures_per_minute,
            login_lockout,
            password_hash_concurrency,
            password_hash_queue,
            key_cache_ttl,
            key_cache_capacity,
            redis_url,
            rate_limit_refuse_without_redis,
            redis_timeout,
            billing,
            charge_coalescing,
            webhook_body_limit,
            jobs: jobs_settings(src, env, bind)?,
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
        self.database.url.as_ref().ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "is not set (expected postgres://user[:password]@host[:port]/database; `keymeter dev` starts a local PostgreSQL for you)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_default_shutdown_fits_a_30_second_grace_period() {
        let c = Config::from_source(&src(&[])).expect("defaults parse");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(c.shutdown_job_grace, Duration::from_secs(5));
        assert!(
            c.shutdown_budget() <= Duration::from_secs(30),
            "{:?}",
            c.shutdown_budget()
        );
        // A short drain keeps the jobs' grace no longer than itself…
        let c = Config::from_source(&src(&[("KEYMETER_SHUTDOWN_TIMEOUT_SECS", "2")])).unwrap();
        assert_eq!(c.shutdown_job_grace, Duration::from_secs(2));
        // …unless it is set.
        let c = Config::from_source(&src(&[
            ("KEYMETER_SHUTDOWN_TIMEOUT_SECS", "2"),
            ("KEYMETER_SHUTDOWN_JOB_GRACE_SECS", "7"),
        ]))
        .unwrap();
        assert_eq!(c.shutdown_job_grace, Duration::from_secs(7));
    }

    #[test]
    fn the_otlp_endpoint_is_optional_and_checked() {
        let c = Config::from_source(&src(&[])).unwrap();
        assert_eq!(c.otel_endpoint, None);
        let c = Config::from_source(&src(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318/",
        )]))
        .unwrap();
        assert_eq!(c.otel_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        let e = Config::from_source(&src(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]))
            .unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
    }

    #[test]
    fn defaults_are_development_on_localhost() {
        let c = Config::from_source(&src(&[])).expect("defaults parse");
        assert_eq!(c.env, Environment::Development);
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.body_limit, 65536);
        assert_eq!(c.log_format, LogFormat::Pretty);
        assert!(c.database.url.is_none());
        assert!(c.database_url().is_err());
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let e = Config::from_source(&src(&[("KEYMETER_BIND", "nope")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_BIND");
        let e = Config::from_source(&src(&[("KEYMETER_BODY_LIMIT", "0")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_BODY_LIMIT");
        let e = Config::from_source(&src(&[("KEYMETER_ENV", "staging")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_ENV");
    }

    #[test]
    fn the_metrics_bind_is_an_address_apart_from_the_main_one() {
        let c = Config::from_source(&src(&[])).unwrap();
        assert!(c.metrics_bind.is_none());
        let c = Config::from_source(&src(&[("KEYMETER_METRICS_BIND", "127.0.0.1:9090")])).unwrap();
        assert_eq!(c.metrics_bind.unwrap().to_string(), "127.0.0.1:9090");
        let e = Config::from_source(&src(&[("KEYMETER_METRICS_BIND", "9090")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_METRICS_BIND");
        let e = Config::from_source(&src(&[
            ("KEYMETER_BIND", "0.0.0.0:8080"),
            ("KEYMETER_METRICS_BIND", "0.0.0.0:8080"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_METRICS_BIND");
    }

    #[test]
    fn a_bad_database_url_is_not_echoed() {
        let e = Config::from_source(&src(&[(
            "DATABASE_URL",
            "postgres://u:hunter2@h:notaport/db",
        )]))
        .unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Config::from_source(&src(&[
            ("DATABASE_URL", "postgres://u:hunter2@localhost/db"),
            ("KEYMETER_ADMIN_TOKEN", "tok-supersecret"),
        ]))
        .expect("parses");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("supersecret"), "{dbg}");
    }

    #[test]
    fn packs_and_plans_parse_and_bad_entries_are_named() {
        let c = Config::from_source(&src(&[
            (
                "KEYMETER_CREDIT_PACKS",
                "small:price_1:100, large:price_2:1200",
            ),
            ("KEYMETER_PLANS", "pro:price_3:pro:5000"),
        ]))
        .unwrap();
        assert_eq!(c.billing.pack("large").unwrap().credits, 1200);
        assert_eq!(c.billing.plan_by_price("price_3").unwrap().tier, "pro");
        let e =
            Config::from_source(&src(&[("KEYMETER_CREDIT_PACKS", "small:price_1")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_CREDIT_PACKS");
        let e =
            Config::from_source(&src(&[("KEYMETER_PLANS", "pro:price_3:pro:lots")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_PLANS");
        let e = Config::from_source(&src(&[
            ("KEYMETER_ENV", "production"),
            ("STRIPE_SECRET_KEY", "sk_live_x"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "STRIPE_WEBHOOK_SECRET");
    }

    #[test]
    fn trusted_proxies_parse_and_need_trust_forwarded() {
        let c = Config::from_source(&src(&[
            ("KEYMETER_TRUST_FORWARDED", "true"),
            (
                "KEYMETER_TRUSTED_PROXIES",
                "10.0.0.0/8, 192.0.2.7, fd00::/8",
            ),
        ]))
        .unwrap();
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[1].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));
        let e = Config::from_source(&src(&[
            ("KEYMETER_TRUST_FORWARDED", "true"),
            ("KEYMETER_TRUSTED_PROXIES", "10.0.0.0/33"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_TRUSTED_PROXIES");
        let e =
            Config::from_source(&src(&[("KEYMETER_TRUSTED_PROXIES", "10.0.0.0/8")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_TRUSTED_PROXIES");
    }

    #[test]
    fn production_demands_a_long_admin_token() {
        let e = Config::from_source(&src(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_ADMIN_TOKEN", "short"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_ADMIN_TOKEN");
        let c = Config::from_source(&src(&[("KEYMETER_ENV", "production")])).expect("parses");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(
            c.jobs.webhook_signing_key.is_none(),
            "no development key in production"
        );
    }

    #[test]
    fn job_settings_are_checked() {
        let e = Config::from_source(&src(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_SCRAPE_ALLOW", "127.0.0.1:8080"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_SCRAPE_ALLOW");
        let e = Config::from_source(&src(&[("KEYMETER_SCRAPE_ALLOW", "127.0.0.1")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_SCRAPE_ALLOW", "a port is required");
        let e = Config::from_source(&src(&[(
            "KEYMETER_PROXY_URL",
            "socks9://user:hunter2@proxy",
        )]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_PROXY_URL");
        assert!(!e.to_string().contains("hunter2"));
        let e = Config::from_source(&src(&[
            ("KEYMETER_BREAKER_OPEN_SECS", "30"),
            ("KEYMETER_BREAKER_MAX_OPEN_SECS", "10"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_BREAKER_MAX_OPEN_SECS");
        for (var, value) in [
            ("KEYMETER_BREAKER_MIN_ACCOUNTS", "0"),
            ("KEYMETER_BREAKER_MIN_ACCOUNTS", "many"),
            ("KEYMETER_BREAKER_TIMEOUT_FLOOR_MS", "0"),
            ("KEYMETER_BREAKER_TIMEOUT_FLOOR_MS", "60001"),
        ] {
            let e = Config::from_source(&src(&[(var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{value}");
        }
        let c = Config::from_source(&src(&[])).expect("defaults parse");
        assert_eq!(c.jobs.breaker_min_accounts, 3);
        assert_eq!(c.jobs.breaker_timeout_floor, Duration::from_secs(5));
        let e =
            Config::from_source(&src(&[("KEYMETER_WEBHOOK_SIGNING_KEY", "short")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_WEBHOOK_SIGNING_KEY");
        let c = Config::from_source(&src(&[])).expect("defaults parse");
        assert_eq!(c.jobs.workers, 16);
        assert!(c.jobs.webhook_signing_key.is_some(), "development default");
    }

    #[test]
    fn the_development_webhook_key_stays_on_loopback() {
        for bind in ["127.0.0.1:8080", "[::1]:8080"] {
            let c = Config::from_source(&src(&[("KEYMETER_BIND", bind)])).expect(bind);
            assert!(c.jobs.webhook_signing_key.is_some(), "{bind}");
        }
        for bind in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080"] {
            let e = Config::from_source(&src(&[("KEYMETER_BIND", bind)])).unwrap_err();
            assert_eq!(e.var, "KEYMETER_WEBHOOK_SIGNING_KEY", "{bind}");
            let e = Config::from_source(&src(&[
                ("KEYMETER_BIND", bind),
                ("KEYMETER_WEBHOOK_SIGNING_KEY", DEV_WEBHOOK_SIGNING_KEY),
            ]))
            .unwrap_err();
            assert_eq!(
                e.var, "KEYMETER_WEBHOOK_SIGNING_KEY",
                "{bind}, set explicitly"
            );
            let c = Config::from_source(&src(&[
                ("KEYMETER_BIND", bind),
                (
                    "KEYMETER_WEBHOOK_SIGNING_KEY",
                    "an-operator-chosen-key-0123456789abcdef",
                ),
            ]))
            .expect("an own key is fine anywhere");
            assert!(c.jobs.webhook_signing_key.is_some());
        }
        let e = Config::from_source(&src(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_WEBHOOK_SIGNING_KEY", DEV_WEBHOOK_SIGNING_KEY),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_WEBHOOK_SIGNING_KEY");
    }
}
