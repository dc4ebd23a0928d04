//! TLS to PostgreSQL against the real local server with `ssl = on` (scripts/test.sh turns it
//! on with Debian's snakeoil certificate when it is off): every session the app opens — the
//! pool, the LISTEN connection, migrations, the CLI — is encrypted when `sslmode` asks for
//! it, which the server itself reports in `pg_stat_ssl`; the verifying modes check the
//! certificate they promise to check, and refuse one they cannot trust with a clear error.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keymeter::config::Config;
use keymeter::startup::Application;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};

use crate::support::app::{base_config, base_env};
use crate::support::db::{admin_client, create_database, database_url, drop_database_blocking};
use crate::support::process::{keymeter, run_to_end};
use crate::support::{spawn_app_with, TestApp};

/// One session of the app as the server sees it.
#[derive(Debug)]
struct Session {
    pid: i32,
    ssl: bool,
    version: Option<String>,
    cipher: Option<String>,
    query: String,
}

/// The app's sessions on `db` (it names itself `keymeter`; the test's own connections do
/// not), from `pg_stat_activity` joined with `pg_stat_ssl`.
async fn app_sessions(db: &str) -> Vec<Session> {
    admin_client()
        .await
        .query(
            "SELECT a.pid, s.ssl, s.version, s.cipher, left(a.query, 60)
               FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
              WHERE a.datname = $1 AND a.application_name = 'keymeter'
              ORDER BY a.pid",
            &[&db],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| Session {
            pid: r.get(0),
            ssl: r.get(1),
            version: r.get(2),
            cipher: r.get(3),
            query: r.get::<_, Option<String>>(4).unwrap_or_default(),
        })
        .collect()
}

