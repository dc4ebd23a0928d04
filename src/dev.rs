//! `keymeter dev`: a PostgreSQL of its own for trying keymeter out.
//!
//! When `DATABASE_URL` is unset, this initialises a cluster under `./.keymeter/pgdata` with
//! the machine's PostgreSQL binaries, starts it on a free loopback port (no Unix socket, so
//! it never collides with a system server), and stops it when keymeter exits. PostgreSQL
//! refuses to run as root, so as root the cluster belongs to the `postgres` system user and
//! its commands run through `runuser`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

pub struct EmbeddedPostgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    as_postgres_user: bool,
    running: bool,
}

fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("KEYMETER_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL server binaries (initdb, pg_ctl) not found; install them (apt-get install postgresql) or set DATABASE_URL")
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl EmbeddedPostgres {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_postgres_user = unsafe { libc::geteuid() } == 0;
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        Ok(EmbeddedPostgres {
            bin: find_bin_dir()?,
            data: root.join("pgdata"),
            log: root.join("postgres.log"),
            port: 0,
            as_postgres_user,
            running: false,
        })
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, mut cmd: Command, what: &str) -> anyhow::Result<()> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }

    /// Initialises the cluster on first use, then starts it on a free port.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let root = self
            .data
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        if self.as_postgres_user {
            self.run(
                {
                    let mut c = Command::new("chown");
                    c.arg("-R").arg("postgres:postgres").arg(&root);
                    c
                },
                "chown of the dev data directory",
            )?;
        }
        if !self.data.join("PG_VERSION").exists() {
            eprintln!(
                "keymeter dev: initialising PostgreSQL in {}",
                self.data.display()
            );
            let mut c = self.command("initdb");
            c.arg("-D").arg(&self.data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            self.run(c, "initdb")?;
        }
        // A previous run killed hard may have left its server up: stop it first.
        let mut status = self.command("pg_ctl");
        status.arg("-D").arg(&self.data).arg("status");
        if status
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            self.stop_quietly();
        }
        self.port = free_port()?;
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off",
                self.port
            ))
            .arg("start");
        self.run(c, "pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn stop_quietly(&self) {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }

    pub fn stop(&mut self) {
        if self.running {
            self.stop_quietly();
            self.running = false;
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `name` on the server at `admin_url` unless it exists.
pub async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let (client, conn) = crate::db::PgConnect::from_url(admin_url, None)?
        .connect()
        .await
        .context("connecting to the dev PostgreSQL")?;
    tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .context("creating the dev database")?;
    }
    Ok(())
}
