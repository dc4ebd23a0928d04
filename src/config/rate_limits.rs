//! Rate limits: the tiers file, the per-IP limits of routes without a key, and whether the
//! account and key limits are shared through Redis.

use std::time::Duration;

use secrecy::SecretString;

use super::source::{millis, positive, Source};
use super::ConfigError;

pub(super) struct RateLimits {
    pub tiers_path: Option<String>,
    pub ip_rate_per_minute: u32,
    pub ip_burst: u32,
    pub auth_failures_per_minute: u32,
    pub redis_url: Option<SecretString>,
    pub rate_limit_refuse_without_redis: bool,
    pub redis_timeout: Duration,
}

pub(super) fn parse(src: &dyn Source) -> Result<RateLimits, ConfigError> {
    let tiers_path = src.get("KEYMETER_TIERS");
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
    Ok(RateLimits {
        tiers_path,
        ip_rate_per_minute,
        ip_burst,
        auth_failures_per_minute,
        redis_url,
        rate_limit_refuse_without_redis,
        redis_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;

    #[test]
    fn the_redis_backend_needs_a_redis_url() {
        let c = Config::from_source(&vars(&[])).unwrap();
        assert!(c.redis_url.is_none());
        let e =
            Config::from_source(&vars(&[("KEYMETER_RATE_LIMIT_BACKEND", "redis")])).unwrap_err();
        assert_eq!(e.var, "REDIS_URL");
        let c = Config::from_source(&vars(&[
            ("KEYMETER_RATE_LIMIT_BACKEND", "redis"),
            ("REDIS_URL", "redis://127.0.0.1:6379/"),
            ("KEYMETER_RATE_LIMIT_ON_REDIS_ERROR", "refuse"),
        ]))
        .unwrap();
        assert!(c.redis_url.is_some() && c.rate_limit_refuse_without_redis);
        let e = Config::from_source(&vars(&[("KEYMETER_RATE_LIMIT_BACKEND", "memcached")]))
            .unwrap_err();
        assert_eq!(e.var, "KEYMETER_RATE_LIMIT_BACKEND");
    }
}
