//! The `api_keys` table: creating, listing, revoking and rotating keys. This module is the
//! only writer of that table; every change that affects verification NOTIFYs the caches in
//! the same transaction.

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use super::key::{self, NewKey};
use super::{notify_key_changed, Scope};
use crate::error::ApiError;
use crate::pagination::Cursor;

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

const COLUMNS: &str = "id, account_id, name, scopes, created_at, expires_at, revoked_at, last_used_at, rotated_to, grace_until";

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
    }
}

/// Validated input for a new key.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl KeySpec {
    pub fn parse(
        name: Option<String>,
        scopes: Option<Vec<String>>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<KeySpec, ApiError> {
        let name = name.unwrap_or_else(|| "default".to_owned());
        let name = name.trim().to_owned();
        // A name is a one-line label; PostgreSQL text cannot hold NUL at all.
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::validation(
                "name",
                "name must be 1 to 100 characters, without control characters.",
            ));
        }
        let scopes = match scopes {
            None => vec![Scope::Scrape, Scope::Read],
            Some(list) => {
                let mut out = Vec::new();
                for s in &list {
                    let sc = Scope::parse(s).ok_or_else(|| {
                        ApiError::validation(
                            "scopes",
                            format!(
                                "unknown scope {s:?}; known: scrape, read, keys:manage, billing."
                            ),
                        )
                    })?;
                    if !out.contains(&sc) {
                        out.push(sc);
                    }
                }
                if out.is_empty() {
                    return Err(ApiError::validation(
                        "scopes",
                        "a key needs at least one scope.",
                    ));
                }
                out
            }
        };
        if let Some(t) = expires_at {
            if t <= Utc::now() {
                return Err(ApiError::validation(
                    "expires_at",
                    "expires_at must be in the future.",
                ));
            }
        }
        Ok(KeySpec {
            name,
            scopes,
            expires_at,
        })
    }

    pub fn full_access(name: &str) -> KeySpec {
        KeySpec {
            name: name.to_owned(),
            scopes: Scope::ALL.to_vec(),
            expires_at: None,
        }
    }
}

pub async fn insert(
    tx: &Transaction<'_>,
    account_id: Uuid,
    spec: &KeySpec,
) -> Result<CreatedKey, ApiError> {
    let new: NewKey = key::generate();
    let scopes: Vec<&str> = spec.scopes.iter().map(|s| s.as_str()).collect();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO api_keys (id, account_id, name, digest, scopes, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
            ),
            &[
                &new.id,
                &account_id,
                &spec.name,
                &&new.digest.0[..],
                &scopes,
                &spec.expires_at,
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

pub async fn list(
    db: &impl GenericClient,
    account_id: Uuid,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<KeyView>, ApiError> {
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
) -> Result<Option<KeyView>, ApiError> {
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND account_id = $2"),
            &[&key_id, &account_id],
        )
        .await?;
    Ok(row.as_ref().map(view))
}

fn not_found() -> ApiError {
    ApiError::NotFound("No API key with that id on this account.".into())
}

/// Revokes a key (idempotent). `account_id` of `None` is the operator's path: any account.
pub async fn revoke(
    tx: &Transaction<'_>,
    account_id: Option<Uuid>,
    key_id: &str,
) -> Result<KeyView, ApiError> {
    if !key::is_key_id(key_id) {
        return Err(not_found());
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
        .ok_or_else(not_found)?;
    notify_key_changed(tx, key_id).await?;
    Ok(view(&row))
}

/// Issues a successor with the same name, scopes and expiry; the old key keeps working for
/// `grace_seconds`, then is refused.
pub async fn rotate(
    tx: &Transaction<'_>,
    account_id: Uuid,
    key_id: &str,
    grace_seconds: i64,
) -> Result<CreatedKey, ApiError> {
    if !(0..=MAX_GRACE_SECONDS).contains(&grace_seconds) {
        return Err(ApiError::validation(
            "grace_seconds",
            format!("grace_seconds must be between 0 and {MAX_GRACE_SECONDS}."),
        ));
    }
    if !key::is_key_id(key_id) {
        return Err(not_found());
    }
    let old = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND account_id = $2 FOR UPDATE"),
            &[&key_id, &account_id],
        )
        .await?
        .map(|r| view(&r))
        .ok_or_else(not_found)?;
    if old.revoked_at.is_some() {
        return Err(ApiError::Conflict {
            kind: "key_revoked",
            detail: "A revoked key cannot be rotated.".into(),
        });
    }
    if let Some(next) = &old.rotated_to {
        return Err(ApiError::Conflict {
            kind: "key_already_rotated",
            detail: format!("This key was already rotated to {next}."),
        });
    }
    let spec = KeySpec {
        name: old.name.clone(),
        scopes: old.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        expires_at: old.expires_at,
    };
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
