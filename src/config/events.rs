//! Account events' webhook endpoints: the server key their signing secrets derive from, and
//! how deliveries are retried and bounded.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

use super::source::{millis, Source};
use super::{ConfigError, Environment};

#[derive(Debug, Clone)]
pub struct EventsSettings {
    /// Derives every webhook endpoint's signing secret (`KEYMETER_EVENT_SIGNING_KEY`); `None`
    /// (production without it) turns webhook endpoints off: creating one is refused, events
    /// are still recorded and listed.
    pub signing_key: Option<SecretString>,
    /// Wait before the first retry (`KEYMETER_EVENT_WEBHOOK_RETRY_MS`); each later one waits
    /// twice as long, at most an hour, until the event is a day old.
    pub retry_base: Duration,
    /// How long after its event a delivery is still retried.
    pub retry_for: Duration,
    /// One delivery's whole request.
    pub timeout: Duration,
    /// Deliveries in flight on this instance: in all, per account, per destination origin.
    pub max_in_flight: usize,
    pub per_account: usize,
    pub per_destination: usize,
    /// Endpoints an account may hold.
    pub max_endpoints: i64,
    /// How often the senders look for due deliveries besides being woken by NOTIFY (retries
    /// come due without one).
    pub poll: Duration,
}

/// The development default of `KEYMETER_EVENT_SIGNING_KEY`: public, so it signs nothing that
/// matters — used only in development on a loopback address, refused anywhere else.
const DEV_EVENT_SIGNING_KEY: &str = "keymeter-development-event-signing-key";

pub(super) fn parse(
    src: &dyn Source,
    env: Environment,
    bind: SocketAddr,
) -> Result<EventsSettings, ConfigError> {
    const VAR: &str = "KEYMETER_EVENT_SIGNING_KEY";
    let public = env.is_production() || !bind.ip().is_loopback();
    let signing_key = match src.get(VAR) {
        Some(k) if k == DEV_EVENT_SIGNING_KEY && public => {
            return Err(ConfigError::new(
                VAR,
                "must not be the published development key in production or when KEYMETER_BIND is not a loopback address",
            ))
        }
        Some(k) if k.len() >= 32 => Some(SecretString::from(k)),
        Some(_) => return Err(ConfigError::new(VAR, "must be at least 32 characters")),
        // Production, or a bind other machines can reach, without a key: endpoints are off
        // (the built-in development key is public, so it is never used there).
        None if public => None,
        None => Some(SecretString::from(DEV_EVENT_SIGNING_KEY)),
    };
    Ok(EventsSettings {
        signing_key,
        retry_base: millis(src, "KEYMETER_EVENT_WEBHOOK_RETRY_MS", 5_000)?,
        retry_for: Duration::from_secs(24 * 3600),
        timeout: Duration::from_secs(10),
        max_in_flight: 64,
        per_account: 4,
        per_destination: 8,
        max_endpoints: 16,
        poll: Duration::from_millis(500),
    })
}

#[cfg(test)]
mod tests {
    use super::super::source::vars;
    use super::super::Config;
    use super::*;

    #[test]
    fn development_on_loopback_gets_the_development_key() {
        let c = Config::from_source(&vars(&[])).expect("parses");
        assert!(c.events.signing_key.is_some());
    }

    #[test]
    fn production_without_a_key_turns_endpoints_off_and_the_public_key_is_refused() {
        let c = Config::from_source(&vars(&[("KEYMETER_ENV", "production")])).expect("parses");
        assert!(c.events.signing_key.is_none());
        let e = Config::from_source(&vars(&[
            ("KEYMETER_ENV", "production"),
            ("KEYMETER_EVENT_SIGNING_KEY", DEV_EVENT_SIGNING_KEY),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "KEYMETER_EVENT_SIGNING_KEY");
        let c = Config::from_source(&vars(&[
            ("KEYMETER_BIND", "0.0.0.0:8080"),
            (
                "KEYMETER_WEBHOOK_SIGNING_KEY",
                "an-operator-chosen-key-0123456789abcdef",
            ),
        ]))
        .expect("parses");
        assert!(
            c.events.signing_key.is_none(),
            "no public development key off loopback"
        );
        let e = Config::from_source(&vars(&[("KEYMETER_EVENT_SIGNING_KEY", "short")])).unwrap_err();
        assert_eq!(e.var, "KEYMETER_EVENT_SIGNING_KEY");
    }
}
