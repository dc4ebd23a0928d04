//! The HTTP side: where to listen, how big and how long a request may be, how long a
//! shutdown drains, CORS, and whom to believe about the client's address.

use std::net::SocketAddr;
use std::time::Duration;

use super::source::{boolean, list, parsed, positive, secs, Source};
use super::ConfigError;

pub(super) struct Http {
    pub bind: SocketAddr,
    pub metrics_bind: Option<SocketAddr>,
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub shutdown_job_grace: Duration,
    pub http_workers: Option<usize>,
    pub cors_origins: Vec<String>,
    pub trust_forwarded: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

pub(super) fn parse(src: &dyn Source) -> Result<Http, ConfigError> {
    let bind = parsed(
        src,
        "KEYMETER_BIND",
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        "host:port, e.g. 127.0.0.1:8080",
    )?;
    let metrics_bind = match src.get("KEYMETER_METRICS_BIND") {
        None => None,
        Some(_) => Some(parsed(
            src,
            "KEYMETER_METRICS_BIND",
            bind,
            "host:port, e.g. 127.0.0.1:9090",
        )?),
    };
    if metrics_bind.is_some_and(|m| m == bind && m.port() != 0) {
        return Err(ConfigError::new(
            "KEYMETER_METRICS_BIND",
            format!("must differ from KEYMETER_BIND ({bind})"),
        ));
    }
    let body_limit = positive(
        src,
        "KEYMETER_BODY_LIMIT",
        64 * 1024usize,
        "a size in bytes",
    )?;
    let request_timeout = secs(src, "KEYMETER_REQUEST_TIMEOUT_SECS", 75)?;
    // 20 s of drain + 5 s for running jobs + the fixed tail fits an orchestrator's usual
    // 30-second grace period (Kubernetes' default) before SIGKILL.
    let shutdown_timeout = secs(src, "KEYMETER_SHUTDOWN_TIMEOUT_SECS", 20)?;
    let shutdown_job_grace = secs(
        src,
        "KEYMETER_SHUTDOWN_JOB_GRACE_SECS",
        shutdown_timeout.as_secs().min(5),
    )?;
    let http_workers = match src.get("KEYMETER_HTTP_WORKERS") {
        None => None,
        Some(_) => Some(positive(
            src,
            "KEYMETER_HTTP_WORKERS",
            1usize,
            "a thread count",
        )?),
    };
    let cors_origins: Vec<String> = src
        .get("KEYMETER_CORS_ORIGINS")
        .map(|s| list(&s).map(str::to_owned).collect())
        .unwrap_or_default();
    for o in &cors_origins {
        if !(o.starts_with("http://") || o.starts_with("https://")) {
            return Err(ConfigError::new(
                "KEYMETER_CORS_ORIGINS",
                format!("invalid origin {o:?}, expected e.g. https://app.example.com"),
            ));
        }
    }
    let trust_forwarded = boolean(src, "KEYMETER_TRUST_FORWARDED", false)?;
    let trusted_proxies = trusted_proxies(src)?;
    if !trusted_proxies.is_empty() && !trust_forwarded {
        return Err(ConfigError::new(
            "KEYMETER_TRUSTED_PROXIES",
            "has no effect unless KEYMETER_TRUST_FORWARDED=true",
        ));
    }
    Ok(Http {
        bind,
        metrics_bind,
        body_limit,
        request_timeout,
        shutdown_timeout,
        shutdown_job_grace,
        http_workers,
        cors_origins,
        trust_forwarded,
        trusted_proxies,
    })
}

/// `KEYMETER_TRUSTED_PROXIES`: comma-separated CIDRs (`10.0.0.0/8`, `fd00::/8`) or single
/// addresses.
fn trusted_proxies(src: &dyn Source) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    const VAR: &str = "KEYMETER_TRUSTED_PROXIES";
    let Some(raw) = src.get(VAR) else {
        return Ok(Vec::new());
    };
    list(&raw)
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    ConfigError::new(
                        VAR,
                        format!(
                            "invalid entry {s:?}, expected a CIDR like 10.0.0.0/8 or an address"
                        ),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;
    use super::*;

    #[test]
    fn the_default_shutdown_fits_a_30_second_grace_period() {
        let c = Config::from_source(&vars(&[])).expect("defaults parse");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(c.shutdown_job_grace, Duration::from_secs(5));
        assert!(
            c.shutdown_budget() <= Duration::from_secs(30),
            "{:?}",
            c.shutdown_budget()
        );
        // A short drain keeps the jobs' grace no longer than itself…
        let c = Config::from_source(&vars(&[("KEYMETER_SHUTDOWN_TIMEOUT_SECS", "2")])).unwrap();
        assert_eq!(c.shutdown_job_grace, Duration::from_secs(2));
        // …unless it is set.
        let c = Config::from_source(&vars(&[
            ("KEYMETER_SHUTDOWN_TIMEOUT_SECS", "2"),
            ("KEYMETER_SHUTDOWN_JOB_GRACE_SECS", "7"),
        ]))
        .unwrap();
        assert_eq!(c.shutdown_job_grace, Duration::from_secs(7));
    }

    #[test]
    fn the_metrics_bind_is_an_address_apart_from_the_main_one() {
        let c = Config::from_source(&vars(&[])).unwrap();
        assert!(c.metrics_bind.is_none());
        let c = Config::from_source(&vars(&[("KEYMETER_METRICS_BIND", "127.0.0.1:9090")])).unwrap();
        assert_eq!(c.metrics_bind.unwrap().to_string(), "127.0.0.1:9090");
        let e = Config::from_source(&vars(&[("KEYMETER_METRICS_BIND", "9090")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_METRICS_BIND");
        let e = Config::from_source(&vars(&[
            ("KEYMETER_BIND", "0.0.0.0:8080"),
            ("KEYMETER_METRICS_BIND", "0.0.0.0:8080"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_METRICS_BIND");
    }

    #[test]
    fn trusted_proxies_parse_and_need_trust_forwarded() {
        let c = Config::from_source(&vars(&[
            ("KEYMETER_TRUST_FORWARDED", "true"),
            (
                "KEYMETER_TRUSTED_PROXIES",
                "10.0.0.0/8, 192.0.2.7, fd00::/8",
            ),
        ]))
        .unwrap();
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[1].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));
        let e = Config::from_source(&vars(&[
            ("KEYMETER_TRUST_FORWARDED", "true"),
            ("KEYMETER_TRUSTED_PROXIES", "10.0.0.0/33"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_TRUSTED_PROXIES");
        let e =
            Config::from_source(&vars(&[("KEYMETER_TRUSTED_PROXIES", "10.0.0.0/8")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_TRUSTED_PROXIES");
    }
}
