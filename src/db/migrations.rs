//! Versioned migrations from `sql/`, embedded in the binary by refinery.
//!
//! refinery tracks versions and checksums in `refinery_schema_history` and runs each
//! migration in its own transaction; it takes no lock, so we hold a PostgreSQL advisory lock
//! around the run — several instances starting at once then migrate one after another
//! instead of racing. A database that has a migration this binary does not know, or an
//! applied migration whose text changed, is refused: the binary and the schema disagree.

use anyhow::{bail, Context};
use tokio_postgres::Client;

use super::PgConnect;

mod embedded {
    refinery::embed_migrations!("sql");
}

/// An arbitrary constant naming keymeter's migration lock.
const MIGRATION_LOCK: i64 = 0x6B65_796D_6574_6572; // "keymeter"

async fn connect(pg: &PgConnect) -> anyhow::Result<Client> {
    let (client, conn) = pg
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting for migrations: {}", pg.error_text(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "migration connection ended");
        }
    });
    Ok(client)
}

/// Applies every pending migration under the advisory lock. Returns the versions applied.
pub async fn run(pg: &PgConnect) -> anyhow::Result<Vec<String>> {
    let mut client = connect(pg).await?;
    // The pool's short `statement_timeout` guards requests, not schema changes: waiting for
    // another instance's migration lock, or building an index on a large table, may take
    // longer, and cutting either off would stop start-up. This session has no limit.
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .context("lifting the statement timeout for migrations")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock")?;
    let runner = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true);
    let result = runner.run_async(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let report = result.map_err(|e| anyhow::anyhow!("migrations refused: {e}"))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

/// Verifies, without changing anything, that the database holds exactly the migrations this
/// binary carries (used when `KEYMETER_AUTO_MIGRATE=false`).
pub async fn check(pg: &PgConnect) -> anyhow::Result<()> {
    let mut client = connect(pg).await?;
    let runner = embedded::migrations::runner();
    let applied = runner
        .get_applied_migrations_async(&mut client)
        .await
        .map_err(|e| anyhow::anyhow!("reading applied migrations: {e}"))?;
    let known = runner.get_migrations();
    for a in &applied {
        match known.iter().find(|k| k.version() == a.version()) {
            None => bail!(
                "the database has migration {a} which this binary does not know; run a newer keymeter"
            ),
            Some(k) if k.checksum() != a.checksum() => bail!(
                "applied migration {a} differs from this binary's copy (checksum mismatch)"
            ),
            Some(_) => {}
        }
    }
    let pending: Vec<String> = known
        .iter()
        .filter(|k| !applied.iter().any(|a| a.version() == k.version()))
        .map(|k| k.to_string())
        .collect();
    if !pending.is_empty() {
        bail!(
            "the database is missing migrations {}; run `keymeter migrate` (or unset KEYMETER_AUTO_MIGRATE=false)",
            pending.join(", ")
        );
    }
    Ok(())
}
