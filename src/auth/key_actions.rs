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
use crate::credits::key_caps::{self, SpendLimit};
use crate::db;
use crate::pagination::Cursor;
use crate::tiers::Tiers;

/// Creates a key for the caller's account. `spec` is what the client asked for; the key's
/// own `rate_limit` is checked against the caller's tier, what the request left out is
/// inherited from the caller, and anything beyond the caller's power is refused (see
/// [`KeySpec::bounded_by`]). The account's tier caps its active keys.
///
/// `spend_limit` follows the same fence: absent, the new key inherits the caller's own
/// limit (if it has one); a caller with a limit may only create keys limited to no more
/// credits over the same period.
pub async fn create(
    db: &Pool,
    tiers: &Tiers,
    caller: &Authenticated,
    spec: KeySpec,
    rate_limit: Option<i64>,
    spend_limit: Option<SpendLimit>,
) -> Result<CreatedKey, Error> {
    let actor = Actor::Key(caller.key_id.clone());
    create_by(db, tiers, caller, &actor, spec, rate_limit, spend_limit).await
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
    spend_limit: Option<SpendLimit>,
) -> Result<CreatedKey, Error> {
    let tier = tiers.get_or_default(&caller.tier);
    let spec = spec
        .with_rate_limit(rate_limit, tier.requests_per_minute)?
        .bounded_by(&Power::from(caller))?;
    let spend_limit = spend_limit.map(SpendLimit::check).transpose()?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let own = key_caps::limit_of(&tx, &caller.key_id).await?;
    let spend_limit = spend_limit.or(own);
    spend_within(spend_limit, own, "create")?;
    let mut created = key_store::insert_capped(&tx, tiers, caller.account_id, &spec).await?;
    if spend_limit.is_some() {
        key_caps::set(&tx, caller.account_id, &created.view.id, spend_limit).await?;
        attach(&tx, std::slice::from_mut(&mut created.view)).await?;
    }
    let v = &created.view;
    crate::events::sources::key_created(&tx, v).await?;
    audit::record(
        &tx,
        actor,
        Action::KeyCreate,
        Some(caller.account_id),
        Some(&v.id),
        json!({"name": v.name, "scopes": v.scopes, "expires_at": v.expires_at,
               "spend_limit": spend_limit.map(|l| json!({"credits": l.credits, "period": l.period}))}),
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
    let mut keys = key_store::list(&client, account_id, limit, cursor).await?;
    attach(&client, &mut keys).await.map_err(|e| match e {
        Error::Db(e) => e,
        other => db::Error::Other(anyhow::anyhow!(other.to_string())),
    })?;
    Ok(keys)
}

/// One of the account's keys.
pub async fn get(db: &Pool, account_id: Uuid, key_id: &str) -> Result<KeyView, Error> {
    // Not of the shape of a key id: no need to ask the database.
    if !api_key::is_key_id(key_id) {
        return Err(Error::KeyNotFound);
    }
    let client = db.get().await?;
    let mut k = key_store::get(&client, account_id, key_id)
        .await?
        .ok_or(Error::KeyNotFound)?;
    attach(&client, std::slice::from_mut(&mut k)).await?;
    Ok(k)
}

/// Changes one of the account's keys: its `name` and its `spend_limit` (`Some(None)`
/// removes it), each when present. The caller's own limit fences the new one as on create,
/// and a caller with a limit cannot lift another key's (nor its own).
pub async fn update(
    db: &Pool,
    caller: &Authenticated,
    key_id: &str,
    name: Option<String>,
    spend_limit: Option<Option<SpendLimit>>,
) -> Result<KeyView, Error> {
    if !api_key::is_key_id(key_id) {
        return Err(Error::KeyNotFound);
    }
    let name = name
        .map(|n| KeySpec::parse(Some(n), None, None).map(|s| s.name))
        .transpose()?;
    let spend_limit = spend_limit
        .map(|l| l.map(SpendLimit::check).transpose())
        .transpose()?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    // The key must be this account's before anything about it is changed.
    key_store::get(&tx, caller.account_id, key_id)
        .await?
        .ok_or(Error::KeyNotFound)?;
    if let Some(limit) = spend_limit {
        let own = key_caps::limit_of(&tx, &caller.key_id).await?;
        spend_within(limit, own, "update")?;
        key_caps::set(&tx, caller.account_id, key_id, limit).await?;
    }
    if let Some(name) = &name {
        key_store::rename(&tx, caller.account_id, key_id, name).await?;
    }
    let mut k = key_store::get(&tx, caller.account_id, key_id)
        .await?
        .ok_or(Error::KeyNotFound)?;
    attach(&tx, std::slice::from_mut(&mut k)).await?;
    tx.commit().await?;
    tracing::info!(updated_key_id = %key_id, "key updated");
    Ok(k)
}

/// Refuses a spend limit beyond the caller's own: none, a higher one, or another period.
fn spend_within(
    limit: Option<SpendLimit>,
    own: Option<SpendLimit>,
    verb: &'static str,
) -> Result<(), Error> {
    let Some(own) = own else {
        return Ok(());
    };
    match limit {
        Some(l) if l.period == own.period && l.credits <= own.credits => Ok(()),
        _ => Err(Error::SpendAboveCreator {
            verb,
            credits: own.credits,
            period: own.period.as_str(),
        }),
    }
}

/// Fills in the keys' spend limits.
async fn attach(
    db: &impl deadpool_postgres::GenericClient,
    keys: &mut [KeyView],
) -> Result<(), Error> {
    let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
    let mut views = key_caps::views(db, &ids).await?;
    for k in keys {
        k.spend_limit = views.remove(&k.id);
    }
    Ok(())
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
    let mut k = key_store::revoke(&tx, Some(caller.account_id), key_id).await?;
    attach(&tx, std::slice::from_mut(&mut k)).await?;
    crate::events::sources::key_revoked(&tx, &k).await?;
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
    let mut created =
        key_store::rotate(&tx, caller.account_id, key_id, grace, &Power::from(caller)).await?;
    // The successor carries the old key's spend limit and what it spent in the period, so a
    // rotation is no way around a limit (nor, for a limited caller, a way to an unlimited key).
    let theirs = key_caps::limit_of(&tx, key_id).await?;
    let own = key_caps::limit_of(&tx, &caller.key_id).await?;
    spend_within(theirs, own, "rotate")?;
    if theirs.is_some() {
        key_caps::inherit(&tx, key_id, &created.view.id).await?;
        attach(&tx, std::slice::from_mut(&mut created.view)).await?;
    }
    crate::events::sources::key_created(&tx, &created.view).await?;
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
