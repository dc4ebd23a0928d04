//! PostgreSQL: where it is, how keymeter's pool waits on it, and how long anything may take.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use super::source::{boolean, millis, positive, secs, Source};
use super::ConfigError;

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
    pub ca_file: Option<PathBuf>,
}

impl DatabaseSettings {
    /// The URL, or the error `serve` reports when it is missing (`dev` alone may start
    /// without one: it fills it in with its own PostgreSQL).
    pub fn url(&self) -> Result<&SecretString, ConfigError> {
        self.url.as_ref().ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "is not set (expected postgres://user[:password]@host[:port]/database; `keymeter dev` starts a local PostgreSQL for you)",
            )
        })
    }
}

pub(super) fn parse(src: &dyn Source) -> Result<DatabaseSettings, ConfigError> {
    let url = src.get("DATABASE_URL");
    if let Some(u) = &url {
        // Never echo the value: it may hold a password (the error names only sslmode).
        crate::db::tls::parse_url(u)
            .map_err(|e| ConfigError::new("DATABASE_URL", e.to_string()))?;
    }
    let ca_file = match src.get("KEYMETER_DB_CA_FILE") {
        None => None,
        Some(p) => {
            let path = PathBuf::from(p);
            crate::db::tls::load_ca_file(&path)
                .map_err(|e| ConfigError::new("KEYMETER_DB_CA_FILE", e))?;
            Some(path)
        }
    };
    Ok(DatabaseSettings {
        url: url.map(SecretString::from),
        pool_size: positive(src, "KEYMETER_DB_POOL_SIZE", 16usize, "a connection count")?,
        pool_wait_timeout: millis(src, "KEYMETER_DB_POOL_TIMEOUT_MS", 2_000)?,
        connect_timeout: millis(src, "KEYMETER_DB_CONNECT_TIMEOUT_MS", 2_000)?,
        statement_timeout: millis(src, "KEYMETER_DB_STATEMENT_TIMEOUT_MS", 5_000)?,
        startup_retry: secs(src, "KEYMETER_DB_STARTUP_RETRY_SECS", 10)?,
        auto_migrate: boolean(src, "KEYMETER_AUTO_MIGRATE", true)?,
        ca_file,
    })
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;

    #[test]
    fn a_bad_database_url_is_not_echoed() {
        let e = Config::from_source(&vars(&[(
            "DATABASE_URL",
            "postgres://u:hunter2@h:notaport/db",
        )]))
        .unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn the_url_is_optional_until_it_is_needed() {
        let c = Config::from_source(&vars(&[])).expect("defaults parse");
        assert!(c.database.url.is_none());
        assert_eq!(c.database.url().unwrap_err().var, "DATABASE_URL");
        assert_eq!(c.database_url().unwrap_err().var, "DATABASE_URL");
    }
}
