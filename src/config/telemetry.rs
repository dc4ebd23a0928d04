//! What the process tells its operator: the log filter and format, and where traces go.

use super::source::Source;
use super::{ConfigError, Environment};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

pub(super) struct Telemetry {
    pub log_filter: String,
    pub log_format: LogFormat,
    pub otel_endpoint: Option<String>,
}

pub(super) fn parse(src: &dyn Source, env: Environment) -> Result<Telemetry, ConfigError> {
    let log_filter = src.get("KEYMETER_LOG").unwrap_or_else(|| "info".to_owned());
    if tracing_subscriber::EnvFilter::try_new(&log_filter).is_err() {
        return Err(ConfigError::new(
            "KEYMETER_LOG",
            format!("invalid filter {log_filter:?}, expected e.g. info or keymeter=debug,info"),
        ));
    }
    let log_format = match src.get("KEYMETER_LOG_FORMAT").as_deref().map(str::trim) {
        None => match env {
            Environment::Production => LogFormat::Json,
            Environment::Development => LogFormat::Pretty,
        },
        Some("json") => LogFormat::Json,
        Some("pretty") => LogFormat::Pretty,
        Some(other) => {
            return Err(ConfigError::new(
                "KEYMETER_LOG_FORMAT",
                format!("invalid value {other:?}, expected json or pretty"),
            ))
        }
    };
    Ok(Telemetry {
        log_filter,
        log_format,
        otel_endpoint: otel_endpoint(src)?,
    })
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT`, without a trailing slash.
fn otel_endpoint(src: &dyn Source) -> Result<Option<String>, ConfigError> {
    let Some(raw) = src.get("OTEL_EXPORTER_OTLP_ENDPOINT") else {
        return Ok(None);
    };
    let raw = raw.trim();
    // No credentials in the URL: the whole configuration is logged at start-up.
    let ok = url::Url::parse(raw).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host_str().is_some()
            && u.username().is_empty()
            && u.password().is_none()
    });
    if !ok {
        return Err(ConfigError::new(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "must be an http:// or https:// URL without credentials, e.g. http://127.0.0.1:4318",
        ));
    }
    Ok(Some(raw.trim_end_matches('/').to_owned()))
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;
    use super::*;

    #[test]
    fn the_otlp_endpoint_is_optional_and_checked() {
        let c = Config::from_source(&vars(&[])).unwrap();
        assert_eq!(c.otel_endpoint, None);
        let c = Config::from_source(&vars(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318/",
        )]))
        .unwrap();
        assert_eq!(c.otel_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        let e = Config::from_source(&vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]))
            .unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
    }

    #[test]
    fn the_log_format_follows_the_environment() {
        let c = Config::from_source(&vars(&[])).unwrap();
        assert_eq!(c.log_format, LogFormat::Pretty);
        let c = Config::from_source(&vars(&[("KEYMETER_ENV", "production")])).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
    }
}
