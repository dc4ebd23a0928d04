//! Who gets in and at what cost: the operator token, signup, the login lockout, the bounded
//! password hashing, and the API-key cache.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::source::{boolean, parsed, positive, secs, Source};
use super::{ConfigError, Environment};

pub(super) struct Auth {
    pub admin_token: Option<SecretString>,
    pub signup_enabled: bool,
    pub signup_credits: i64,
    pub signup_credits_ttl: Option<Duration>,
    pub login_lockout: Duration,
    pub password_hash_concurrency: usize,
    pub password_hash_queue: usize,
    pub key_cache_ttl: Duration,
    pub key_cache_capacity: u64,
}

pub(super) fn parse(src: &dyn Source, env: Environment) -> Result<Auth, ConfigError> {
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
    let ttl_days = parsed(
        src,
        "KEYMETER_SIGNUP_CREDITS_TTL_DAYS",
        0u32,
        "a whole number of days (0: signup credits never expire)",
    )?;
    if ttl_days > 3650 {
        return Err(ConfigError::new(
            "KEYMETER_SIGNUP_CREDITS_TTL_DAYS",
            "must be at most 3650 (0: never expire)",
        ));
    }
    let signup_credits_ttl =
        (ttl_days > 0).then(|| Duration::from_secs(u64::from(ttl_days) * 86_400));
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
    Ok(Auth {
        admin_token,
        signup_enabled,
        signup_credits,
        signup_credits_ttl,
        login_lockout,
        password_hash_concurrency,
        password_hash_queue,
        key_cache_ttl,
        key_cache_capacity,
    })
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::{Config, LogFormat};

    #[test]
    fn production_demands_a_long_admin_token() {
        let e = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_ADMIN_TOKEN", "short"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_ADMIN_TOKEN");
        let c = Config::from_source(&vars(&[("KEYMETER_ENV", "production")])).expect("parses");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(
            c.jobs.webhook_signing_key.is_none(),
            "no development key in production"
        );
    }

    #[test]
    fn the_key_cache_may_not_hide_a_revocation_for_long() {
        let e = Config::from_source(&vars(&[("KEYMETER_KEY_CACHE_TTL_SECS", "61")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_KEY_CACHE_TTL_SECS");
        let e = Config::from_source(&vars(&[("KEYMETER_SIGNUP_CREDITS", "-1")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_SIGNUP_CREDITS");
    }
}
