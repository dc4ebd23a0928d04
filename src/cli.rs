//! What each subcommand does. `main.rs` only parses arguments and maps results to exit codes.

use clap::Subcommand;
use deadpool_postgres::Pool;
use serde_json::json;
use uuid::Uuid;

use crate::audit::{self, Actor};
use crate::auth::key_store::KeySpec;
use crate::config::Config;
use crate::credits::key_caps::{Period, SpendLimit};
use crate::db;
use crate::operator as ops;
use crate::startup::Application;
use crate::tiers::Tiers;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create an account and its first API key (all scopes).
    CreateAccount {
        #[arg(long)]
        email: String,
        #[arg(long)]
        tier: Option<String>,
        /// Starting credits (a `grant` in the ledger).
        #[arg(long, default_value_t = 0)]
        credits: i64,
        /// Print only `{"account_id": …, "api_key": …}` on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Issue another key for an account.
    CreateKey {
        #[arg(long)]
        account: Uuid,
        /// Comma-separated: scrape, read, keys:manage, billing (default scrape,read).
        #[arg(long, value_delimiter = ',')]
        scopes: Option<Vec<String>>,
        #[arg(long)]
        name: Option<String>,
        /// What the key may spend per UTC day or month, as `CREDITS/day` or `CREDITS/month`.
        #[arg(long, value_parser = parse_spend_limit)]
        spend_limit: Option<SpendLimit>,
        #[arg(long)]
        json: bool,
    },
    /// Move an account to another tier (effective on its next request, on every instance).
    SetTier {
        #[arg(long)]
        account: Uuid,
        #[arg(long)]
        tier: String,
    },
    /// Suspend an account: all its keys are refused until it is unsuspended.
    Suspend {
        #[arg(long)]
        account: Uuid,
    },
    Unsuspend {
        #[arg(long)]
        account: Uuid,
    },
    /// Revoke one key.
    RevokeKey {
        #[arg(long)]
        key: String,
    },
    /// Grant credits (positive) or adjust them down (negative; never below zero).
    GrantCredits {
        #[arg(long)]
        account: Uuid,
        #[arg(long, allow_hyphen_values = true)]
        amount: i64,
        #[arg(long)]
        reason: String,
        /// The grant expires at this RFC 3339 time (e.g. 2027-01-31T00:00:00Z); its unspent
        /// rest then leaves the balance. Only for a positive amount.
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The audit trail, newest first: operator actions and security events.
    Audit {
        /// Only events about this account.
        #[arg(long)]
        account: Option<Uuid>,
        /// Only events of this action (e.g. key.revoke, account.set_tier, login.lockout).
        #[arg(long)]
        action: Option<String>,
        /// How many events, 1 to 100.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "starting keymeter");
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "listening");
    app.run_until(shutdown_signal()).await
}

pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let (_pool, pg) = db::connect(&config.database).await?;
    let applied = db::migrations::run(&pg).await?;
    if applied.is_empty() {
        println!("database is up to date");
    } else {
        for m in applied {
            println!("applied {m}");
        }
    }
    Ok(())
}

pub async fn dev(mut config: Config) -> anyhow::Result<()> {
    let mut embedded = None;
    if config.database.url.is_none() {
        let mut pg = crate::dev::EmbeddedPostgres::new(std::path::Path::new(".keymeter"))?;
        pg.start()?;
        crate::dev::ensure_database(&pg.url("postgres"), "keymeter").await?;
        config.database.url = Some(pg.url("keymeter").into());
        eprintln!(
            "keymeter dev: PostgreSQL running at {} (data in ./.keymeter)",
            pg.url("keymeter")
        );
        embedded = Some(pg);
    }
    let result = async {
        let app = Application::build(config).await?;
        let demo_key = demo_account(app.state()).await?;
        demo_password(app.state()).await?;
        let base = format!("http://127.0.0.1:{}", app.port());
        eprintln!("keymeter dev: serving on {base}");
        eprintln!(
            "keymeter dev: console {base}/console/ (sign in as {DEMO_EMAIL}, password {DEMO_PASSWORD})"
        );
        eprintln!("keymeter dev: demo account demo@keymeter.dev, API key:\n\n    {demo_key}\n");
        eprintln!("try:  curl -H 'Authorization: Bearer {demo_key}' {base}/v1/account\n");
        app.run_until(shutdown_signal()).await
    }
    .await;
    if let Some(mut pg) = embedded {
        pg.stop();
    }
    result
}

