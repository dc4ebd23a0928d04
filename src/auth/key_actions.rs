//! What a customer's key may do to its own account's keys (`/v1/keys`): list and read them,
//! create, revoke and rotate them. A key only ever reaches its own account's keys; another
//! account's key id is simply not found. Each change is one transaction that writes its audit
//! row (actor: the calling key), and a revoked or rotated key is dropped from this instance's
//! cache as soon as the change commits, without waiting for its own NOTIFY to come back (the
//! other instances hear the NOTIFY).

use deadpool_postgres::Pool;
use serde_json::json;
use uuid::Uuid;

use super::cache::KeyCache;
use super::key_store::{self, CreatedKey, KeySpec, KeyView, Power, DEFAULT_GRACE_SECONDS};
use super::{api_key, Authenticated, Error};
use crate::audit::{self, Action, Actor};
use crate::db;
use crate::pagination::Cursor;
use crate::tiers::Tiers;

/// Creates a key for the caller's account. `spec` is what the client asked for; the key's
/// own `rate_limit` is checked against the caller's tier, what the request left out is
/// inherited from the caller, and anything beyond the caller's power is refused (see
/// [`KeySpec::bounded_by`]). The account's tier caps its active keys.
pub async fn create(
    db: &Pool,
    tiers: &Tiers,
    caller: &Authenticated,
    spec: KeySpec,
    rate_limit: Option<i64>,
) -> Result<CreatedKey, Error> {
    let actor = Actor::Key(caller.key_id.clone());
    create_by(db, tiers, caller, &actor, spec, rate_limit).await
}

/// [`create`], recorded on the audit trail as `actor`'s doing: the console acts with an
/// owner's power but is not a key (see `console::session::owner`).
pub async fn create_by(
    db: &Pool,
    tiers: &Tiers,
    caller: &Authenticated,
    actor: &Actor,
    spec: KeySpec,
    rate_limit: Option<i64>,
) -> Result<CreatedKey, Error> {
    let tier = tiers.get_or_default(&caller.tier);
    let spec = spec
        .with_rate_limit(rate_limit, tier.requests_per_minute)?
        .bounded_by(&Power::from(caller))?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let created = key_store::insert_capped(&tx, tiers, caller.account_id, &spec).await?;
    let v = &created.view;
    audit::record(
        &tx,
        actor,
        Action::KeyCreate,
        Some(caller.account_id),
        Some(&v.id),
        json!({"name": v.name, "scopes": v.scopes, "expires_at": v.expires_at}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(new_key_id = %created.view.id, "key created");
    Ok(created)
}

/// The account's keys, newest first: `limit + 1` rows, so the page can tell there is more.
pub async fn list(
    db: &Pool,
    account_id: Uuid,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<KeyView>, db::Error> {
    let client = db.get().await?;
    key_store::list(&client, account_id, limit, cursor).await
}

/// One of the account's keys.
pub async fn get(db: &Pool, account_id: Uuid, key_id: &str) -> Result<KeyView, Error> {
    // Not of the shape of a key id: no need to ask the database.
    if !api_key::is_key_id(key_id) {
        return Err(Error::KeyNotFound);
    }
    let client = db.get().await?;
    key_store::get(&client, account_id, key_id)
        .await?
        .ok_or(Error::KeyNotFound)
}

/// Revokes one of the account's keys (idempotent; a key may revoke itself).
pub async fn revoke(
    db: &Pool,
    cache: &KeyCache,
    caller: &Authenticated,
    key_id: &str,
) -> Result<KeyView, Error> {
    revoke_by(
        db,
        cache,
        caller,
        &Actor::Key(caller.key_id.clone()),
        key_id,
    )
    .await
}

/// [`revoke`], recorded as `actor`'s doing.
pub async fn revoke_by(
    db: &Pool,
    cache: &KeyCache,
    caller: &Authenticated,
    actor: &Actor,
    key_id: &str,
) -> Result<KeyView, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let k = key_store::revoke(&tx, Some(caller.account_id), key_id).await?;
    audit::record(
        &tx,
        actor,
        Action::KeyRevoke,
        Some(caller.account_id),
        Some(key_id),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    cache.invalidate_key(key_id).await;
    tracing::info!(revoked_key_id = %key_id, "key revoked");
    Ok(k)
}

/// Rotates one of the account's keys (see [`key_store::rotate`]); the old key keeps working
/// for `grace_seconds` ([`DEFAULT_GRACE_SECONDS`] when absent).
pub async fn rotate(
    db: &Pool,
    cache: &KeyCache,
    caller: &Authenticated,
    key_id: &str,
    grace_seconds: Option<i64>,
) -> Result<CreatedKey, Error> {
    let actor = Actor::Key(caller.key_id.clone());
    rotate_by(db, cache, caller, &actor, key_id, grace_seconds).await
}

/// [`rotate`], recorded as `actor`'s doing.
pub async fn rotate_by(
    db: &Pool,
    cache: &KeyCache,
    caller: &Authenticated,
    actor: &Actor,
    key_id: &str,
    grace_seconds: Option<i64>,
) -> Result<CreatedKey, Error> {
    let grace = grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let created =
        key_store::rotate(&tx, caller.account_id, key_id, grace, &Power::from(caller)).await?;
    audit::record(
        &tx,
        actor,
        Action::KeyRotate,
        Some(caller.account_id),
        Some(key_id),
        json!({"new_key_id": created.view.id, "grace_seconds": grace}),
    )
    .await?;
    tx.commit().await?;
    cache.invalidate_key(key_id).await;
    tracing::info!(old_key_id = %key_id, new_key_id = %created.view.id, grace_seconds = grace, "key rotated");
    Ok(created)
}
