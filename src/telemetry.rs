//! Telemetry: the tracing subscriber, built once.
//!
//! Logs go to stderr, never stdout: `keymeter admin … --json` promises that stdout holds
//! exactly one JSON document, so nothing else may write there. JSON lines in production
//! (for a log shipper), a readable format in development.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (later calls are no-ops), so
/// tests that start several apps in one process do not fight over it.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// Runs CPU-heavy work (Argon2) on the blocking pool while keeping the caller's span, so its
/// log lines still carry the request id.
pub async fn spawn_blocking_with_span<F, R>(f: F) -> Result<R, tokio::task::JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f)).await
}
