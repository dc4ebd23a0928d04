//! Gateway mode: keymeter as the authorizer in front of a customer-facing API it does not
//! implement — nginx `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz` (HTTP) — and the
//! verify API for servers that check keys in code.
//!
//! For every proxied request: the key is verified and the account's tier limit applied
//! exactly as on keymeter's own API (`http::ratelimit_gate::admit`, the same code), then the
//! original request's route is looked up in the operator's priced routes
//! ([`routes_file`]), its scope checked, and its cost charged ([`charge`]). The charge is an
//! ordinary charge of the credits lane (`credits::coalesce`) tagged with its route and the
//! proxy's `X-Request-Id` (`credits::gateway_charges`): it shares every credit control of
//! the API's charges (the key's spend limit, expiring credits first, low-balance events,
//! auto-recharge), is charged once per request id, and is refundable once. This module
//! decides; `routes/gateway.rs` turns the decision into what each proxy understands.
//!
//! Service tokens (`KEYMETER_SERVICE_TOKENS`) authenticate the operator's own servers (the
//! refund and verify endpoints): only their SHA-256 digests are kept, and a presented token is
//! compared with every one of them in constant time, so neither a token's content nor which
//! one matched leaks through timing.

pub mod routes_file;

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::credits::coalesce::{self, ChargeRequest, Coalescer};
use crate::credits::gateway_charges::{self, GatewayTag, Refund};
use crate::credits::Once;

pub use crate::credits::gateway_charges::Refunded;
pub use routes_file::{GatewayRoute, RouteTable};

/// Why a gateway request was refused (beyond the key and the rate limit, which are the
/// auth and rate-limit modules' own refusals).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No priced route covers the original request.
    #[error("{method} {path} is not a metered route.")]
    RouteNotMetered { method: String, path: String },
    /// The proxy did not say which request it asks about.
    #[error("The original request's method and path are missing or malformed (send X-Original-Method and X-Original-URI, X-Forwarded-Method and X-Forwarded-Uri, or call /v1/authz/<path>).")]
    NoOriginalRequest,
    /// A refund of a charge the gateway never made.
    #[error("No gateway charge with that id.")]
    ChargeNotFound,
    /// A second refund of one charge.
    #[error("This charge was refunded already (refund {refund_id}).")]
    AlreadyRefunded { refund_id: i64 },
    #[error(transparent)]
    Credits(#[from] crate::credits::Error),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}
crate::impl_db_error_from!(Error);

/// The configured service tokens, as digests.
#[derive(Clone, Default)]
pub struct ServiceTokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceTokens({} configured)", self.digests.len())
    }
}

impl ServiceTokens {
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> ServiceTokens {
        ServiceTokens {
            digests: tokens
                .iter()
                .map(|t| Sha256::digest(t.as_ref().as_bytes()).into())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens. Every digest is compared, whatever matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digests
            .iter()
            .fold(subtle::Choice::from(0u8), |acc, t| acc | t.ct_eq(&d))
            .into()
    }
}

/// Everything gateway mode needs at run time (its charges go through the credits lane).
pub struct Gateway {
    pub routes: RouteTable,
    pub service_tokens: ServiceTokens,
}

/// What a charge (or its replay) left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charged {
    /// The ledger id of the charge: `X-Keymeter-Charge`, what a refund names.
    pub charge_id: i64,
    /// The balance after the charge (for a replay: the balance now).
    pub balance: i64,
    /// This request id had been charged already; nothing was taken now.
    pub replayed: bool,
}

/// Charges `cost` (> 0) for `key_id`'s call to `route`, as every charge is made: through
/// `lane` (group commit, `KEYMETER_CHARGE_COALESCING`) or on its own when that is off.
/// With a `request_id` already charged on this account, answers that charge instead.
pub async fn charge(
    db: &Pool,
    lane: Option<&Coalescer>,
    account_id: Uuid,
    key_id: &str,
    cost: i64,
    route: &str,
    request_id: Option<&str>,
) -> Result<Charged, Error> {
    let tag = GatewayTag {
        route: route.to_owned(),
        request_id: request_id.map(str::to_owned),
    };
    let request = ChargeRequest {
        account_id,
        cost,
        reason: Some(tag.reason()),
        key_id: Some(key_id.to_owned()),
        gateway: Some(tag),
    };
    let once = match lane {
        Some(lane) => lane.submit(db, request).await?,
        None => coalesce::charge_now(db, &request).await?,
    };
    match once {
        Once::Done(m) => Ok(Charged {
            charge_id: m.id,
            balance: m.balance_after,
            replayed: false,
        }),
        Once::Replayed { charge_id, balance } => Ok(Charged {
            charge_id,
            balance,
            replayed: true,
        }),
        Once::AlreadyDone => Err(Error::Internal(anyhow::anyhow!(
            "a gateway charge reported as a job's duplicate"
        ))),
    }
}

/// Gives a gateway charge back, at most once (see `credits::gateway_charges::refund`).
pub async fn refund(db: &Pool, charge_id: i64) -> Result<Refunded, Error> {
    match gateway_charges::refund(db, charge_id).await? {
        Refund::Done(r) => Ok(r),
        Refund::Already { refund_id } => Err(Error::AlreadyRefunded { refund_id }),
        Refund::NotFound => Err(Error::ChargeNotFound),
    }
}

