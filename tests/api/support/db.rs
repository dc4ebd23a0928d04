//! Test databases on the PostgreSQL `scripts/test.sh` prepares, and the checks the tests make
//! on the money in them: an account's balance, a job's ledger rows, and the ledger invariant.

use uuid::Uuid;

use super::app::TestApp;

/// The server tests create their databases on: `TEST_DATABASE_URL`, else `DATABASE_URL`,
/// else the local default `scripts/test.sh` prepares.
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The same server, another database.
pub fn database_url(db: &str) -> String {
    let admin = admin_database_url();
    let (base, _) = admin
        .rsplit_once('/')
        .expect("TEST_DATABASE_URL has a database path");
    let base = if base.ends_with('/') || base.ends_with(':') {
        admin.clone()
    } else {
        base.to_owned()
    };
    format!("{base}/{db}")
}

pub async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&admin_database_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL (run scripts/test.sh, or set TEST_DATABASE_URL)");
    tokio::spawn(conn);
    client
}

/// A fresh, empty database named `km_test_<uuid>`.
pub async fn create_database() -> String {
    let name = format!("km_test_{}", Uuid::new_v4().simple());
    admin_client()
        .await
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create test database");
    name
}

/// Drops a test database, closing whatever is still connected to it. Blocking (on a thread
/// of its own), so `Drop` can call it.
pub fn drop_database_blocking(name: &str) {
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            if let Ok((client, conn)) =
                tokio_postgres::connect(&admin_database_url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        });
    })
    .join();
}

/// An account as its balance checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub credits: i64,
    pub tier: String,
    /// Charge rows in the account's ledger.
    pub charges: i64,
}

/// An account's balance, tier and number of charges, read straight from the database.
pub async fn balance(app: &TestApp, account: Uuid) -> Balance {
    let row = app
        .db
        .query_one(
            "SELECT credit_balance, tier,
                    (SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND kind = 'charge')
               FROM accounts WHERE id = $1",
            &[&account],
        )
        .await
        .expect("the account exists");
    Balance {
        credits: row.get(0),
        tier: row.get(1),
        charges: row.get(2),
    }
}

/// (charges, refunds) in the ledger for one job.
pub async fn movements(app: &TestApp, job: &str) -> (i64, i64) {
    let id: Uuid = job.parse().expect("a job id");
    let row = app
        .db
        .query_one(
            "SELECT count(*) FILTER (WHERE kind = 'charge'), count(*) FILTER (WHERE kind = 'refund')
               FROM credit_ledger WHERE job_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// balance = Σ deltas for every account, and no balance below zero.
pub async fn assert_ledger_invariant(app: &TestApp) {
    let bad = app
        .db
        .query(
            "SELECT a.id, a.credit_balance, COALESCE(sum(l.delta), 0)::bigint
               FROM accounts a LEFT JOIN credit_ledger l ON l.account_id = a.id
              GROUP BY a.id HAVING a.credit_balance <> COALESCE(sum(l.delta), 0) OR a.credit_balance < 0",
            &[],
        )
        .await
        .unwrap();
    assert!(
        bad.is_empty(),
        "ledger invariant broken for {} accounts",
        bad.len()
    );
}
