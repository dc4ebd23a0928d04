//! Authentication: API keys (format, storage, verification), their cache and its
//! invalidation, and what a key may do to its own account's keys ([`key_actions`]). Refusals
//! are [`Error`]s; only the request extractor ([`extractor`]) knows about HTTP.
//!
//! The hot path, in order (see [`AuthService::authenticate`]):
//! parse → checksum (bad keys stop here: no cache, no database) → moka cache by key id
//! (a miss is one indexed `SELECT` by primary key; concurrent misses for one id coalesce into
//! that one query; unknown ids are cached negatively for a few seconds) → constant-time
//! digest comparison → expiry / revocation / rotation grace / account status.
//! Nothing here writes to the database: `last_used_at` is batched in the background.

pub mod api_key;
pub mod cache;
mod error;
pub mod extractor;
pub mod key_actions;
pub mod key_store;
pub mod last_used;
pub mod listener;

use std::sync::Arc;

use chrono::Utc;
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::metrics::{self, AuthOutcome};
use api_key::KeyDigest;
use cache::{KeyCache, KeyRecord};
pub use error::Error;

/// What a key may do. Stored as text in `api_keys.scopes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Scope {
    #[serde(rename = "scrape")]
    Scrape,
    #[serde(rename = "read")]
    Read,
    #[serde(rename = "keys:manage")]
    KeysManage,
    #[serde(rename = "billing")]
    Billing,
}

impl Scope {
    pub const ALL: [Scope; 4] = [
        Scope::Scrape,
        Scope::Read,
        Scope::KeysManage,
        Scope::Billing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Scrape => "scrape",
            Scope::Read => "read",
            Scope::KeysManage => "keys:manage",
            Scope::Billing => "billing",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|sc| sc.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of scopes as bits: checking one on the hot path is a mask, not a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn from_strs<S: AsRef<str>>(items: &[S]) -> Scopes {
        Scopes(
            items
                .iter()
                .filter_map(|s| Scope::parse(s.as_ref()))
                .fold(0, |acc, s| acc | s.bit()),
        )
    }

    pub fn of(items: &[Scope]) -> Scopes {
        Scopes(items.iter().fold(0, |acc, s| acc | s.bit()))
    }

    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn to_vec(self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::as_str)
            .collect()
    }
}

/// The caller, once its key has been verified.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub key_id: String,
    pub account_id: Uuid,
    pub tier: String,
    pub scopes: Scopes,
    /// When this key stops working: the earlier of its expiry and the end of its rotation
    /// grace. A key it creates may not outlive it.
    pub expires_at: Option<chrono::DateTime<Utc>>,
    /// The key's own requests per minute, if it has a limit below its tier's.
    pub rate_limit: Option<u32>,
}

impl Authenticated {
    /// [`Error::MissingScope`] unless the key carries `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), Error> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(Error::MissingScope {
                required: scope.as_str(),
            })
        }
    }
}

pub struct AuthService {
    pub cache: KeyCache,
    pub last_used: last_used::LastUsed,
    db: Pool,
}

/// Compared against when the key id is unknown, so that path does the same work as a
/// wrong secret.
const NO_SUCH_DIGEST: KeyDigest = KeyDigest([0u8; 32]);

impl AuthService {
    pub fn new(db: Pool, cache: KeyCache) -> Arc<AuthService> {
        Arc::new(AuthService {
            cache,
            last_used: last_used::LastUsed::default(),
            db,
        })
    }

    /// Verifies a presented key. Every refusal is the same [`Error::InvalidApiKey`], whether
    /// the key was malformed, unknown, wrong, expired, revoked, past its rotation grace, or
    /// belongs to a suspended account: a caller learns nothing about which.
    pub async fn authenticate(&self, presented: Option<&str>) -> Result<Authenticated, Error> {
        // Operators see which refusal it was (in metrics); callers never do.
        let refuse = |outcome| {
            metrics::auth_outcome(outcome);
            Error::InvalidApiKey
        };
        let raw = presented.ok_or_else(|| refuse(AuthOutcome::Missing))?;
        let parsed = api_key::parse(raw).map_err(|_| refuse(AuthOutcome::Malformed))?;
        let record: Option<Arc<KeyRecord>> = self
            .cache
            .get(&parsed.id, &self.db)
            .await
            .inspect_err(|_| metrics::auth_outcome(AuthOutcome::Error))?;
        let (matches, record) = match record {
            Some(r) => (r.digest.matches(&parsed.digest), Some(r)),
            None => (NO_SUCH_DIGEST.matches(&parsed.digest), None),
        };
        let record = match (matches, record) {
            (true, Some(r)) => r,
            (false, Some(_)) => return Err(refuse(AuthOutcome::WrongSecret)),
            (_, None) => return Err(refuse(AuthOutcome::UnknownKey)),
        };
        let now = Utc::now();
        if !record.usable_at(now) {
            return Err(refuse(unusable_because(&record, now)));
        }
        metrics::auth_outcome(AuthOutcome::Ok);
        self.last_used.touch(&parsed.id, &record, now);
        Ok(Authenticated {
            key_id: parsed.id,
            account_id: record.account_id,
            tier: record.tier.clone(),
            scopes: record.scopes,
            expires_at: match (record.expires_at, record.grace_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            rate_limit: record.rate_limit,
        })
    }
}

/// Why a key that matched is not usable, for the metrics (the caller only gets the 401).
fn unusable_because(r: &KeyRecord, now: chrono::DateTime<Utc>) -> AuthOutcome {
    let past = |t: Option<chrono::DateTime<Utc>>| t.is_some_and(|t| t <= now);
    if past(r.revoked_at) {
        AuthOutcome::Revoked
    } else if past(r.grace_until) {
        AuthOutcome::Rotated
    } else if past(r.expires_at) {
        AuthOutcome::Expired
    } else {
        AuthOutcome::Suspended
    }
}

/// Tells every instance's cache (this one included) that a key or an account changed.
/// Sent inside the caller's transaction, so it is delivered exactly when the change commits.
pub async fn notify_key_changed(
    tx: &deadpool_postgres::Transaction<'_>,
    key_id: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&listener::CHANNEL, &format!("key:{key_id}")],
    )
    .await
    .map(|_| ())
}

pub async fn notify_account_changed(
    tx: &deadpool_postgres::Transaction<'_>,
    account_id: Uuid,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&listener::CHANNEL, &format!("account:{account_id}")],
    )
    .await
    .map(|_| ())
}
