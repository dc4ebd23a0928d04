//! `spawn_app()`: a fresh database named by a UUID, migrated by the app itself on start, the
//! real server on port 0, and a client. The database is dropped when the `TestApp` is.

use std::collections::HashMap;
use std::time::Duration;

use keymeter::config::Config;
use keymeter::startup::Application;
use tokio::sync::oneshot;

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

pub async fn create_database() -> String {
    let name = format!("km_test_{}", uuid::Uuid::new_v4().simple());
    admin_client()
        .await
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create test database");
    name
}

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

pub struct TestApp {
    pub address: String,
    pub port: u16,
    /// The `/metrics` listener's port when `KEYMETER_METRICS_BIND` is set.
    pub metrics_port: Option<u16>,
    pub db_name: String,
    pub client: reqwest::Client,
    pub db: tokio_postgres::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn base_env(db_name: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("DATABASE_URL".into(), database_url(db_name));
    env.insert("KEYMETER_BIND".into(), "127.0.0.1:0".into());
    env.insert("KEYMETER_HTTP_WORKERS".into(), "2".into());
    env.insert("KEYMETER_DB_POOL_SIZE".into(), "8".into());
    env.insert("KEYMETER_ADMIN_TOKEN".into(), ADMIN_TOKEN.into());
    env
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        keymeter::telemetry::init("info", keymeter::config::LogFormat::Pretty);
    }
    let db_name = create_database().await;
    spawn_app_on(db_name, customise).await
}

/// Starts another instance on an existing test database (for multi-instance tests).
pub async fn spawn_app_on(
    db_name: String,
    customise: impl FnOnce(&mut HashMap<String, String>),
) -> TestApp {
    let mut env = base_env(&db_name);
    customise(&mut env);
    let config = Config::from_source(&env).expect("test configuration parses");
    let app = Application::build(config).await.expect("app builds");
    let port = app.port();
    let metrics_port = app.metrics_port();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let (db, conn) = tokio_postgres::connect(&database_url(&db_name), tokio_postgres::NoTls)
        .await
        .expect("connect to test database");
    tokio::spawn(conn);
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        metrics_port,
        db_name,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        db,
        stop: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json(
        &self,
        path: &str,
        key: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// Creates an account through the admin API; returns (account id, its first key).
    pub async fn create_account(&self, tier: &str, credits: i64) -> (uuid::Uuid, String) {
        let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
        let res = self
            .admin_post(
                "/admin/accounts",
                serde_json::json!({"email": email, "tier": tier, "credits": credits}),
            )
            .await;
        assert_eq!(res.status(), 201, "create account");
        let body: serde_json::Value = res.json().await.expect("json");
        (
            body["account_id"].as_str().unwrap().parse().unwrap(),
            body["api_key"].as_str().unwrap().to_owned(),
        )
    }

    /// A new key with `scopes` for an account, through the admin API.
    pub async fn create_key(&self, account: uuid::Uuid, scopes: &[&str]) -> (String, String) {
        let res = self
            .admin_post(
                &format!("/admin/accounts/{account}/keys"),
                serde_json::json!({"scopes": scopes}),
            )
            .await;
        assert_eq!(res.status(), 201, "create key");
        let body: serde_json::Value = res.json().await.expect("json");
        (
            body["id"].as_str().unwrap().to_owned(),
            body["key"].as_str().unwrap().to_owned(),
        )
    }

    /// Every row of every table of the app's database, as text: what a dump would hold.
    pub async fn dump_all_rows(&self) -> String {
        let tables: Vec<String> = self
            .db
            .query(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = String::new();
        for t in tables {
            for row in self
                .db
                .query(&format!("SELECT t::text FROM \"{t}\" t"), &[])
                .await
                .unwrap()
            {
                let line: String = row.get(0);
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), h).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        drop_database_blocking(&self.db_name);
    }
}

/// Asserts a response is a problem document with the given status and type, and returns it.
pub async fn assert_problem(res: reqwest::Response, status: u16, type_: &str) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct}"
    );
    let header_id = res
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: serde_json::Value = res.json().await.expect("problem body is JSON");
    assert_eq!(body["type"], type_, "problem type in {body}");
    assert_eq!(body["status"], status, "problem status in {body}");
    assert!(body["title"].is_string(), "title in {body}");
    assert!(body["detail"].is_string(), "detail in {body}");
    assert_eq!(
        body["request_id"].as_str(),
        header_id.as_deref(),
        "request_id matches X-Request-Id in {body}"
    );
    body
}
