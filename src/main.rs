//! The `keymeter` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use keymeter::config::Config;
use keymeter::{cli, telemetry};

#[derive(Parser)]
#[command(name = "keymeter", version, about = "Credit-metered API-key platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (migrates on start unless KEYMETER_AUTO_MIGRATE=false).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Try keymeter out: start a local PostgreSQL if DATABASE_URL is unset, migrate, serve.
    Dev,
    /// Operator commands against the database.
    #[command(subcommand)]
    Admin(cli::AdminCommand),
}

fn main() -> ExitCode {
    let args = parse_args();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keymeter: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // Everything but `dev` needs a database; say so before anything else is printed.
    if !matches!(args.command, Command::Dev) {
        if let Err(e) = config.database_url() {
            eprintln!("keymeter: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    // Admin commands are for a terminal: keep their stderr quiet unless asked.
    let filter = match (&args.command, std::env::var("KEYMETER_LOG").is_ok()) {
        (Command::Admin(_), false) => "warn".to_owned(),
        _ => config.log_filter.clone(),
    };
    // Held to the end of `main`: dropping it flushes the spans still batched.
    let _traces = match telemetry::init_with_traces(
        &filter,
        config.log_format,
        config.otel_endpoint.as_deref(),
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("keymeter: configuration error: {e:#}");
            return ExitCode::from(2);
        }
    };
    keymeter::http::edge::install_panic_hook();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keymeter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Command::Serve => cli::serve(config).await,
            Command::Migrate => cli::migrate(config).await,
            Command::Dev => cli::dev(config).await,
            Command::Admin(cmd) => cli::admin(config, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keymeter: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, with every configuration variable listed under `--help` (of `keymeter`
/// and of the subcommands that read them all).
fn parse_args() -> Cli {
    let vars = keymeter::config::catalogue::help();
    let mut command = Cli::command().after_long_help(vars.clone());
    for sub in ["serve", "migrate", "dev"] {
        command = command.mut_subcommand(sub, |c| c.after_long_help(vars.clone()));
    }
    let matches = command.get_matches_mut();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit())
}
