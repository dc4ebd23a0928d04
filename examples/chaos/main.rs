//! The randomized fault run (issue #19): three `keymeter serve` instances on one PostgreSQL
//! and one Redis of the run's own, clients doing what customers do, faults drawn from a
//! printed seed, and a checker that reads everything back. Run it with
//! `load/chaos/run.sh` (which builds it, initdb's the PostgreSQL cluster and cleans up);
//! `SEED=<n>` replays a schedule, `DURATION=<secs>` sets the length (default 60).
//!
//! Layout: `schedule` (the seeded faults), `cluster` (the processes and the faults done to
//! them), `upstream` (pages, receivers, Stripe API stand-in), `workload` (the clients and
//! what they record), `checker` (the invariants).
//!
//! Exit code: 0 when the checker found no violation, 1 when it found any, 2 when the run
//! itself could not be carried out.

mod checker;
mod cluster;
mod schedule;
mod upstream;
mod workload;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use cluster::{Cluster, Settings, LEASE_SECS};
use schedule::{Fault, Scheduled};
use workload::{Account, Ctx, Op, Outcome};

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    #[serde(flatten)]
    pub planned: Scheduled,
    pub started_ms: u64,
    /// When the target was whole again (restarted and answering); `None`: it was not.
    pub healed_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub postgres: bool,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_required(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set (run load/chaos/run.sh)"))
}

fn settings() -> Result<Settings> {
    Ok(Settings {
        keymeter_bin: PathBuf::from(env_required("CHAOS_KEYMETER_BIN")?),
        redis_bin: env_or("CHAOS_REDIS_SERVER", "redis-server"),
        pg_ctl: PathBuf::from(env_required("CHAOS_PG_CTL")?),
        pg_data: PathBuf::from(env_required("CHAOS_PG_DATA")?),
        pg_port: env_required("CHAOS_PG_PORT")?
            .parse()
            .context("CHAOS_PG_PORT")?,
        pg_log: PathBuf::from(env_required("CHAOS_PG_LOG")?),
        pg_runas: std::env::var("CHAOS_PG_RUNAS")
            .ok()
            .filter(|s| !s.is_empty()),
        out_dir: PathBuf::from(env_required("CHAOS_OUT_DIR")?),
        admin_token: "chaos-admin-token-0123456789abcdef0123".to_owned(),
        stripe_secret: "whsec_chaos_0123456789abcdef".to_owned(),
    })
}

