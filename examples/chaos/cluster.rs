//! The processes of the run and the faults done to them: the run's own PostgreSQL (a cluster
//! `load/chaos/run.sh` initdb'd on a free port — never the shared server), its own
//! redis-server, and three `keymeter serve` instances on them.
//!
//! Every child is started with `kill_on_drop`, and its pid written to `<out>/pids`, so the
//! run leaves nothing behind even when it panics (run.sh's trap reads the file).

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// What run.sh prepared and how to reach it (all from the environment).
pub struct Settings {
    pub keymeter_bin: PathBuf,
    pub redis_bin: String,
    pub pg_ctl: PathBuf,
    pub pg_data: PathBuf,
    pub pg_port: u16,
    pub pg_log: PathBuf,
    /// `runuser -u <user> --` in front of pg_ctl when run as root (PostgreSQL refuses root).
    pub pg_runas: Option<String>,
    pub out_dir: PathBuf,
    pub admin_token: String,
    pub stripe_secret: String,
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn record_pid(out_dir: &std::path::Path, pid: Option<u32>) {
    if let Some(pid) = pid {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out_dir.join("pids"))
        {
            let _ = writeln!(f, "{pid}");
        }
    }
}

fn log_file(out_dir: &std::path::Path, name: &str) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out_dir.join(format!("{name}.log")))?)
}

async fn tcp_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

pub struct Cluster {
    pub s: Settings,
    pub redis_port: u16,
    pub upstream_port: u16,
    pub ports: Vec<u16>,
    redis: Mutex<Option<Child>>,
    instances: Vec<Mutex<Option<Child>>>,
    http: reqwest::Client,
}

impl Cluster {
    pub fn new(s: Settings, upstream_port: u16, instances: usize) -> Result<Self> {
        let ports = (0..instances)
            .map(|_| free_port())
            .collect::<Result<Vec<_>>>()?;
        Ok(Cluster {
            redis_port: free_port()?,
            upstream_port,
            ports,
            s,
            redis: Mutex::new(None),
            instances: (0..instances).map(|_| Mutex::new(None)).collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        })
    }

