//! Operator actions, shared by the `keymeter admin …` CLI and the `/admin` HTTP API so the
//! two cannot drift apart. Each is one transaction.

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::accounts::{self, Account, Email, NewAccount};
use crate::auth::keys::{self, CreatedKey, KeySpec, KeyView};
use crate::credits::{self, Movement};
use crate::error::ApiError;
use crate::ratelimit::tiers::{Tiers, DEFAULT_TIER};

pub async fn create_account(
    db: &Pool,
    tiers: &Tiers,
    email: &str,
    tier: Option<&str>,
    credits: i64,
) -> Result<(Account, CreatedKey), ApiError> {
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
        },
        &KeySpec::full_access("default"),
    )
    .await?;
    tx.commit().await?;
    Ok(out)
}

pub async fn create_key(
    db: &Pool,
    account_id: Uuid,
    spec: &KeySpec,
) -> Result<CreatedKey, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    if accounts::get(&tx, account_id).await?.is_none() {
        return Err(accounts::not_found());
    }
    let k = keys::insert(&tx, account_id, spec).await?;
    tx.commit().await?;
    Ok(k)
}

pub async fn set_tier(
    db: &Pool,
    tiers: &Tiers,
    account_id: Uuid,
    tier: &str,
) -> Result<Account, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let a = accounts::set_tier(&tx, tiers, account_id, tier).await?;
    tx.commit().await?;
    Ok(a)
}

pub async fn set_active(db: &Pool, account_id: Uuid, active: bool) -> Result<Account, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let a = accounts::set_status(&tx, account_id, active).await?;
    tx.commit().await?;
    Ok(a)
}

pub async fn revoke_key(db: &Pool, key_id: &str) -> Result<KeyView, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let k = keys::revoke(&tx, None, key_id).await?;
    tx.commit().await?;
    Ok(k)
}

/// A positive amount is a `grant`; a negative one an `adjustment`, which may not take the
/// balance below zero.
pub async fn grant_credits(
    db: &Pool,
    account_id: Uuid,
    amount: i64,
    reason: &str,
) -> Result<Movement, ApiError> {
    if amount == 0 {
        return Err(ApiError::validation("amount", "amount must not be zero."));
    }
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 || reason.contains('\0') {
        return Err(ApiError::validation(
            "reason",
            "reason must be 1 to 500 characters, without NUL characters.",
        ));
    }
    let client = db.get().await?;
    credits::ledger::adjust(&client, account_id, amount, reason).await
}