/// The request a proxy asks about: its method and its normalized path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    pub method: String,
    pub path: String,
}

impl Original {
    /// From what the proxy sent: nginx's `X-Original-Method` + `X-Original-URI`, Traefik's
    /// `X-Forwarded-Method` + `X-Forwarded-Uri`, or — Envoy's `ext_authz`, which sends the
    /// original request line itself under a path prefix — the request's own method and the
    /// path after `/v1/authz` (`tail`).
    ///
    /// When more than one of them is present they must agree, or the request is refused: a
    /// proxy that passes the client's headers through (Traefik does, unless told otherwise)
    /// would otherwise let a client name a cheap route in the family the proxy does not set
    /// while requesting an expensive one.
    ///
    /// On the hot path of every proxied request: the header values are borrowed (nothing is
    /// copied until the one normalized path and method are kept), and a method the proxy
    /// already sent in upper case is not re-cased.
    pub fn from_parts<'h>(
        header: impl Fn(&str) -> Option<&'h str>,
        own_method: &str,
        tail: Option<&'h str>,
    ) -> Result<Original, Error> {
        let targets = [header("x-original-uri"), header("x-forwarded-uri"), tail];
        let mut path: Option<String> = None;
        for t in targets.into_iter().flatten() {
            let p = routes_file::normalize(t.trim()).ok_or(Error::NoOriginalRequest)?;
            match &path {
                Some(seen) if *seen != p => return Err(Error::NoOriginalRequest),
                _ => path = Some(p),
            }
        }
        let path = path.ok_or(Error::NoOriginalRequest)?;
        let methods = [
            header("x-original-method"),
            header("x-forwarded-method"),
            tail.map(|_| own_method),
        ];
        let mut method: Option<&str> = None;
        for m in methods.into_iter().flatten() {
            let m = m.trim();
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(Error::NoOriginalRequest);
            }
            match method {
                Some(seen) if !seen.eq_ignore_ascii_case(m) => {
                    return Err(Error::NoOriginalRequest)
                }
                _ => method = Some(m),
            }
        }
        Ok(Original {
            method: upper(method.unwrap_or(own_method)),
            path,
        })
    }
}

/// `m` in upper case, copied once (proxies send methods in upper case already).
fn upper(m: &str) -> String {
    if m.bytes().any(|b| b.is_ascii_lowercase()) {
        m.to_ascii_uppercase()
    } else {
        m.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        }
    }

    #[test]
    fn each_proxy_says_which_request_in_its_own_words() {
        let nginx = Original::from_parts(
            headers(&[
                ("X-Original-Method", "post"),
                ("X-Original-URI", "/v1/x?q=1"),
            ]),
            "GET",
            None,
        )
        .unwrap();
        assert_eq!(
            (nginx.method.as_str(), nginx.path.as_str()),
            ("POST", "/v1/x")
        );
        let traefik = Original::from_parts(
            headers(&[
                ("X-Forwarded-Method", "DELETE"),
                ("X-Forwarded-Uri", "/a/../b"),
            ]),
            "GET",
            None,
        )
        .unwrap();
        assert_eq!(
            (traefik.method.as_str(), traefik.path.as_str()),
            ("DELETE", "/b")
        );
        let envoy = Original::from_parts(headers(&[]), "PATCH", Some("/v1/items/7")).unwrap();
        assert_eq!(
            (envoy.method.as_str(), envoy.path.as_str()),
            ("PATCH", "/v1/items/7")
        );
        assert!(Original::from_parts(headers(&[]), "GET", None).is_err());
        // A client's header in the family the proxy does not set cannot reprice the request.
        let spoofed = [
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Uri", "/v1/expensive"),
            ("X-Original-URI", "/v1/cheap"),
        ];
        assert!(Original::from_parts(headers(&spoofed), "GET", None).is_err());
        assert!(Original::from_parts(
            headers(&[("X-Original-URI", "/v1/cheap")]),
            "GET",
            Some("/v1/expensive")
        )
        .is_err());
        assert!(Original::from_parts(
            headers(&[("X-Original-Method", "GET"), ("X-Original-URI", "/v1/x")]),
            "POST",
            Some("/v1/x")
        )
        .is_err());
        let agreeing = [
            ("X-Forwarded-Uri", "/v1/x?a"),
            ("X-Original-URI", "/v1/./x"),
        ];
        assert_eq!(
            Original::from_parts(headers(&agreeing), "GET", None)
                .unwrap()
                .path,
            "/v1/x"
        );
        assert!(Original::from_parts(
            headers(&[("X-Original-Method", "G T"), ("X-Original-URI", "/")]),
            "GET",
            None
        )
        .is_err());
    }

    #[test]
    fn service_tokens_match_only_themselves() {
        let t = ServiceTokens::new(&["a".repeat(32), "b".repeat(40)]);
        assert!(t.accepts(&"a".repeat(32)));
        assert!(t.accepts(&"b".repeat(40)));
        assert!(!t.accepts(&"a".repeat(31)));
        assert!(!t.accepts(""));
        assert!(!ServiceTokens::default().accepts(""));
        assert!(!format!("{t:?}").contains("aaaa"));
    }
}
