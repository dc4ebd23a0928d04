//! What each subcommand does. `main.rs` only parses arguments and maps results to exit codes.

use clap::Subcommand;

use crate::config::Config;
use crate::db;
use crate::startup::Application;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {}

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
    let url = config.database_url()?.clone();
    let pg = db::pg_config(&url, &config.database)?;
    let pool = db::build_pool(pg.clone(), &config.database)?;
    db::wait_until_reachable(&pool, &db::describe(&pg), config.database.startup_retry).await?;
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
        eprintln!("keymeter dev: serving on http://127.0.0.1:{}", app.port());
        app.run_until(shutdown_signal()).await
    }
    .await;
    if let Some(mut pg) = embedded {
        pg.stop();
    }
    result
}

pub async fn admin(_config: Config, cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {}
}
