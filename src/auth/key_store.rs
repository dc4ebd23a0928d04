//! The `api_keys` table: creating, listing, revoking and rotating keys. This module is the
//! only writer of that table; every change that affects verification NOTIFYs the caches in
//! the same transaction.
//!
//! Two fences stand around key creation by a customer's key:
//! - a key never creates more power than it has ([`KeySpec::bounded_by`]): no scope it lacks,
//!   no lifetime past its own, no rate limit above its own — otherwise a 12-hour login key
//!   (`keys:manage` + `read`) could mint a never-expiring key with `billing` and `scrape`,
//!   and rotating a stronger key would hand over that key's successor;
//! - an account holds at most its tier's `max_keys` active keys ([`insert_capped`]), counted
//!   under the account's row lock so two creates at the cap cannot both see room.

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use super::api_key::{self, NewKey};
use super::{notify_key_changed, Authenticated, Error, Scope, Scopes};
use crate::db;
use crate::pagination::Cursor;
use crate::tiers::Tiers;

pub const MAX_GRACE_SECONDS: i64 = 86_400;
pub const DEFAULT_GRACE_SECONDS: i64 = 3_600;

/// A key as the API shows it: never the secret.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    /// The key id: the public 12 characters after `km_live_`.
    #[schema(example = "a1B2c3D4e5F6")]
    pub id: String,
    #[schema(value_type = String, example = "api_key")]
    pub object: &'static str,
    pub account_id: Uuid,
    pub name: String,
    #[schema(value_type = Vec<Scope>)]
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub rotated_to: Option<String>,
    pub grace_until: Option<DateTime<Utc>>,
    /// The key's own limit in requests per minute, enforced on top of the account's tier
    /// limit (which all the account's keys share); `null`: only the tier's.
    #[schema(minimum = 1)]
    pub rate_limit: Option<u32>,
    /// What the key may spend per UTC day or month, and what it spent in the current
    /// period; `null`: only the balance limits it.
    pub spend_limit: Option<crate::credits::key_caps::SpendLimitView>,
}

/// The creating response: the view plus the plaintext, which appears here and nowhere else.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub view: KeyView,
    /// The whole key, `km_live_<id>_<secret><checksum>` (70 characters). Shown only once.
    #[schema(example = "km_live_a1B2c3D4e5F6_…")]
    pub key: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("view", &self.view)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

const COLUMNS: &str = "id, account_id, name, scopes, created_at, expires_at, revoked_at, last_used_at, rotated_to, grace_until, rate_limit";

fn view(row: &Row) -> KeyView {
    KeyView {
        id: row.get(0),
        object: "api_key",
        account_id: row.get(1),
        name: row.get(2),
        scopes: row.get(3),
        created_at: row.get(4),
        expires_at: row.get(5),
        revoked_at: row.get(6),
        last_used_at: row.get(7),
        rotated_to: row.get(8),
        grace_until: row.get(9),
        rate_limit: row
            .get::<_, Option<i32>>(10)
            .and_then(|r| u32::try_from(r).ok()),
        spend_limit: None,
    }
}

/// Validated input for a new key.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's own requests per minute (at most its tier's).
    pub rate_limit: Option<u32>,
}

/// What a key may hand on to a key it creates or rotates: its scopes, its lifetime and its
/// own rate limit.
#[derive(Debug, Clone, Copy)]
pub struct Power {
    pub scopes: Scopes,
    pub expires_at: Option<DateTime<Utc>>,
    pub rate_limit: Option<u32>,
}

impl From<&Authenticated> for Power {
    fn from(a: &Authenticated) -> Power {
        Power {
            scopes: a.scopes,
            expires_at: a.expires_at,
            rate_limit: a.rate_limit,
        }
    }
}

