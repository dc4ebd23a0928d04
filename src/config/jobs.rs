//! Scrape jobs: the workers, outbound fetching (SSRF allow-list, proxy), the circuit
//! breakers, and job webhooks with their signing key.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::source::{millis, positive, secs, Source};
use super::{ConfigError, Environment};

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

pub(super) fn parse(
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

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;
    use super::*;

    #[test]
    fn job_settings_are_checked() {
        let e = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_SCRAPE_ALLOW", "127.0.0.1:8080"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_SCRAPE_ALLOW");
        let e = Config::from_source(&vars(&[("KEYMETER_SCRAPE_ALLOW", "127.0.0.1")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_SCRAPE_ALLOW", "a port is required");
        let e = Config::from_source(&vars(&[(
            "KEYMETER_PROXY_URL",
            "socks9://user:hunter2@proxy",
        )]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_PROXY_URL");
        assert!(!e.to_string().contains("hunter2"));
        let e = Config::from_source(&vars(&[
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
            let e = Config::from_source(&vars(&[(var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{value}");
        }
        let c = Config::from_source(&vars(&[])).expect("defaults parse");
        assert_eq!(c.jobs.breaker_min_accounts, 3);
        assert_eq!(c.jobs.breaker_timeout_floor, Duration::from_secs(5));
        let e =
            Config::from_source(&vars(&[("KEYMETER_WEBHOOK_SIGNING_KEY", "short")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_WEBHOOK_SIGNING_KEY");
        let c = Config::from_source(&vars(&[])).expect("defaults parse");
        assert_eq!(c.jobs.workers, 16);
        assert!(c.jobs.webhook_signing_key.is_some(), "development default");
    }

    #[test]
    fn the_development_webhook_key_stays_on_loopback() {
        for bind in ["127.0.0.1:8080", "[::1]:8080"] {
            let c = Config::from_source(&vars(&[("KEYMETER_BIND", bind)])).expect(bind);
            assert!(c.jobs.webhook_signing_key.is_some(), "{bind}");
        }
        for bind in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080"] {
            let e = Config::from_source(&vars(&[("KEYMETER_BIND", bind)])).unwrap_err();
            assert_eq!(e.var, "KEYMETER_WEBHOOK_SIGNING_KEY", "{bind}");
            let e = Config::from_source(&vars(&[
                ("KEYMETER_BIND", bind),
                ("KEYMETER_WEBHOOK_SIGNING_KEY", DEV_WEBHOOK_SIGNING_KEY),
            ]))
            .unwrap_err();
            assert_eq!(
                e.var, "KEYMETER_WEBHOOK_SIGNING_KEY",
                "{bind}, set explicitly"
            );
            let c = Config::from_source(&vars(&[
                ("KEYMETER_BIND", bind),
                (
                    "KEYMETER_WEBHOOK_SIGNING_KEY",
                    "an-operator-chosen-key-0123456789abcdef",
                ),
            ]))
            .expect("an own key is fine anywhere");
            assert!(c.jobs.webhook_signing_key.is_some());
        }
        let e = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_WEBHOOK_SIGNING_KEY", DEV_WEBHOOK_SIGNING_KEY),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_WEBHOOK_SIGNING_KEY");
    }
}