    pub fn db_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/keymeter_chaos",
            self.s.pg_port
        )
    }

    pub fn base(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    // --- PostgreSQL ---------------------------------------------------------------------

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut c = match &self.s.pg_runas {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&self.s.pg_ctl);
                c
            }
            None => Command::new(&self.s.pg_ctl),
        };
        c.arg("-D").arg(&self.s.pg_data).args(args);
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    }

    pub async fn pg_start(&self) -> Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off \
             -c max_connections=200",
            self.s.pg_port
        );
        let log = self.s.pg_log.to_string_lossy().into_owned();
        let st = self
            .pg_ctl(&["-l", &log, "-w", "-t", "120", "-o", &opts, "start"])
            .status()
            .await
            .context("pg_ctl start")?;
        if !st.success() {
            bail!("pg_ctl start failed ({st}); see {log}");
        }
        Ok(())
    }

    pub async fn pg_stop(&self, immediate: bool) -> Result<()> {
        let mode = if immediate { "immediate" } else { "fast" };
        let st = self
            .pg_ctl(&["-m", mode, "-w", "-t", "60", "stop"])
            .status()
            .await
            .context("pg_ctl stop")?;
        if !st.success() {
            bail!("pg_ctl stop -m {mode} failed ({st})");
        }
        Ok(())
    }

    pub async fn create_database(&self) -> Result<()> {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.s.pg_port);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute("CREATE DATABASE keymeter_chaos")
            .await?;
        Ok(())
    }

    // --- Redis --------------------------------------------------------------------------

    pub async fn redis_start(&self) -> Result<()> {
        let log = log_file(&self.s.out_dir, "redis")?;
        let port = self.redis_port.to_string();
        let child = Command::new(&self.s.redis_bin)
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        record_pid(&self.s.out_dir, child.id());
        *self.redis.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let t0 = Instant::now();
        while !tcp_open(self.redis_port).await {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not listen within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub async fn redis_kill(&self) {
        let child = self.redis.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut c) = child {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    // --- keymeter -----------------------------------------------------------------------

    pub async fn start_instance(&self, i: usize) -> Result<()> {
        let log = log_file(&self.s.out_dir, &format!("instance-{i}"))?;
        let allow = format!("127.0.0.1:{0},localhost:{0}", self.upstream_port);
        let mut cmd = Command::new(&self.s.keymeter_bin);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", self.db_url())
            .env("KEYMETER_ENV", "development")
            .env("KEYMETER_BIND", format!("127.0.0.1:{}", self.ports[i]))
            .env("KEYMETER_LOG", "warn")
            .env("KEYMETER_LOG_FORMAT", "json")
            .env("KEYMETER_ADMIN_TOKEN", &self.s.admin_token)
            .env("KEYMETER_SCRAPE_ALLOW", allow)
            .env("KEYMETER_RATE_LIMIT_BACKEND", "redis")
            .env(
                "REDIS_URL",
                format!("redis://127.0.0.1:{}/", self.redis_port),
            )
            .env("STRIPE_WEBHOOK_SECRET", &self.s.stripe_secret)
            .env("STRIPE_SECRET_KEY", "sk_test_chaos_stub")
            .env(
                "STRIPE_API_BASE",
                format!("http://127.0.0.1:{}/stripe", self.upstream_port),
            )
            .env(
                "KEYMETER_CREDIT_PACKS",
                format!("chaos:price_chaos:{PACK_CREDITS}"),
            )
            // Short enough that a stall (SIGSTOP) outlives it, and that the settle phase
            // (three leases) stays short.
            .env("KEYMETER_JOB_LEASE_SECS", LEASE_SECS.to_string())
            .env("KEYMETER_JOB_POLL_MS", "250")
            // An abandoned idempotency claim is taken over after 1.2 × this: the clients'
            // retries must be able to outlast it.
            .env(
                "KEYMETER_REQUEST_TIMEOUT_SECS",
                REQUEST_TIMEOUT_SECS.to_string(),
            )
            .env("KEYMETER_SHUTDOWN_TIMEOUT_SECS", "2")
            .env("KEYMETER_JOB_WORKERS", "4")
            .env("KEYMETER_HTTP_WORKERS", "2")
            .env("KEYMETER_DB_POOL_SIZE", "12")
            .env("KEYMETER_JOB_WEBHOOK_RETRY_MS", "500")
            // One client address for everything: the per-IP limits would otherwise refuse
            // the run's own traffic (the revocation probes fail authentication on purpose).
            .env("KEYMETER_IP_RATE_PER_MINUTE", "1000000")
            .env("KEYMETER_IP_BURST", "100000")
            .env("KEYMETER_AUTH_FAILURES_PER_MINUTE", "1000000")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting keymeter serve")?;
        record_pid(&self.s.out_dir, child.id());
        *self.instances[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        self.wait_live(i, Duration::from_secs(90)).await
    }

    /// Waits for `/health/live` (the process serves; it may still be without PostgreSQL).
    pub async fn wait_live(&self, i: usize, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/health/live", self.base(i)))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some((_, st)) = self.exited().into_iter().find(|(j, _)| *j == i) {
                bail!("instance {i} exited during start-up ({st}); see instance-{i}.log");
            }
            if t0.elapsed() > limit {
                bail!("instance {i} did not answer /health/live within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for `/health/ready` on every instance (the database is back for all of them).
    pub async fn wait_ready_all(&self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        for i in 0..self.ports.len() {
            loop {
                let ok = match self
                    .http
                    .get(format!("{}/health/ready", self.base(i)))
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success(),
                    Err(_) => false,
                };
                if ok {
                    break;
                }
                if t0.elapsed() > limit {
                    bail!("instance {i} is not ready after {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    fn pid(&self, i: usize) -> Option<i32> {
        self.instances[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|c| c.id())
            .map(|p| p as i32)
    }

    pub async fn kill_instance(&self, i: usize) {
        let child = self.instances[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut c) = child {
            let _ = c.start_kill(); // SIGKILL
            let _ = c.wait().await;
        }
    }

    pub fn signal(&self, i: usize, sig: i32) -> bool {
        match self.pid(i) {
            // SAFETY: kill(2) on our own child's pid, with a valid signal number.
            Some(pid) => unsafe { libc::kill(pid, sig) == 0 },
            None => false,
        }
    }

    /// Whether instance `i`'s process has exited on its own (a crash): (index, status).
    pub fn exited(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, m) in self.instances.iter().enumerate() {
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = g.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    out.push((i, st.to_string()));
                }
            }
        }
        out
    }

    /// Stops everything this process started (PostgreSQL last, cleanly).
    pub async fn shutdown(&self) {
        for i in 0..self.instances.len() {
            self.signal(i, libc::SIGCONT);
            self.signal(i, libc::SIGTERM);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..self.instances.len() {
            let child = self.instances[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(mut c) = child {
                let _ = tokio::time::timeout(Duration::from_secs(8), c.wait()).await;
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
        self.redis_kill().await;
        let _ = self.pg_stop(false).await;
    }
}

/// Credits in the one pack the run sells.
pub const PACK_CREDITS: i64 = 100;
pub const LEASE_SECS: u64 = 4;
pub const REQUEST_TIMEOUT_SECS: u64 = 10;