impl KeySpec {
    pub fn parse(
        name: Option<String>,
        scopes: Option<Vec<String>>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<KeySpec, Error> {
        let name = name.unwrap_or_else(|| "default".to_owned());
        let name = name.trim().to_owned();
        // A name is a one-line label; PostgreSQL text cannot hold NUL at all.
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::InvalidName);
        }
        let scopes = match scopes {
            None => vec![Scope::Scrape, Scope::Read],
            Some(list) => {
                let mut out = Vec::new();
                for s in &list {
                    let sc = Scope::parse(s).ok_or_else(|| Error::UnknownScope(s.clone()))?;
                    if !out.contains(&sc) {
                        out.push(sc);
                    }
                }
                if out.is_empty() {
                    return Err(Error::NoScopes);
                }
                out
            }
        };
        if let Some(t) = expires_at {
            if t <= Utc::now() {
                return Err(Error::ExpiryNotInFuture);
            }
        }
        Ok(KeySpec {
            name,
            scopes,
            expires_at,
            rate_limit: None,
        })
    }

    /// Adds a key's own rate limit: 1 up to the tier's requests per minute.
    pub fn with_rate_limit(
        mut self,
        rate_limit: Option<i64>,
        tier_rpm: u32,
    ) -> Result<KeySpec, Error> {
        let Some(r) = rate_limit else {
            return Ok(self);
        };
        // The column is a PostgreSQL integer; an unlimited tier's u32::MAX does not fit.
        let max = i64::from(tier_rpm).min(i64::from(i32::MAX));
        if !(1..=max).contains(&r) {
            return Err(Error::RateLimitOutOfRange { max });
        }
        self.rate_limit = u32::try_from(r).ok();
        Ok(self)
    }

    pub fn full_access(name: &str) -> KeySpec {
        KeySpec {
            name: name.to_owned(),
            scopes: Scope::ALL.to_vec(),
            expires_at: None,
            rate_limit: None,
        }
    }

    /// A key created by `creator`: what the request left out is inherited from the creator
    /// (its expiry, its rate limit), and anything beyond the creator's own power is refused.
    pub fn bounded_by(mut self, creator: &Power) -> Result<KeySpec, Error> {
        if self.expires_at.is_none() {
            self.expires_at = creator.expires_at;
        }
        if self.rate_limit.is_none() {
            self.rate_limit = creator.rate_limit;
        }
        self.check_within(creator, "create")?;
        Ok(self)
    }

    /// Refuses a key that would carry a scope, a lifetime or a rate the creator lacks.
    fn check_within(&self, creator: &Power, verb: &'static str) -> Result<(), Error> {
        let missing: Vec<&'static str> = self
            .scopes
            .iter()
            .filter(|s| !creator.scopes.contains(**s))
            .map(|s| s.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Error::ScopesBeyondCreator { verb, missing });
        }
        if let Some(end) = creator.expires_at {
            if self.expires_at.is_none_or(|t| t > end) {
                return Err(Error::OutlivesCreator { verb, ends_at: end });
            }
        }
        if let Some(rate) = creator.rate_limit {
            if self.rate_limit.is_none_or(|r| r > rate) {
                return Err(Error::RateAboveCreator { verb, rate });
            }
        }
        Ok(())
    }
}

pub async fn insert(
    tx: &Transaction<'_>,
    account_id: Uuid,
    spec: &KeySpec,
) -> Result<CreatedKey, db::Error> {
    let new: NewKey = api_key::generate();
    let scopes: Vec<&str> = spec.scopes.iter().map(|s| s.as_str()).collect();
    let rate_limit: Option<i32> = spec.rate_limit.and_then(|r| i32::try_from(r).ok());
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO api_keys (id, account_id, name, digest, scopes, expires_at, rate_limit)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
            ),
            &[
                &new.id,
                &account_id,
                &spec.name,
                &&new.digest.0[..],
                &scopes,
                &spec.expires_at,
                &rate_limit,
            ],
        )
        .await?;
    // A negative cache entry for this id (someone guessed it) must not outlive its creation.
    notify_key_changed(tx, &new.id).await?;
    Ok(CreatedKey {
        view: view(&row),
        key: new.plaintext,
    })
}

/// Inserts a key unless the account already holds its tier's `max_keys` active keys
/// (unrevoked, unexpired and not rotated away — a rotated key is counted by its successor):
/// then [`Error::KeyLimitReached`]. The account's row is locked first, so concurrent creates for
/// one account count one after the other and two at the cap cannot both succeed; the tier is
/// read from that row, so a tier change is seen at once.
pub async fn insert_capped(
    tx: &Transaction<'_>,
    tiers: &Tiers,
    account_id: Uuid,
    spec: &KeySpec,
) -> Result<CreatedKey, Error> {
    let tier: String = tx
        .query_opt(
            "SELECT tier FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account_id],
        )
        .await?
        .ok_or(Error::AccountNotFound)?
        .get(0);
    if let Some(max) = tiers.get_or_default(&tier).max_keys {
        let active: i64 = tx
            .query_one(
                "SELECT count(*) FROM api_keys
                  WHERE account_id = $1 AND revoked_at IS NULL AND rotated_to IS NULL
                    AND (expires_at IS NULL OR expires_at > now())",
                &[&account_id],
            )
            .await?
            .get(0);
        if active >= i64::from(max) {
            return Err(Error::KeyLimitReached { tier, max });
        }
    }
    Ok(insert(tx, account_id, spec).await?)
}

