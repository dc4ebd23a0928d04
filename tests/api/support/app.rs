//! The application under test: a fresh database named by a UUID (migrated by the app itself on
//! start), the real server on port 0, a client, and a connection to the database for checks.
//! The database is dropped when the [`TestApp`] is.
//!
//! Settings: every test starts from [`base_config`] (the test database, a random port, two
//! HTTP workers, eight pooled connections, [`ADMIN_TOKEN`]) and changes the typed fields it
//! cares about in the closure of [`spawn_app_with`]. A test about how a variable is *parsed*
//! builds from [`base_env`] with `Config::from_source` instead.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keymeter::config::Config;
use keymeter::startup::Application;
use secrecy::SecretString;
use serde_json::Value;
use tokio::sync::oneshot;

use super::db::{create_database, database_url, drop_database_blocking};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

/// The variables every test app starts from, as the binary would read them.
pub fn base_env(db_name: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("DATABASE_URL".into(), database_url(db_name));
    env.insert("KEYMETER_BIND".into(), "127.0.0.1:0".into());
    env.insert("KEYMETER_HTTP_WORKERS".into(), "2".into());
    env.insert("KEYMETER_DB_POOL_SIZE".into(), "8".into());
    env.insert("KEYMETER_ADMIN_TOKEN".into(), ADMIN_TOKEN.into());
    env
}

/// [`base_env`], parsed: the configuration every test app starts from.
pub fn base_config(db_name: &str) -> Config {
    Config::from_source(&base_env(db_name)).expect("the base test configuration parses")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// An app on a fresh database, with `customise` applied to [`base_config`].
pub async fn spawn_app_with(customise: impl FnOnce(&mut Config)) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        keymeter::telemetry::init("info", keymeter::config::LogFormat::Pretty);
    }
    let db_name = create_database().await;
    spawn_app_on(db_name, customise).await
}

/// Another instance on an existing test database (for multi-instance tests).
pub async fn spawn_app_on(db_name: String, customise: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = base_config(&db_name);
    customise(&mut config);
    start(db_name, config).await
}

/// An app for scrape jobs: its SSRF guard lets `allow` (`host:port` entries, see
/// [`super::upstream`]) through, and four job workers look for work every 200 ms.
pub async fn spawn_jobs_app(allow: &[String], customise: impl FnOnce(&mut Config)) -> TestApp {
    let allow = allow.to_vec();
    spawn_app_with(move |c| {
        allow_scraping(c, &allow);
        c.jobs.workers = 4;
        c.jobs.poll = Duration::from_millis(200);
        customise(c);
    })
    .await
}

/// Lets the SSRF guard through to `allow` (`host:port` entries), as
/// `KEYMETER_SCRAPE_ALLOW` does.
pub fn allow_scraping(config: &mut Config, allow: &[String]) {
    config.jobs.scrape_allow = allow.join(",");
}

/// The test Redis: `TEST_REDIS_URL`, else the local one `scripts/test.sh` starts.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// The Redis rate-limit backend at `url`; `refuse`: answer 503 rather than fall back to
/// memory when Redis cannot answer (so a pass cannot come from the in-memory limiter).
pub fn redis_backend(config: &mut Config, url: &str, refuse: bool) {
    config.redis_url = Some(SecretString::from(url.to_owned()));
    config.rate_limit_refuse_without_redis = refuse;
}

/// Writes a tiers TOML file to the temporary directory; returns its path (for
/// `config.tiers_path`).
pub fn tiers_file(body: &str) -> String {
    let path = std::env::temp_dir().join(format!("keymeter-tiers-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, body).expect("write the tiers file");
    path.to_string_lossy().into_owned()
}

async fn start(db_name: String, config: Config) -> TestApp {
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

pub struct TestApp {
    pub address: String,
    pub port: u16,
    /// The `/metrics` listener's port when `config.metrics_bind` is set.
    pub metrics_port: Option<u16>,
    pub db_name: String,
    pub client: reqwest::Client,
    pub db: tokio_postgres::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// A pool of this app's database, built as the server builds its own, for tests that call
    /// the library (the job queue) directly.
    pub fn pool(&self) -> deadpool_postgres::Pool {
        let config = base_config(&self.db_name);
        let pg = keymeter::db::pg_config(config.database_url().unwrap(), &config.database).unwrap();
        keymeter::db::build_pool(&pg, &config.database).unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn post_json(&self, path: &str, key: &str, body: Value) -> reqwest::Response {
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

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.get_with_key(path, ADMIN_TOKEN).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.post_json(path, ADMIN_TOKEN, body).await
    }

    /// `POST /v1/signup`, without a key.
    pub async fn signup(&self, email: &str, password: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/signup"))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await
            .expect("request sent")
    }

    /// `POST /v1/login`, without a key.
    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/login"))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await
            .expect("request sent")
    }

    /// A synchronous scrape (`POST /v1/scrape`).
    pub async fn scrape(&self, key: &str, body: Value) -> reqwest::Response {
        self.post_json("/v1/scrape", key, body).await
    }

    /// Polls `GET /v1/jobs/{id}` until the job's status is one of `want` (30 s at most).
    pub async fn wait_for_job(&self, key: &str, id: &str, want: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job: Value = self
                .get_with_key(&format!("/v1/jobs/{id}"), key)
                .await
                .json()
                .await
                .expect("a job");
            if want.contains(&job["status"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {want:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the rate limiter answers through Redis (with `refuse`, it answers 503
    /// until the background connection is up).
    pub async fn wait_for_redis(&self) {
        let (_, probe) = self.create_account("free", 0).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.get_with_key("/v1/account", &probe).await.status() == 503 {
            assert!(Instant::now() < deadline, "never connected to Redis");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
        let body: Value = res.json().await.expect("json");
        (
            body["account_id"].as_str().unwrap().parse().unwrap(),
            body["api_key"].as_str().unwrap().to_owned(),
        )
    }

    /// A new key with `scopes` for an account, through the admin API: (key id, key).
    pub async fn create_key(&self, account: uuid::Uuid, scopes: &[&str]) -> (String, String) {
        let res = self
            .admin_post(
                &format!("/admin/accounts/{account}/keys"),
                serde_json::json!({"scopes": scopes}),
            )
            .await;
        assert_eq!(res.status(), 201, "create key");
        let body: Value = res.json().await.expect("json");
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