async fn admin_pool(config: &Config) -> anyhow::Result<Pool> {
    let (pool, pg) = db::connect(&config.database).await?;
    db::migrations::check(&pg).await?;
    Ok(pool)
}

pub async fn admin(config: Config, cmd: AdminCommand) -> anyhow::Result<()> {
    let tiers = Tiers::load(config.tiers_path.as_deref())?;
    let pool = admin_pool(&config).await?;
    let actor = Actor::cli();
    match cmd {
        AdminCommand::CreateAccount {
            email,
            tier,
            credits,
            json,
        } => {
            let (account, key) =
                ops::create_account(&pool, &tiers, &actor, &email, tier.as_deref(), credits)
                    .await?;
            if json {
                println!("{}", json!({"account_id": account.id, "api_key": key.key}));
            } else {
                println!("account  {}", account.id);
                println!("tier     {}", account.tier);
                println!("credits  {}", account.credit_balance);
                println!("api key  {}", key.key);
                println!("(the key is shown once; store it now)");
            }
        }
        AdminCommand::CreateKey {
            account,
            scopes,
            name,
            spend_limit,
            json,
        } => {
            let spec = KeySpec::parse(name, scopes, None)?;
            let key = ops::create_key(&pool, &actor, account, &spec, spend_limit).await?;
            if json {
                println!(
                    "{}",
                    json!({"key_id": key.view.id, "api_key": key.key, "scopes": key.view.scopes})
                );
            } else {
                println!("key id   {}", key.view.id);
                println!("scopes   {}", key.view.scopes.join(","));
                println!("api key  {}", key.key);
            }
        }
        AdminCommand::SetTier { account, tier } => {
            let a = ops::set_tier(&pool, &tiers, &actor, account, &tier).await?;
            println!("account {} is now on tier {}", a.id, a.tier);
        }
        AdminCommand::Suspend { account } => {
            let a = ops::set_active(&pool, &actor, account, false).await?;
            println!("account {} is {}", a.id, a.status);
        }
        AdminCommand::Unsuspend { account } => {
            let a = ops::set_active(&pool, &actor, account, true).await?;
            println!("account {} is {}", a.id, a.status);
        }
        AdminCommand::RevokeKey { key } => {
            let k = ops::revoke_key(&pool, &actor, &key).await?;
            println!("key {} revoked", k.id);
        }
        AdminCommand::GrantCredits {
            account,
            amount,
            reason,
            expires_at,
        } => {
            let m = ops::grant_credits(&pool, &actor, account, amount, &reason, expires_at).await?;
            println!(
                "{} {:+} credits; balance now {}",
                m.kind, m.delta, m.balance_after
            );
        }
        AdminCommand::Audit {
            account,
            action,
            limit,
            json,
        } => print_audit(&pool, account, action.as_deref(), limit, json).await?,
    }
    pool.close();
    Ok(())
}

