//! Operator actions, shared by the `keymeter admin …` CLI and the `/admin` HTTP API so the
//! two cannot drift apart. Each is one transaction, and each writes its audit row in that
//! transaction: an action that commits is on the record, one that fails leaves no trace.

use deadpool_postgres::Pool;
use serde_json::json;
use uuid::Uuid;

use crate::accounts::{self, Account, Email, NewAccount};
use crate::audit::{self, Action, Actor};
use crate::auth::key_store::{self, CreatedKey, KeySpec, KeyView};
use crate::credits::key_caps::{self, SpendLimit};
use crate::credits::{self, Movement};
use crate::db;
use crate::tiers::{Tiers, DEFAULT_TIER};

/// Why an operator action was refused: the account or key domain's own refusal, the
/// ledger's, or one of the action's own checks. The CLI prints it as it is; the admin API
/// answers with the wrapped domain's problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Account(#[from] accounts::Error),
    #[error(transparent)]
    Key(#[from] crate::auth::Error),
    #[error(transparent)]
    Credits(crate::credits::Error),
    #[error("amount must not be zero.")]
    ZeroAmount,
    #[error("reason must be 1 to 500 characters, without NUL characters.")]
    InvalidReason,
    #[error(transparent)]
    Db(#[from] db::Error),
}

crate::impl_db_error_from!(Error);

/// One account, by id.
pub async fn get_account(db: &Pool, account_id: Uuid) -> Result<Account, Error> {
    let client = db.get().await?;
    Ok(accounts::get(&client, account_id)
        .await?
        .ok_or_else(accounts::not_found)?)
}

pub async fn create_account(
    db: &Pool,
    tiers: &Tiers,
    actor: &Actor,
    email: &str,
    tier: Option<&str>,
    credits: i64,
) -> Result<(Account, CreatedKey), Error> {
    let email = Email::parse(email)?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let out = accounts::create(
        &tx,
        tiers,
        NewAccount {
            email,
            password_hash: None,
            tier: tier.unwrap_or(DEFAULT_TIER).to_owned(),
            credits,
            credits_expire_at: None,
        },
        &KeySpec::full_access("default"),
    )
    .await?;
    let (account, key) = &out;
    audit::record(
        &tx,
        actor,
        Action::AccountCreate,
        Some(account.id),
        None,
        json!({
            "email": account.email,
            "tier": account.tier,
            "credits": credits,
            "first_key_id": key.view.id,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// An operator's key for an account, with its `spend_limit` if given (`credits::key_caps`).
pub async fn create_key(
    db: &Pool,
    actor: &Actor,
    account_id: Uuid,
    spec: &KeySpec,
    spend_limit: Option<SpendLimit>,
) -> Result<CreatedKey, Error> {
    let spend_limit = spend_limit
        .map(SpendLimit::check)
        .transpose()
        .map_err(Error::Credits)?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    if accounts::get(&tx, account_id).await?.is_none() {
        return Err(accounts::not_found().into());
    }
    let mut k = key_store::insert(&tx, account_id, spec).await?;
    if spend_limit.is_some() {
        key_caps::set(&tx, account_id, &k.view.id, spend_limit)
            .await
            .map_err(Error::Credits)?;
        k.view.spend_limit = key_caps::views(&tx, &[k.view.id.as_str()])
            .await
            .map_err(Error::Credits)?
            .remove(&k.view.id);
    }
    crate::events::sources::key_created(&tx, &k.view).await?;
    audit::record(
        &tx,
        actor,
        Action::KeyCreate,
        Some(account_id),
        Some(&k.view.id),
        json!({"name": k.view.name, "scopes": k.view.scopes, "expires_at": k.view.expires_at}),
    )
    .await?;
    tx.commit().await?;
    Ok(k)
}

pub async fn set_tier(
    db: &Pool,
    tiers: &Tiers,
    actor: &Actor,
    account_id: Uuid,
    tier: &str,
) -> Result<Account, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let before = accounts::get(&tx, account_id)
        .await?
        .ok_or_else(accounts::not_found)?;
    let a = accounts::set_tier(&tx, tiers, account_id, tier).await?;
    audit::record(
        &tx,
        actor,
        Action::AccountSetTier,
        Some(account_id),
        None,
        json!({"from": before.tier, "to": a.tier}),
    )
    .await?;
    tx.commit().await?;
    Ok(a)
}

pub async fn set_active(
    db: &Pool,
    actor: &Actor,
    account_id: Uuid,
    active: bool,
) -> Result<Account, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let before = accounts::get(&tx, account_id)
        .await?
        .ok_or_else(accounts::not_found)?;
    let a = accounts::set_status(&tx, account_id, active).await?;
    let action = if active {
        Action::AccountUnsuspend
    } else {
        Action::AccountSuspend
    };
    audit::record(
        &tx,
        actor,
        action,
        Some(account_id),
        None,
        json!({"from": before.status, "to": a.status}),
    )
    .await?;
    tx.commit().await?;
    Ok(a)
}

pub async fn revoke_key(db: &Pool, actor: &Actor, key_id: &str) -> Result<KeyView, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let k = key_store::revoke(&tx, None, key_id).await?;
    crate::events::sources::key_revoked(&tx, &k).await?;
    audit::record(
        &tx,
        actor,
        Action::KeyRevoke,
        Some(k.account_id),
        Some(&k.id),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(k)
}

/// A positive amount is a `grant`; a negative one an `adjustment`, which may not take the
/// balance below zero. A grant with `expires_at` expires (`credits::grants`); an adjustment
/// cannot carry one.
pub async fn grant_credits(
    db: &Pool,
    actor: &Actor,
    account_id: Uuid,
    amount: i64,
    reason: &str,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Movement, Error> {
    if amount == 0 {
        return Err(Error::ZeroAmount);
    }
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 || reason.contains('\0') {
        return Err(Error::InvalidReason);
    }
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let m = match expires_at {
        Some(at) => credits::grants::grant_expiring(&tx, account_id, amount, reason, at).await,
        None => credits::ledger::adjust(&tx, account_id, amount, reason).await,
    }
    .map_err(Error::Credits)?;
    crate::events::sources::credits_granted(&tx, &m).await?;
    let action = if amount > 0 {
        Action::CreditsGrant
    } else {
        Action::CreditsAdjust
    };
    audit::record(
        &tx,
        actor,
        action,
        Some(account_id),
        None,
        json!({
            "amount": amount,
            "reason": reason,
            "balance_after": m.balance_after,
            "ledger_entry_id": m.id,
            "expires_at": expires_at,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(m)
}
