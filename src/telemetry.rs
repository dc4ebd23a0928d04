//! Telemetry: the tracing subscriber, built once, and — when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set — trace export over OTLP.
//!
//! Logs go to stderr, never stdout: `keymeter admin … --json` promises that stdout holds
//! exactly one JSON document, so nothing else may write there. JSON lines in production
//! (for a log shipper), a readable format in development.
//!
//! Traces: the same `tracing` spans the logs carry (each request's `request` span and the
//! spans inside it) become OpenTelemetry spans through `tracing-opentelemetry`, batched and
//! sent as OTLP/HTTP protobuf to `$OTEL_EXPORTER_OTLP_ENDPOINT/v1/traces`. A request that
//! arrives with a W3C `traceparent` continues that trace (see [`adopt_remote_parent`]). Off by
//! default, and then nothing of it runs on the request path but one relaxed atomic load.
//!
//! The exporter uses reqwest's *blocking* client on purpose: the SDK's batch processor runs
//! on its own thread with no Tokio runtime, where the async client panics on first export.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::LogFormat;

/// Whether spans are exported, so the request path skips context extraction otherwise.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber. Safe to call more than once (later calls are no-ops), so
/// tests that start several apps in one process do not fight over it.
pub fn init(filter: &str, format: LogFormat) {
    let _ = install(filter, format, None);
}

/// Flushes and stops trace export when dropped: spans still batched at exit are sent.
pub struct TraceGuard(Option<SdkTracerProvider>);

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("keymeter: flushing traces at exit failed: {e}");
            }
        }
    }
}

/// [`init`], plus trace export to `otlp_endpoint` when it is set.
pub fn init_with_traces(
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<TraceGuard> {
    let provider = match otlp_endpoint {
        Some(endpoint) => Some(tracer_provider(endpoint)?),
        None => None,
    };
    install(filter, format, provider.as_ref());
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(TraceGuard(provider))
}

fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .map_err(|e| {
            anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the exporter: {e}")
        })?;
    // OTEL_SERVICE_NAME, when set, names the service; keymeter otherwise.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("keymeter");
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

fn install(filter: &str, format: LogFormat, provider: Option<&SdkTracerProvider>) -> bool {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Json => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .compact()
            .boxed(),
    };
    let traces = provider.map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("keymeter")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok()
}

/// Makes `span` (a request's span) a child of the caller's trace when the request carries a
/// W3C `traceparent`, so keymeter's spans join the caller's trace instead of starting one.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &actix_web::http::header::HeaderMap) {
    if !EXPORTING.load(Ordering::Relaxed) || !headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(cx);
}

struct Headers<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
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