/// `keymeter admin audit`: the newest events, as a table or as JSON lines (the same objects
/// `GET /admin/audit` returns).
async fn print_audit(
    pool: &Pool,
    account: Option<Uuid>,
    action: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    if !(1..=crate::pagination::MAX_LIMIT).contains(&limit) {
        anyhow::bail!(
            "--limit must be between 1 and {}",
            crate::pagination::MAX_LIMIT
        );
    }
    let action = match action {
        None => None,
        Some(a) => Some(audit::Action::parse(a).ok_or_else(|| {
            let known: Vec<&str> = audit::Action::ALL.iter().map(|a| a.as_str()).collect();
            anyhow::anyhow!("--action must be one of {}", known.join(", "))
        })?),
    };
    let filter = audit::Filter {
        account_id: account,
        action,
        ..audit::Filter::default()
    };
    let client = pool.get().await?;
    let mut events = audit::list(&client, &filter, limit, None).await?;
    events.truncate(limit as usize);
    if json {
        for e in &events {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(());
    }
    if events.is_empty() {
        println!("no audit events");
        return Ok(());
    }
    println!(
        "{:<24}  {:<18}  {:<24}  {:<36}  {:<12}  request id",
        "time", "action", "actor", "account", "target"
    );
    for e in &events {
        println!(
            "{:<24}  {:<18}  {:<24}  {:<36}  {:<12}  {}",
            e.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            e.action,
            format!("{}:{}", e.actor_type, e.actor),
            e.account_id
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            e.target.as_deref().unwrap_or("-"),
            e.request_id.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}

const DEMO_EMAIL: &str = "demo@keymeter.dev";
const DEMO_KEY_FILE: &str = ".keymeter/demo-key";
/// The demo account's console password. Printed by `keymeter dev`, which serves only on this
/// machine's loopback for trying keymeter out; never used by `serve`.
const DEMO_PASSWORD: &str = "keymeter-demo";

/// Gives the demo account its console password (again at every start, so it is always the
/// one printed).
async fn demo_password(state: &crate::startup::AppState) -> anyhow::Result<()> {
    let id: Uuid = state
        .db
        .get()
        .await?
        .query_one(
            "SELECT id FROM accounts WHERE lower(email) = $1",
            &[&DEMO_EMAIL],
        )
        .await?
        .get(0);
    crate::accounts::set_password(
        &state.db,
        &state.passwords,
        id,
        secrecy::SecretString::from(DEMO_PASSWORD.to_owned()),
    )
    .await?;
    Ok(())
}

/// The demo account `keymeter dev` prints a key for: created with 1,000 credits on the `pro`
/// tier on first start. Its key is kept in `.keymeter/demo-key` (mode 0600, development only)
/// so later starts print the same key; if that file is gone, a fresh key is issued.
async fn demo_account(state: &crate::startup::AppState) -> anyhow::Result<String> {
    if let Ok(saved) = std::fs::read_to_string(DEMO_KEY_FILE) {
        let saved = saved.trim().to_owned();
        if state.auth.authenticate(Some(&saved)).await.is_ok() {
            return Ok(saved);
        }
    }
    let client = state.db.get().await?;
    let existing: Option<Uuid> = client
        .query_opt(
            "SELECT id FROM accounts WHERE lower(email) = $1",
            &[&DEMO_EMAIL],
        )
        .await?
        .map(|r| r.get(0));
    drop(client);
    let key = match existing {
        Some(id) => {
            ops::create_key(
                &state.db,
                &Actor::cli(),
                id,
                &KeySpec::full_access("dev demo"),
                None,
            )
            .await?
            .key
        }
        None => {
            ops::create_account(
                &state.db,
                &state.tiers,
                &Actor::cli(),
                DEMO_EMAIL,
                Some("pro"),
                1000,
            )
            .await?
            .1
            .key
        }
    };
    let _ = std::fs::create_dir_all(".keymeter");
    if std::fs::write(DEMO_KEY_FILE, &key).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(DEMO_KEY_FILE, std::fs::Permissions::from_mode(0o600));
        }
    }
    Ok(key)
}

/// `--spend-limit 100/day` or `100/month`.
fn parse_spend_limit(s: &str) -> Result<SpendLimit, String> {
    let (credits, period) = s
        .split_once('/')
        .ok_or_else(|| "expected CREDITS/day or CREDITS/month".to_owned())?;
    let credits: i64 = credits
        .parse()
        .map_err(|_| format!("{credits:?} is not a number of credits"))?;
    let period = Period::parse(period).ok_or_else(|| format!("{period:?} is not day or month"))?;
    SpendLimit { credits, period }
        .check()
        .map_err(|e| e.to_string())
}