/// Waits until the app's LISTEN connection is up and a pooled connection has served a
/// request, then returns its sessions: both kinds are in the list the test judges.
async fn sessions_with_listen(app: &TestApp) -> Vec<Session> {
    let res = app.get("/health/ready").await;
    assert_eq!(res.status(), 200, "ready");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sessions = app_sessions(&app.db_name).await;
        if sessions.iter().any(|s| s.query.starts_with("LISTEN")) && sessions.len() >= 2 {
            for s in &sessions {
                eprintln!(
                    "pg_stat_ssl: pid={} ssl={} version={:?} cipher={:?} query={:?}",
                    s.pid, s.ssl, s.version, s.cipher, s.query
                );
            }
            return sessions;
        }
        assert!(
            Instant::now() < deadline,
            "the LISTEN connection never showed up: {sessions:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The test database `config` points at.
fn db_of(config: &Config) -> String {
    let url = config.database.url.as_ref().expect("a database URL");
    url.expose_secret().rsplit('/').next().unwrap().to_owned()
}

fn set_url(config: &mut Config, url: String) {
    config.database.url = Some(SecretString::from(url));
}

/// `DATABASE_URL` for a test database with extra query parameters.
fn url_with(db: &str, params: &str) -> String {
    format!("{}?{params}", database_url(db))
}

/// The certificate the test server presents (its `ssl_cert_file`, readable on this
/// machine) and the first DNS name it is issued for.
async fn server_certificate() -> (PathBuf, String) {
    let row = admin_client()
        .await
        .query_one(
            "SELECT current_setting('ssl'), current_setting('ssl_cert_file'), current_setting('data_directory')",
            &[],
        )
        .await
        .expect("server settings");
    let (ssl, file, data): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        ssl, "on",
        "the test server must have ssl = on (scripts/test.sh turns it on)"
    );
    let path = PathBuf::from(data).join(file); // an absolute `file` replaces `data`
    let der = CertificateDer::from_pem_file(&path)
        .unwrap_or_else(|e| panic!("read the server certificate {}: {e}", path.display()));
    let cert = webpki::EndEntityCert::try_from(&der).expect("parse the server certificate");
    let name = cert
        .valid_dns_names()
        .next()
        .expect("the server certificate names a host in subjectAltName")
        .to_owned();
    (path, name)
}

/// The test database reached by the host name in the server's certificate, connecting to
/// the test server's address (`hostaddr`) whatever that name resolves to here.
fn url_by_certificate_name(db: &str, name: &str, mode: &str) -> String {
    let mut url = url::Url::parse(&database_url(db)).expect("TEST_DATABASE_URL is a URL");
    let host = url.host_str().expect("a host").to_owned();
    let port = url.port().unwrap_or(5432);
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .expect("resolve the test server")
        .next()
        .expect("an address")
        .ip();
    url.set_host(Some(name)).expect("set host");
    url.query_pairs_mut()
        .append_pair("sslmode", mode)
        .append_pair("hostaddr", &addr.to_string());
    url.to_string()
}

/// Builds the app on a fresh database with `customise` applied, expecting start-up to fail;
/// returns the error's text.
async fn start_up_error(customise: impl FnOnce(&mut Config)) -> String {
    let db = create_database().await;
    let mut config = base_config(&db);
    config.database.startup_retry = Duration::from_secs(2);
    customise(&mut config);
    let result = Application::build(config).await.map(|_| ());
    drop_database_blocking(&db);
    format!("{:#}", result.expect_err("start-up must fail"))
}

fn fixture(name: &str) -> String {
    format!("{}/tests/api/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn sslmode_require_encrypts_every_session_the_app_opens() {
    let app = spawn_app_with(|c| {
        let db = db_of(c);
        set_url(c, url_with(&db, "sslmode=require"));
    })
    .await;
    let sessions = sessions_with_listen(&app).await;
    assert!(
        sessions.iter().all(|s| s.ssl),
        "every session of the app is encrypted: {sessions:?}"
    );
    assert!(sessions.iter().all(|s| s.version.is_some()), "{sessions:?}");
}

#[tokio::test]
async fn the_default_sslmode_prefer_encrypts_when_the_server_offers_tls() {
    // No sslmode in DATABASE_URL: libpq's default, prefer.
    let app = spawn_app_with(|_| {}).await;
    let sessions = sessions_with_listen(&app).await;
    assert!(sessions.iter().all(|s| s.ssl), "{sessions:?}");
}

/// A guard, not a fix: `disable` kept working before TLS existed and must keep working.
#[tokio::test]
async fn sslmode_disable_still_connects_in_plaintext() {
    let app = spawn_app_with(|c| {
        let db = db_of(c);
        set_url(c, url_with(&db, "sslmode=disable"));
    })
    .await;
    let sessions = sessions_with_listen(&app).await;
    assert!(sessions.iter().all(|s| !s.ssl), "{sessions:?}");
}

#[tokio::test]
async fn verify_full_trusts_the_configured_ca_for_the_host_it_names() {
    let (cert, name) = server_certificate().await;
    let app = spawn_app_with(|c| {
        let db = db_of(c);
        set_url(c, url_by_certificate_name(&db, &name, "verify-full"));
        c.database.ca_file = Some(cert.clone());
    })
    .await;
    let sessions = sessions_with_listen(&app).await;
    assert!(sessions.iter().all(|s| s.ssl), "{sessions:?}");
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let (cert, _name) = server_certificate().await;
    let ca = cert.to_string_lossy().into_owned();
    // By address: the certificate names a host, not 127.0.0.1.
    let err = start_up_error(|c| {
        let db = db_of(c);
        set_url(c, url_with(&db, "sslmode=verify-full"));
        c.database.ca_file = Some(ca.clone().into());
    })
    .await;
    assert!(err.contains("certificate was refused"), "{err}");
    assert!(err.contains("not valid for name"), "{err}");

    let app = spawn_app_with(|c| {
        let db = db_of(c);
        set_url(c, url_with(&db, "sslmode=verify-ca"));
        c.database.ca_file = Some(ca.clone().into());
    })
    .await;
    let sessions = sessions_with_listen(&app).await;
    assert!(sessions.iter().all(|s| s.ssl), "{sessions:?}");
}

#[tokio::test]
async fn verify_full_against_a_wrong_ca_stops_start_up_with_a_clear_error() {
    let (_cert, name) = server_certificate().await;
    let wrong_ca = fixture("unrelated-ca.pem");
    let err = start_up_error(|c| {
        let db = db_of(c);
        set_url(c, url_by_certificate_name(&db, &name, "verify-full"));
        c.database.ca_file = Some(wrong_ca.clone().into());
    })
    .await;
    eprintln!("start-up error: {err}");
    assert!(err.contains("certificate was refused"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(
        err.contains(&format!("KEYMETER_DB_CA_FILE={wrong_ca}")),
        "names the setting to fix: {err}"
    );

    // Without a CA file the public roots are used, and a self-signed server is refused too.
    let err = start_up_error(|c| {
        let db = db_of(c);
        set_url(c, url_by_certificate_name(&db, &name, "verify-full"));
    })
    .await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("public roots"), "{err}");
}

#[tokio::test]
async fn migrate_and_the_admin_cli_connect_with_sslmode_require() {
    let db = create_database().await;
    let url = url_with(&db, "sslmode=require");
    let mut c = keymeter();
    c.arg("migrate").env("DATABASE_URL", &url);
    let (code, out, err) = run_to_end(c, Duration::from_secs(60));
    assert_eq!(code, 0, "migrate: {out}{err}");
    let mut c = keymeter();
    c.args([
        "admin",
        "create-account",
        "--email",
        "tls@example.com",
        "--tier",
        "free",
        "--json",
    ])
    .env("DATABASE_URL", &url);
    let (code, out, err) = run_to_end(c, Duration::from_secs(60));
    assert_eq!(code, 0, "admin: {out}{err}");
    assert!(out.contains("api_key"), "{out}");
    drop_database_blocking(&db);
}

/// How the variables are parsed, so from the environment map rather than the typed config.
#[tokio::test]
async fn an_unreadable_ca_file_stops_start_up_naming_the_variable() {
    let db = create_database().await;
    let mut env = base_env(&db);
    drop_database_blocking(&db);
    env.insert(
        "KEYMETER_DB_CA_FILE".into(),
        "/nonexistent/keymeter-ca.pem".into(),
    );
    let err = Config::from_source(&env).expect_err("refused").to_string();
    assert!(err.starts_with("KEYMETER_DB_CA_FILE: "), "{err}");
    let mut env = base_env(&db);
    env.insert(
        "DATABASE_URL".into(),
        "postgres://u:hunter2@127.0.0.1/db?sslmode=verify-everything".into(),
    );
    let err = Config::from_source(&env).expect_err("refused").to_string();
    assert!(err.starts_with("DATABASE_URL: sslmode"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
