//! The database: how to connect (TLS included), the connection pool, start-up
//! reachability, and migrations.
//!
//! Every query is bounded in time three ways: waiting for a pooled connection
//! (`KEYMETER_DB_POOL_TIMEOUT_MS`), opening one (`KEYMETER_DB_CONNECT_TIMEOUT_MS`), and a
//! server-side `statement_timeout` set on every connection, so a stuck query cannot pin a
//! request or a row lock forever. When PostgreSQL is down, requests fail fast with 503.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseSettings;

pub mod batch;
pub mod listen;
pub mod migrations;
pub mod tls;

pub use tls::SslMode;

/// How keymeter connects: the parsed `DATABASE_URL`, its `sslmode`, and the TLS connector
/// built for it. The pool, the LISTEN connection, migrations and the admin CLI all connect
/// through this one value, so no path can open a connection with weaker TLS than another.
#[derive(Clone)]
pub struct PgConnect {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    ca_file: Option<PathBuf>,
    tls: MakeRustlsConnect,
}

/// A connection's background half, as [`PgConnect::connect`] returns it.
pub type PgConnection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

impl PgConnect {
    /// Parses a connection string and builds its TLS connector; `ca_file` is
    /// `KEYMETER_DB_CA_FILE`.
    pub fn from_url(url: &str, ca_file: Option<PathBuf>) -> anyhow::Result<Self> {
        let (config, ssl_mode) =
            tls::parse_url(url).map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
        if ca_file.is_some() && matches!(ssl_mode, SslMode::Disable | SslMode::Prefer) {
            tracing::warn!(
                sslmode = ssl_mode.as_str(),
                "KEYMETER_DB_CA_FILE is set but sslmode does not check certificates; use sslmode=verify-full"
            );
        }
        let tls = tls::connector(ssl_mode, ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("KEYMETER_DB_CA_FILE: {e}"))?;
        Ok(Self {
            config,
            ssl_mode,
            ca_file,
            tls,
        })
    }

    /// One connection, outside the pool (migrations, LISTEN, `dev`).
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, PgConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    /// An error's text for an operator, TLS failures spelled out with the setting that
    /// decides them.
    pub fn error_text(&self, e: &(dyn std::error::Error + 'static)) -> String {
        match tls::tls_failure(e) {
            Some(t) => tls::describe_failure(t, self.ssl_mode, self.ca_file.as_ref()),
            None => {
                let mut s = e.to_string();
                if let Some(src) = e.source() {
                    s = format!("{s}: {src}");
                }
                s
            }
        }
    }
}

/// Parses the URL and applies keymeter's per-connection settings.
pub fn pg_config(url: &SecretString, settings: &DatabaseSettings) -> anyhow::Result<PgConnect> {
    let mut pg = PgConnect::from_url(url.expose_secret(), settings.ca_file.clone())?;
    let cfg = &mut pg.config;
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
    Ok(pg)
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

pub fn build_pool(pg: &PgConnect, settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let mgr = Manager::from_config(
        pg.config.clone(),
        pg.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // LIFO: the connection just given back is the next one handed out, so under light load
    // the same few connections (and PostgreSQL backends) do the work, with their prepared
    // statements, plans and caches warm; the default FIFO rotates every request through
    // every idle connection.
    Pool::builder(mgr)
        .max_size(settings.pool_size)
        .queue_mode(deadpool_postgres::QueueMode::Lifo)
        .wait_timeout(Some(settings.pool_wait_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .context("building the database pool")
}

/// The pool, once the database answers, and the [`PgConnect`] it was built from (for the
/// connections outside the pool: migrations, LISTEN).
///
/// The one way `serve`, `migrate` and `keymeter admin` reach the database, so each gets the
/// same time bounds, TLS and start-up patience. A missing `DATABASE_URL` is reported as the
/// configuration error it is.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<(Pool, PgConnect)> {
    let pg = pg_config(settings.url()?, settings)?;
    let pool = build_pool(&pg, settings)?;
    wait_until_reachable(&pool, &pg, settings.startup_retry).await?;
    Ok((pool, pg))
}

/// Creating a pool never touches the database; this does, retrying for `retry_for` with a
/// log line per try so an operator watching a slow database come up sees progress.
///
/// A TLS failure is not retried: a certificate the server presents does not become trusted
/// by waiting, and the operator should learn which setting to fix at once.
pub async fn wait_until_reachable(
    pool: &Pool,
    pg: &PgConnect,
    retry_for: Duration,
) -> anyhow::Result<()> {
    let where_ = describe(&pg.config);
    let deadline = Instant::now() + retry_for;
    let mut attempt = 1u32;
    loop {
        let err = match pool.get().await {
            Ok(client) => match client.simple_query("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(deadpool_postgres::PoolError::Backend(e)) if tls::tls_failure(&e).is_some() => {
                bail!(
                    "could not connect to PostgreSQL at {where_}: {}",
                    pg.error_text(&e)
                );
            }
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

/// A database failure as the domain modules report it: either the database is unreachable
/// for now (the pool timed out, the connection dropped, the server is restarting — a client
/// should retry), or anything else (a bug or a broken invariant: logged, a bare 500).
///
/// Domain error enums carry it as `#[error(transparent)] Db(#[from] db::Error)` and get the
/// `?` conversions from pool and query errors with [`impl_db_error_from!`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Other(anyhow::Error),
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Timeout(_) | PoolError::Backend(_) | PoolError::Closed => {
                tracing::warn!(error = %e, "database pool could not provide a connection");
                Error::Unavailable(e.to_string())
            }
            other => Error::Other(anyhow::Error::new(other).context("database pool")),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_connection_error(&e) {
            tracing::warn!(error = %e, "database connection lost");
            Error::Unavailable(e.to_string())
        } else {
            Error::Other(anyhow::Error::new(e).context("database query"))
        }
    }
}

/// Gives a domain error enum with a `Db(db::Error)` variant the `?` conversions from
/// `deadpool_postgres::PoolError` and `tokio_postgres::Error`.
#[macro_export]
macro_rules! impl_db_error_from {
    ($ty:ty) => {
        impl From<deadpool_postgres::PoolError> for $ty {
            fn from(e: deadpool_postgres::PoolError) -> Self {
                <$ty>::from($crate::db::Error::from(e))
            }
        }
        impl From<tokio_postgres::Error> for $ty {
            fn from(e: tokio_postgres::Error) -> Self {
                <$ty>::from($crate::db::Error::from(e))
            }
        }
    };
}