pub async fn list(
    db: &impl GenericClient,
    account_id: Uuid,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<KeyView>, db::Error> {
    let (at, id) = match cursor {
        Some(c) => (Some(c.at), Some(c.id)),
        None => (None, None),
    };
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM api_keys
                  WHERE account_id = $1
                    AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::text))
                  ORDER BY created_at DESC, id DESC
                  LIMIT $4"
            ),
            &[&account_id, &at, &id, &(limit + 1)],
        )
        .await?;
    Ok(rows.iter().map(view).collect())
}

pub async fn get(
    db: &impl GenericClient,
    account_id: Uuid,
    key_id: &str,
) -> Result<Option<KeyView>, db::Error> {
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND account_id = $2"),
            &[&key_id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(view))
}

/// Renames one of the account's keys (`name` checked by the caller, as [`KeySpec::parse`]
/// does).
pub async fn rename(
    tx: &Transaction<'_>,
    account_id: Uuid,
    key_id: &str,
    name: &str,
) -> Result<KeyView, Error> {
    if !api_key::is_key_id(key_id) {
        return Err(Error::KeyNotFound);
    }
    let row = tx
        .query_opt(
            &format!(
                "UPDATE api_keys SET name = $3 WHERE id = $1 AND account_id = $2
                  RETURNING {COLUMNS}"
            ),
            &[&key_id, &account_id, &name],
        )
        .await?
        .ok_or(Error::KeyNotFound)?;
    Ok(view(&row))
}

/// Revokes a key (idempotent). `account_id` of `None` is the operator's path: any account.
pub async fn revoke(
    tx: &Transaction<'_>,
    account_id: Option<Uuid>,
    key_id: &str,
) -> Result<KeyView, Error> {
    if !api_key::is_key_id(key_id) {
        return Err(Error::KeyNotFound);
    }
    let row = tx
        .query_opt(
            &format!(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
                  WHERE id = $1 AND ($2::uuid IS NULL OR account_id = $2)
                  RETURNING {COLUMNS}"
            ),
            &[&key_id, &account_id],
        )
        .await?
        .ok_or(Error::KeyNotFound)?;
    notify_key_changed(tx, key_id).await?;
    Ok(view(&row))
}

/// Issues a successor with the same name, scopes, expiry and rate limit, whatever the caller
/// asks; the old key keeps working for `grace_seconds`, then is refused. The successor's
/// plaintext goes to the caller, so a caller may only rotate a key it could have created
/// itself (one of the beyond-its-power [`Error`]s otherwise). The active-key count does not change (the old
/// key leaves it as its successor enters), so the tier's `max_keys` never refuses a rotation.
pub async fn rotate(
    tx: &Transaction<'_>,
    account_id: Uuid,
    key_id: &str,
    grace_seconds: i64,
    caller: &Power,
) -> Result<CreatedKey, Error> {
    if !(0..=MAX_GRACE_SECONDS).contains(&grace_seconds) {
        return Err(Error::GraceOutOfRange);
    }
    if !api_key::is_key_id(key_id) {
        return Err(Error::KeyNotFound);
    }
    let old = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND account_id = $2 FOR UPDATE"),
            &[&key_id, &account_id],
        )
        .await?
        .map(|r| view(&r))
        .ok_or(Error::KeyNotFound)?;
    if old.revoked_at.is_some() {
        return Err(Error::KeyRevoked);
    }
    if let Some(next) = &old.rotated_to {
        return Err(Error::KeyAlreadyRotated { next: next.clone() });
    }
    let spec = KeySpec {
        name: old.name.clone(),
        scopes: old.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        expires_at: old.expires_at,
        rate_limit: old.rate_limit,
    };
    spec.check_within(caller, "rotate")?;
    let created = insert(tx, account_id, &spec).await?;
    let grace_until = Utc::now() + Duration::seconds(grace_seconds);
    tx.execute(
        "UPDATE api_keys SET rotated_to = $2, grace_until = $3 WHERE id = $1",
        &[&key_id, &created.view.id, &grace_until],
    )
    .await?;
    notify_key_changed(tx, key_id).await?;
    Ok(created)
}
