//! The real binary as an operator runs it: configuration errors, an unreachable database,
//! and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::{create_database, database_url, drop_database_blocking};

fn keymeter() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keymeter"));
    // Start from a clean slate: nothing inherited from the developer's shell.
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYMETER_") || k == "DATABASE_URL" {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

fn run_to_end(mut c: Command, limit: Duration) -> (i32, String, String) {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keymeter");
    let started = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().expect("wait") {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("keymeter did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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

/// Starts `keymeter serve` on a fresh database and a free port; returns the child, its port,
/// and a channel of its stderr lines.
pub fn start_server(db: &str, extra: &[(&str, &str)]) -> (Child, u16, mpsc::Receiver<String>) {
    let mut c = keymeter();
    c.arg("serve")
        .env("DATABASE_URL", database_url(db))
        .env("KEYMETER_BIND", "127.0.0.1:0")
        .env("KEYMETER_LOG_FORMAT", "json")
        .env("KEYMETER_HTTP_WORKERS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn keymeter serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keymeter did not log that it listens");
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["message"] == "listening" {
                let port = v["port"].as_u64().expect("port field") as u16;
                return (child, port, rx);
            }
        }
    }
}

pub fn sigterm(child: &Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill");
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("keymeter did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
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
