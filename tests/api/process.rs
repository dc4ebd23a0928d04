//! The real binary as an operator runs it: configuration errors, an unreachable database,
//! and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::db::{create_database, database_url, drop_database_blocking};
use crate::support::process::{keymeter, run_to_end, sigterm, start_server, wait_exit};
use crate::support::ADMIN_TOKEN;

#[test]
fn a_malformed_value_stops_start_up_with_one_line_naming_it() {
    for (var, value) in [
        ("KEYMETER_BIND", "not-an-address"),
        ("KEYMETER_BODY_LIMIT", "lots"),
        ("KEYMETER_ENV", "staging"),
        ("KEYMETER_LOG_FORMAT", "xml"),
        ("KEYMETER_DB_POOL_SIZE", "0"),
    ] {
        let mut c = keymeter();
        c.arg("serve")
            .env(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )
            .env(var, value);
        let (code, _out, err) = run_to_end(c, Duration::from_secs(10));
        assert_eq!(code, 2, "{var}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{var}: exactly one line, got {err:?}");
        assert!(lines[0].contains(var), "{var}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("backtrace"), "{err}");
    }
}

#[test]
fn a_missing_database_url_is_named() {
    let mut c = keymeter();
    c.arg("serve");
    let (code, _out, err) = run_to_end(c, Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");
}

#[test]
fn a_database_url_with_a_password_is_never_echoed() {
    let mut c = keymeter();
    c.arg("serve").env(
        "DATABASE_URL",
        "postgres://user:hunter2@127.0.0.1:notaport/db",
    );
    let (code, _out, err) = run_to_end(c, Duration::from_secs(10));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn an_unreachable_database_is_retried_then_reported() {
    let mut c = keymeter();
    c.arg("serve")
        .env(
            "DATABASE_URL",
            "postgres://postgres:hunter2@127.0.0.1:1/nowhere",
        )
        .env("KEYMETER_DB_STARTUP_RETRY_SECS", "2")
        .env("KEYMETER_LOG_FORMAT", "json");
    let started = Instant::now();
    let (code, _out, err) = run_to_end(c, Duration::from_secs(20));
    assert_ne!(code, 0, "{err}");
    assert!(started.elapsed() >= Duration::from_secs(2), "it retried");
    assert!(
        err.contains("could not reach PostgreSQL at 127.0.0.1:1/nowhere"),
        "{err}"
    );
    assert!(err.contains("retrying"), "a log line per try: {err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn sigterm_stops_the_server_with_exit_code_0() {
    let db = create_database().await;
    let (mut child, port, logs) = start_server(&db, &[]);
    let res = reqwest::get(format!("http://127.0.0.1:{port}/health/ready"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    sigterm(&child);
    let code = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(code, 0);
    let all: Vec<String> = logs.try_iter().collect();
    assert!(all.iter().any(|l| l.contains("stopped")), "{all:?}");
    drop_database_blocking(&db);
}

#[tokio::test]
async fn serve_refuses_a_database_with_an_unknown_migration() {
    let db = create_database().await;
    // Migrate once through the binary, then record a migration this binary never had.
    let mut c = keymeter();
    c.arg("migrate").env("DATABASE_URL", database_url(&db));
    let (code, out, err) = run_to_end(c, Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied V1__"), "{out}");
    let (client, conn) = tokio_postgres::connect(&database_url(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (9999, 'from_the_future', '2026-11-23T09:37:41.098830113Z', '1')",
        )
        .await
        .unwrap();
    for auto in ["true", "false"] {
        let mut c = keymeter();
        c.arg("serve")
            .env("DATABASE_URL", database_url(&db))
            .env("KEYMETER_BIND", "127.0.0.1:0")
            .env("KEYMETER_AUTO_MIGRATE", auto);
        let (code, _out, err) = run_to_end(c, Duration::from_secs(30));
        assert_ne!(code, 0, "auto_migrate={auto}: {err}");
        assert!(
            err.contains("from_the_future") || err.contains("9999"),
            "{err}"
        );
    }
    drop(client);
    drop_database_blocking(&db);
}

#[tokio::test]
async fn admin_create_account_json_prints_only_the_account_and_key() {
    let db = create_database().await;
    let mut c = keymeter();
    c.arg("migrate").env("DATABASE_URL", database_url(&db));
    assert_eq!(run_to_end(c, Duration::from_secs(30)).0, 0);
    let mut c = keymeter();
    c.args([
        "admin",
        "create-account",
        "--email",
        "ops@example.com",
        "--tier",
        "pro",
        "--credits",
        "42",
        "--json",
    ])
    .env("DATABASE_URL", database_url(&db));
    let (code, out, err) = run_to_end(c, Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).expect("stdout is one JSON document");
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{out}");
    let account = obj["account_id"].as_str().unwrap().to_owned();
    assert!(obj["api_key"].as_str().unwrap().starts_with("km_live_"));

    // The other admin commands against the same account.
    for args in [
        vec![
            "admin",
            "set-tier",
            "--account",
            &account,
            "--tier",
            "business",
        ],
        vec!["admin", "suspend", "--account", &account],
        vec!["admin", "unsuspend", "--account", &account],
        vec![
            "admin",
            "grant-credits",
            "--account",
            &account,
            "--amount",
            "8",
            "--reason",
            "goodwill",
        ],
        vec![
            "admin",
            "grant-credits",
            "--account",
            &account,
            "--amount",
            "-50",
            "--reason",
            "correction",
        ],
    ] {
        let mut c = keymeter();
        c.args(&args).env("DATABASE_URL", database_url(&db));
        let (code, out, err) = run_to_end(c, Duration::from_secs(30));
        assert_eq!(code, 0, "{args:?}: {out} {err}");
    }
    let mut c = keymeter();
    c.args([
        "admin",
        "create-key",
        "--account",
        &account,
        "--scopes",
        "scrape",
        "--json",
    ])
    .env("DATABASE_URL", database_url(&db));
    let (code, out, err) = run_to_end(c, Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");
    let k: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    let mut c = keymeter();
    c.args(["admin", "revoke-key", "--key", &key_id])
        .env("DATABASE_URL", database_url(&db));
    assert_eq!(run_to_end(c, Duration::from_secs(30)).0, 0);

    // An adjustment below zero is refused and changes nothing.
    let mut c = keymeter();
    c.args([
        "admin",
        "grant-credits",
        "--account",
        &account,
        "--amount",
        "-1000",
        "--reason",
        "x",
    ])
    .env("DATABASE_URL", database_url(&db));
    let (code, _out, err) = run_to_end(c, Duration::from_secs(30));
    assert_ne!(code, 0);
    assert!(err.contains("below zero"), "{err}");

    let (client, conn) = tokio_postgres::connect(&database_url(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT a.tier, a.status, a.credit_balance, (SELECT sum(delta) FROM credit_ledger l WHERE l.account_id = a.id)::bigint
               FROM accounts a WHERE a.id = $1::text::uuid",
            &[&account],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "business");
    assert_eq!(row.get::<_, String>(1), "active");
    assert_eq!(row.get::<_, i64>(2), 0);
    assert_eq!(row.get::<_, i64>(3), 0);
    let revoked: bool = client
        .query_one(
            "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1",
            &[&key_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(revoked);
    drop(client);
    drop_database_blocking(&db);
}

#[tokio::test]
async fn keys_and_passwords_never_reach_the_logs() {
    let db = create_database().await;
    let (mut child, port, logs) = start_server(&db, &[("KEYMETER_LOG", "debug")]);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let res = http
        .post(format!("{base}/v1/signup"))
        .json(&serde_json::json!({"email": "log@example.com", "password": "sup3r-secret-pw"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = res.json().await.unwrap();
    let key = body["api_key"]["key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        http.get(format!("{base}/v1/account"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
    }
    let _ = http
        .post(format!("{base}/v1/login"))
        .json(&serde_json::json!({"email": "log@example.com", "password": "wrong-secret-pw"}))
        .send()
        .await
        .unwrap();
    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0);
    std::thread::sleep(Duration::from_millis(200));
    let all: String = logs.try_iter().collect::<Vec<_>>().join("\n");
    assert!(
        all.contains(&key[8..20]),
        "the key id is logged (it is public)"
    );
    assert!(!all.contains(&key[21..64]), "no key secret in logs");
    assert!(
        !all.contains("sup3r-secret-pw") && !all.contains("wrong-secret-pw"),
        "no password in logs"
    );
    drop_database_blocking(&db);
}

#[tokio::test]
async fn dev_starts_its_own_postgres_and_prints_a_working_demo_key() {
    let dir = std::env::temp_dir().join(format!("keymeter-dev-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = keymeter();
    c.arg("dev")
        .current_dir(&dir)
        .env("KEYMETER_BIND", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn keymeter dev");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut base, mut key) = (None, None);
    while base.is_none() || key.is_none() {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keymeter dev did not print its address and key");
        };
        if let Some(b) = line.split("serving on ").nth(1) {
            base = Some(b.trim().to_owned());
        }
        if line.trim().starts_with("km_live_") {
            key = Some(line.trim().to_owned());
        }
    }
    let (base, key) = (base.unwrap(), key.unwrap());
    let res = reqwest::Client::new()
        .get(format!("{base}/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let acct: serde_json::Value = res.json().await.unwrap();
    assert_eq!(acct["email"], "demo@keymeter.dev");
    assert_eq!(acct["credit_balance"], 1000);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)), 0);
    // Its PostgreSQL was stopped with it.
    assert!(!dir.join(".keymeter/pgdata/postmaster.pid").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let db = create_database().await;
    let (mut child, port, _logs) = start_server(&db, &[("KEYMETER_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(format!("{base}/admin/accounts"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"email": "inflight@example.com", "tier": "internal", "credits": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let account = created["account_id"].as_str().unwrap().to_owned();
    let key = created["api_key"].as_str().unwrap().to_owned();

    // Hold the account's row lock so the next charge is certainly in flight, waiting on it.
    let (mut holder, conn) = tokio_postgres::connect(&database_url(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1::text::uuid FOR UPDATE",
        &[&account],
    )
    .await
    .unwrap();
    let in_flight = tokio::spawn({
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        async move {
            http.post(format!("{base}/v1/credits/charge"))
                .bearer_auth(key)
                .json(&serde_json::json!({"amount": 3}))
                .send()
                .await
        }
    });
    // Wait until the server's charge is blocked on the lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the charge never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // New connections are no longer accepted while it drains…
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    tx.commit().await.unwrap();
    // …and the in-flight request completes normally.
    let res = in_flight
        .await
        .unwrap()
        .expect("the in-flight request got an answer");
    assert_eq!(res.status(), 201);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0);
    let balance: i64 = holder
        .query_one(
            "SELECT credit_balance FROM accounts WHERE id = $1::text::uuid",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(balance, 7);
    drop(holder);
    drop_database_blocking(&db);
}

#[tokio::test]
async fn last_used_is_flushed_on_shutdown() {
    let db = create_database().await;
    let (mut child, port, logs) = start_server(&db, &[("KEYMETER_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(format!("{base}/admin/accounts"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"email": "flush@example.com", "tier": "internal"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    // Let the periodic flush pass first, so only the shutdown flush can record the use.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    let res = http
        .get(format!("{base}/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(15)), 0);
    let all: Vec<String> = logs.try_iter().collect();
    assert!(!all.iter().any(|l| l.contains("flush failed")), "{all:?}");
    let (client, conn) = tokio_postgres::connect(&database_url(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let used: bool = client
        .query_one(
            "SELECT last_used_at IS NOT NULL FROM api_keys WHERE id = $1",
            &[&&key[8..20]],
        )
        .await
        .unwrap()
        .get(0);
    assert!(used, "the use right before SIGTERM was written");
    drop(client);
    drop_database_blocking(&db);
}