/// Carries out one scheduled fault, from its start to the target's recovery.
async fn inject(
    cluster: Arc<Cluster>,
    world: Arc<upstream::World>,
    t0: Instant,
    s: Scheduled,
) -> FaultRecord {
    let wait = Duration::from_millis(s.at_ms).saturating_sub(t0.elapsed());
    tokio::time::sleep(wait).await;
    let now = || t0.elapsed().as_millis() as u64;
    let mut rec = FaultRecord {
        planned: s.clone(),
        started_ms: now(),
        healed_ms: None,
        error: None,
        postgres: matches!(s.fault, Fault::RestartPostgres { .. }),
    };
    let result: Result<()> = async {
        match s.fault {
            Fault::KillInstance { instance, down_ms } => {
                cluster.kill_instance(instance).await;
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                restart_instance(&cluster, instance).await?;
            }
            Fault::StopInstance { instance, stall_ms } => {
                if !cluster.signal(instance, libc::SIGSTOP) {
                    bail!("instance {instance} has no process to stop");
                }
                tokio::time::sleep(Duration::from_millis(stall_ms)).await;
                cluster.signal(instance, libc::SIGCONT);
            }
            Fault::RestartPostgres { immediate, down_ms } => {
                cluster.pg_stop(immediate).await?;
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                cluster.pg_start().await?;
            }
            Fault::RestartRedis { down_ms } => {
                cluster.redis_kill().await;
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                cluster.redis_start().await?;
            }
            Fault::SlowUpstream { delay_ms, for_ms } => {
                world
                    .delay_ms
                    .store(delay_ms, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(for_ms)).await;
                world
                    .delay_ms
                    .store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => rec.healed_ms = Some(now()),
        Err(e) => rec.error = Some(format!("{e:#}")),
    }
    println!(
        "  fault at +{:>6} ms: {} — {}",
        rec.started_ms,
        serde_json::to_string(&rec.planned.fault).unwrap_or_default(),
        match (&rec.healed_ms, &rec.error) {
            (Some(h), _) => format!("healed at +{h} ms"),
            (_, Some(e)) => format!("FAILED: {e}"),
            _ => "?".into(),
        }
    );
    rec
}

/// Starts instance `i` again; a start that fails (PostgreSQL away longer than the
/// instance's start-up retry) is tried again for up to a minute.
async fn restart_instance(cluster: &Cluster, i: usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        match cluster.start_instance(i).await {
            Ok(()) => return Ok(()),
            Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                eprintln!("restarting instance {i}: {e:#}; trying again");
                cluster.kill_instance(i).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The run's accounts, through the admin API, each with a webhook endpoint for its account
/// events at the run's receiver.
async fn create_accounts(cluster: &Cluster, n: usize) -> Result<Vec<Account>> {
    let http = reqwest::Client::new();
    let tiers = ["business", "pro", "business", "free", "business", "pro"];
    let mut out = Vec::new();
    for i in 0..n {
        let tier = tiers[i % tiers.len()];
        // Some accounts start nearly empty, so 402s (refusals that must charge nothing) happen.
        let credits = if i % 5 == 4 { 60 } else { 50_000 };
        let r = http
            .post(format!("{}/admin/accounts", cluster.base(0)))
            .bearer_auth(&cluster.s.admin_token)
            .json(
                &json!({"email": format!("chaos-{i}-{}@example.com", std::process::id()),
                          "tier": tier, "credits": credits}),
            )
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("POST /admin/accounts answered {status}: {v}");
        }
        let key = v["api_key"].as_str().unwrap_or_default().to_owned();
        // Counted, not judged: an event's deliveries are retried for a day, far longer than
        // the run settles.
        let r = http
            .post(format!("{}/v1/webhook-endpoints", cluster.base(0)))
            .bearer_auth(&key)
            .json(
                &json!({"url": format!("http://127.0.0.1:{}/events", cluster.upstream_port),
                          "events": ["credits.granted", "key.created", "key.revoked"]}),
            )
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "POST /v1/webhook-endpoints answered {}: {}",
                r.status(),
                r.text().await?
            );
        }
        out.push(Account {
            id: v["account_id"].as_str().unwrap_or_default().to_owned(),
            tier: tier.to_owned(),
            key,
        });
    }
    Ok(out)
}

/// Waits until no job is queued or running, at most `limit`.
async fn settle_jobs(db: &tokio_postgres::Client, limit: Duration) -> Result<(i64, Duration)> {
    let t0 = Instant::now();
    loop {
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')",
                &[],
            )
            .await?
            .get(0);
        if open == 0 || t0.elapsed() > limit {
            return Ok((open, t0.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Account events: every delivery keymeter marked delivered reached the receiver (which
/// answers 2xx to everything). Returns (deliveries queued, delivered, distinct received).
async fn check_account_events(
    db: &tokio_postgres::Client,
    world: &upstream::World,
    violations: &mut Vec<Value>,
) -> Result<(usize, usize, usize)> {
    let received: HashSet<String> = world
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    let rows = db
        .query(
            "SELECT event_id, delivered_at IS NOT NULL FROM event_deliveries",
            &[],
        )
        .await?;
    let mut delivered = 0;
    for r in &rows {
        let (id, done): (String, bool) = (r.get(0), r.get(1));
        if done {
            delivered += 1;
            if !received.contains(&id) {
                violations.push(json!({"rule": "account_event_delivered_means_received",
                                       "detail": {"event": id}}));
            }
        }
    }
    Ok((rows.len(), delivered, received.len()))
}

struct RunParams {
    seed: u64,
    duration_ms: u64,
    clients: u64,
    n_accounts: usize,
}

async fn run() -> Result<bool> {
    let seed: u64 = match std::env::var("SEED") {
        Ok(v) => v.parse().context("SEED must be an unsigned integer")?,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                % 1_000_000_000
        }
    };
    let duration_s: u64 = env_or("DURATION", "60")
        .parse()
        .context("DURATION (seconds)")?;
    let p = RunParams {
        seed,
        duration_ms: duration_s * 1000,
        clients: env_or("CLIENTS", "12").parse().context("CLIENTS")?,
        n_accounts: env_or("ACCOUNTS", "10").parse().context("ACCOUNTS")?,
    };
    let instances = 3;
    let s = settings()?;
    let plan = schedule::draw(seed, p.duration_ms, instances);
    println!(
        "chaos run: SEED={seed} DURATION={duration_s}s, {} clients, {} accounts, {instances} instances",
        p.clients, p.n_accounts
    );
    println!(
        "fault schedule ({} faults; the same seed gives the same schedule):",
        plan.len()
    );
    for f in &plan {
        println!("  +{:>6} ms  {}", f.at_ms, serde_json::to_string(&f.fault)?);
    }
    if std::env::var("PLAN_ONLY").is_ok_and(|v| v == "1") {
        return Ok(true);
    }
    let out_dir = s.out_dir.clone();
    std::fs::create_dir_all(&out_dir)?;

    let world = Arc::new(upstream::World::default());
    let upstream_port = upstream::start(world.clone())?;
    let cluster = Arc::new(Cluster::new(s, upstream_port, instances)?);
    let result = drive(&cluster, world, &p, plan).await;
    cluster.shutdown().await;
    let (report, ok) = result?;
    let path = out_dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("report: {}", path.display());
    Ok(ok)
}

async fn drive(
    cluster: &Arc<Cluster>,
    world: Arc<upstream::World>,
    p: &RunParams,
    plan: Vec<Scheduled>,
) -> Result<(Value, bool)> {
    cluster.pg_start().await?;
    cluster.create_database().await?;
    cluster.redis_start().await?;
    // One at a time: the first migrates, the others start on a migrated database.
    let instances = cluster.ports.len();
    for i in 0..instances {
        cluster.start_instance(i).await?;
    }
    cluster.wait_ready_all(Duration::from_secs(60)).await?;
    let accounts = create_accounts(cluster, p.n_accounts).await?;
    println!(
        "cluster up: instances on {:?}, PostgreSQL on {}, Redis on {}, upstream on {}",
        cluster.ports, cluster.s.pg_port, cluster.redis_port, cluster.upstream_port
    );

    let t0 = Instant::now();
    let ctx = Arc::new(Ctx::new(
        t0,
        p.seed,
        (0..instances).map(|i| cluster.base(i)).collect(),
        accounts.clone(),
        cluster.upstream_port,
        cluster.s.stripe_secret.clone(),
        p.duration_ms,
        p.duration_ms + 40_000,
    )?);
    let fault_tasks: Vec<_> = plan
        .into_iter()
        .map(|s| tokio::spawn(inject(cluster.clone(), world.clone(), t0, s)))
        .collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let stripe = tokio::spawn(ctx.clone().stripe(rx));
    let client_tasks: Vec<_> = (0..p.clients)
        .map(|n| tokio::spawn(ctx.clone().client(n, tx.clone())))
        .collect();
    drop(tx);
    for t in client_tasks {
        t.await?;
    }
    println!("workload over at +{} ms; settling", ctx.now());
    let mut faults = Vec::new();
    for t in fault_tasks {
        faults.push(t.await?);
    }
    stripe.await?;
    // A crash: an instance whose process ended without our SIGKILL. Started again so the
    // cluster can settle; judged by the checker.
    let crashed = cluster.exited();
    for (i, _) in &crashed {
        restart_instance(cluster, *i).await?;
    }
    cluster.wait_ready_all(Duration::from_secs(120)).await?;
    let (db, conn) = tokio_postgres::connect(&cluster.db_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // Three leases, plus the longest job timeout and the reaper's pace.
    let limit = Duration::from_secs(3 * LEASE_SECS + 4 + 15);
    let (open, settle_took) = settle_jobs(&db, limit).await?;
    println!(
        "settled in {} ms ({open} jobs still open)",
        settle_took.as_millis()
    );

    let ops = std::mem::take(&mut *ctx.ops.lock().unwrap_or_else(|e| e.into_inner()));
    let mut findings = checker::check(&db, &ops, &accounts, &faults, &crashed).await?;
    let once = world.once.lock().unwrap_or_else(|e| e.into_inner()).clone();
    checker::check_last_attempt(&db, &accounts, &once, &mut findings).await?;
    let (ev_queued, ev_delivered, ev_received) =
        check_account_events(&db, &world, &mut findings.violations).await?;
    write_ops(&cluster.s.out_dir, &ops)?;

    let mut per_kind: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    let mut attempts = 0usize;
    for op in &ops {
        attempts += op.attempts.len();
        let k = serde_json::to_value(op.kind)?
            .as_str()
            .unwrap_or("?")
            .to_owned();
        per_kind.entry(k).or_default()[match op.outcome {
            Outcome::Acked => 0,
            Outcome::Refused => 1,
            Outcome::Lost => 2,
        }] += 1;
    }
    let mut faults_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for f in &faults {
        let k = serde_json::to_value(&f.planned.fault)?["kind"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        *faults_by_kind.entry(k).or_default() += 1;
    }
    let failed_faults = faults.iter().filter(|f| f.error.is_some()).count();
    let hooks = world.hooks.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    for v in &findings.violations {
        *by_rule
            .entry(v["rule"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let n_violations = findings.violations.len();
    let ok = n_violations == 0 && failed_faults == 0;

    println!();
    println!("SUMMARY seed={} duration={}s", p.seed, p.duration_ms / 1000);
    println!(
        "  operations: {} ({attempts} HTTP attempts); by kind [acknowledged, refused, answer lost]:",
        ops.len()
    );
    for (k, v) in &per_kind {
        println!("    {k:<16} {v:?}");
    }
    println!(
        "  faults injected: {} {faults_by_kind:?}{}",
        faults.len(),
        if failed_faults > 0 {
            format!(", {failed_faults} could not be carried out")
        } else {
            String::new()
        }
    );
    for (k, v) in &findings.stats {
        println!("  {k}: {v}");
    }
    println!(
        "  job webhooks received for {hooks} jobs; account events: {ev_queued} deliveries queued, \
         {ev_delivered} delivered, {ev_received} distinct received; settle took {} ms",
        settle_took.as_millis()
    );
    println!(
        "  violations: {n_violations} {}",
        if by_rule.is_empty() {
            String::new()
        } else {
            format!("{by_rule:?}")
        }
    );
    for v in findings.violations.iter().take(20) {
        println!("    {v}");
    }
    println!(
        "VERDICT chaos: {} — seed {}, {} operations, {} faults, {n_violations} violations",
        if ok { "PASS" } else { "FAIL" },
        p.seed,
        ops.len(),
        faults.len()
    );
    let report = json!({
        "seed": p.seed,
        "duration_s": p.duration_ms / 1000,
        "clients": p.clients,
        "accounts": accounts.iter().map(|a| json!({"id": a.id, "tier": a.tier})).collect::<Vec<_>>(),
        "operations": ops.len(),
        "attempts": attempts,
        "operations_by_kind": per_kind,
        "faults": faults,
        "faults_by_kind": faults_by_kind,
        "settle_ms": settle_took.as_millis() as u64,
        "stats": findings.stats,
        "job_webhooks_received": hooks,
        "account_events": {"deliveries": ev_queued, "delivered": ev_delivered, "received": ev_received},
        "violations_by_rule": by_rule,
        "violations": findings.violations,
        "verdict": if ok { "PASS" } else { "FAIL" },
    });
    Ok((report, ok))
}

/// `ops.jsonl`: every operation and every attempt, for whoever reads a violation.
fn write_ops(dir: &std::path::Path, ops: &[Op]) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("ops.jsonl"))?);
    for op in ops {
        serde_json::to_writer(&mut w, op)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match run().await {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("chaos run failed: {e:#}");
            std::process::exit(2);
        }
    }
}
