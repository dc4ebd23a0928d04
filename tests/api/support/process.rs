//! The real `keymeter` binary, run as an operator runs it: a clean environment (nothing
//! inherited from the developer's shell), its exit code and output, a server started on a
//! free port whose log lines the test reads, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::db::database_url;

/// The binary with no `KEYMETER_*` or `DATABASE_URL` inherited and no stdin.
pub fn keymeter() -> Command {
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

/// Runs `c` to its end (killed, and the test failed, after `limit`): (exit code, stdout,
/// stderr).
pub fn run_to_end(mut c: Command, limit: Duration) -> (i32, String, String) {
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

/// [`keymeter`] on the test database `db`.
pub fn keymeter_on(db: &str) -> Command {
    let mut c = keymeter();
    c.env("DATABASE_URL", database_url(db));
    c
}

/// Starts `keymeter serve` on the test database `db` and a free port; returns the child, its port,
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

/// Asks the server to stop, as an orchestrator does.
pub fn sigterm(child: &Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill");
}

/// Waits for the exit code (the child is killed, and the test failed, after `limit`).
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
