//! The database: the connection pool, start-up reachability, and migrations.
//!
//! Every query is bounded in time three ways: waiting for a pooled connection
//! (`KEYMETER_DB_POOL_TIMEOUT_MS`), opening one (`KEYMETER_DB_CONNECT_TIMEOUT_MS`), and a
//! server-side `statement_timeout` set on every connection, so a stuck query cannot pin a
//! request or a row lock forever. When PostgreSQL is down, requests fail fast with 503.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::NoTls;

use crate::config::DatabaseSettings;

pub mod batch;
pub mod listen;
pub mod migrations;

/// Parses the URL and applies keymeter's per-connection settings.
pub fn pg_config(
    url: &SecretString,
    settings: &DatabaseSettings,
) -> anyhow::Result<tokio_postgres::Config> {
    let mut cfg = tokio_postgres::Config::from_str(url.expose_secret())
        .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL connection string"))?;
    cfg.connect_timeout(settings.connect_timeout);
    if cfg.get_application_name().is_none() {
        cfg.application_name("keymeter");
    }
    // A leaked transaction must not hold an account's row lock for long either.
    cfg.options(format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        settings.statement_timeout.as_millis(),
        (settings.statement_timeout * 6).as_millis()
    ));
    Ok(cfg)
}

/// Where the database is, without credentials: safe to log.
pub fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

pub fn build_pool(
    cfg: tokio_postgres::Config,
    settings: &DatabaseSettings,
) -> anyhow::Result<Pool> {
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(settings.pool_size)
        .wait_timeout(Some(settings.pool_wait_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .context("building the database pool")
}

/// Creating a pool never touches the database; this does, retrying for `retry_for` with a
/// log line per try so an operator watching a slow database come up sees progress.
pub async fn wait_until_reachable(
    pool: &Pool,
    where_: &str,
    retry_for: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + retry_for;
    let mut attempt = 1u32;
    loop {
        let err = match pool.get().await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(e) => pool_error_text(&e),
        };
        if Instant::now() >= deadline {
            bail!(
                "could not reach PostgreSQL at {where_} after {}s: {err}",
                retry_for.as_secs()
            );
        }
        tracing::warn!(attempt, database = %where_, error = %err, "database not reachable yet; retrying");
        attempt += 1;
        tokio::time::sleep(
            Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}

fn pool_error_text(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(b) => {
            let mut s = b.to_string();
            if let Some(src) = std::error::Error::source(b) {
                s = format!("{s}: {src}");
            }
            s
        }
        other => other.to_string(),
    }
}

/// Does this error mean "the database is unavailable" (→ 503) rather than "the query was
/// wrong" (→ 500)?
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        // Class 08: connection exceptions; 57P0x: shutdown/crash; 57014: statement timeout.
        return c.starts_with("08") || c.starts_with("57P") || c == "57014";
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    false
}
