//! Gateway mode: the priced routes file, the service tokens, and how long gateway charges
//! stay refundable.
//!
//! The routes file is read and checked here, at start-up like every other setting, so a bad
//! file stops the process with `KEYMETER_GATEWAY_ROUTES: line N: reason` instead of pricing
//! requests wrongly.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::source::{list, positive, Source};
use super::{ConfigError, Environment};
use crate::gateway::RouteTable;

/// The shortest service token production accepts.
pub const MIN_SERVICE_TOKEN_CHARS: usize = 32;

/// `KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS` when unset. Longer than any spend-limit period
/// (a month): a key's new limit counts its period's refunds through these rows.
pub const DEFAULT_CHARGE_RETENTION_DAYS: u32 = 35;
/// The longest retention accepted, in days (ten years).
pub const MAX_CHARGE_RETENTION_DAYS: u32 = 3650;

pub(super) struct Gateway {
    pub routes_path: Option<String>,
    pub routes: RouteTable,
    pub service_tokens: Vec<SecretString>,
    pub charge_retention: Duration,
}

pub(super) fn parse(src: &dyn Source, env: Environment) -> Result<Gateway, ConfigError> {
    let routes_path = src
        .get("KEYMETER_GATEWAY_ROUTES")
        .map(|p| p.trim().to_owned());
    let routes = match &routes_path {
        None => RouteTable::default(),
        Some(p) => RouteTable::load(p)
            .map_err(|e| ConfigError::new("KEYMETER_GATEWAY_ROUTES", format!("{p}: {e}")))?,
    };
    let mut service_tokens = Vec::new();
    if let Some(raw) = src.get("KEYMETER_SERVICE_TOKENS") {
        for (i, t) in list(&raw).enumerate() {
            if env.is_production() && t.chars().count() < MIN_SERVICE_TOKEN_CHARS {
                return Err(ConfigError::new(
                    "KEYMETER_SERVICE_TOKENS",
                    format!(
                        "token {} is shorter than {MIN_SERVICE_TOKEN_CHARS} characters, which \
                         production refuses",
                        i + 1
                    ),
                ));
            }
            if t.chars().any(char::is_whitespace) {
                return Err(ConfigError::new(
                    "KEYMETER_SERVICE_TOKENS",
                    format!("token {} holds whitespace", i + 1),
                ));
            }
            service_tokens.push(SecretString::from(t.to_owned()));
        }
    }
    let days = positive(
        src,
        "KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS",
        DEFAULT_CHARGE_RETENTION_DAYS,
        "a whole number of days",
    )?;
    if days > MAX_CHARGE_RETENTION_DAYS {
        return Err(ConfigError::new(
            "KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS",
            format!("must be at most {MAX_CHARGE_RETENTION_DAYS}"),
        ));
    }
    Ok(Gateway {
        routes_path,
        routes,
        service_tokens,
        charge_retention: Duration::from_secs(u64::from(days) * 86_400),
    })
}

/// The tokens' text, for building their digests once at start-up.
pub fn exposed(tokens: &[SecretString]) -> Vec<&str> {
    tokens.iter().map(|t| t.expose_secret()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;

    #[test]
    fn a_bad_routes_file_stops_start_up_with_its_line() {
        let path = std::env::temp_dir().join(format!("km-routes-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            "[[routes]]\nmethod = \"GET\"\npath = \"/v1/*\"\ncost = 1\nscope = \"nope\"\n",
        )
        .unwrap();
        let p = path.to_string_lossy().into_owned();
        let e = Config::from_source(&vars(&[("KEYMETER_GATEWAY_ROUTES", &p)])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_GATEWAY_ROUTES");
        assert!(e.to_string().contains("line 5: scope"), "{e}");
        std::fs::write(
            &path,
            "[[routes]]\nmethod = \"GET\"\npath = \"/v1/*\"\ncost = 1\nscope = \"read\"\n",
        )
        .unwrap();
        let c = Config::from_source(&vars(&[("KEYMETER_GATEWAY_ROUTES", &p)])).unwrap();
        assert_eq!(c.gateway_routes.len(), 1);
        let _ = std::fs::remove_file(&path);
        let e = Config::from_source(&vars(&[("KEYMETER_GATEWAY_ROUTES", "/no/such/file.toml")]))
            .unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn production_demands_long_service_tokens() {
        let short = "s".repeat(31);
        let long = "l".repeat(32);
        let e = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_SERVICE_TOKENS", &format!("{long},{short}")),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_SERVICE_TOKENS");
        assert!(e.to_string().contains("token 2"), "{e}");
        let c = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_SERVICE_TOKENS", &format!("{long}, {long}x")),
        ]))
        .unwrap();
        assert_eq!(c.service_tokens.len(), 2);
        assert!(!format!("{c:?}").contains(&long));
        let c = Config::from_source(&vars(&[("KEYMETER_SERVICE_TOKENS", "dev")])).unwrap();
        assert_eq!(c.service_tokens.len(), 1);
    }

    #[test]
    fn gateway_charges_are_kept_a_configurable_number_of_days() {
        let c = Config::from_source(&vars(&[])).unwrap();
        assert_eq!(c.gateway_charge_retention.as_secs(), 35 * 86_400);
        let c =
            Config::from_source(&vars(&[("KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS", "2")])).unwrap();
        assert_eq!(c.gateway_charge_retention.as_secs(), 2 * 86_400);
        for bad in ["0", "-1", "3651", "a week"] {
            let e = Config::from_source(&vars(&[("KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS", bad)]))
                .unwrap_err();
            assert_eq!(e.var, "KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS", "{bad}");
        }
    }
}
