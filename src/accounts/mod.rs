//! Accounts: who pays, on which tier, in which state. This module owns the `accounts` table
//! (except `credit_balance`, which only `credits` writes) and `login_failures`.

mod error;
pub mod login;
pub mod password;
pub mod reads;
mod self_serve;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use serde::Serialize;
use uuid::Uuid;

use crate::auth::key_store::{self, CreatedKey, KeySpec};
use crate::auth::notify_account_changed;
use crate::credits::{self, Kind};
use crate::db;
use crate::tiers::Tiers;
pub use error::Error;
pub use self_serve::{change_password, check_password, password_login, set_password, signup};

/// An email address that passed a deliberately simple check (one `@`, a dotted domain, no
/// spaces, ≤ 254 characters). Deliverability is the mail server's business, not a regex's.
#[derive(Debug, Clone)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, Error> {
        let s = raw.trim();
        let bad = || Error::InvalidEmail;
        if s.is_empty() || s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (local, domain) = s.rsplit_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || local.contains('@')
            || domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err(bad());
        }
        Ok(Email(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-insensitive identity of the address (what uniqueness and lockout key on).
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Account {
    pub id: Uuid,
    #[schema(value_type = String, example = "account")]
    pub object: &'static str,
    pub email: String,
    pub tier: String,
    pub credit_balance: i64,
    /// `active` or `suspended`.
    #[schema(example = "active")]
    pub status: String,
    pub created_at: DateTime<Utc>,
    /// Which derivation of the job-webhook signing secret is current (see jobs::webhooks).
    #[serde(skip)]
    pub webhook_secret_version: i32,
}

pub(crate) const COLUMNS: &str =
    "id, email, tier, credit_balance, status, created_at, webhook_secret_version";

pub(crate) fn account(row: &tokio_postgres::Row) -> Account {
    Account {
        id: row.get(0),
        object: "account",
        email: row.get(1),
        tier: row.get(2),
        credit_balance: row.get(3),
        status: row.get(4),
        created_at: row.get(5),
        webhook_secret_version: row.get(6),
    }
}

pub async fn get(db: &impl GenericClient, id: Uuid) -> Result<Option<Account>, db::Error> {
    // Prepared once per connection: one round trip per read instead of parse + execute.
    let stmt = db
        .prepare_cached(&format!("SELECT {COLUMNS} FROM accounts WHERE id = $1"))
        .await?;
    let row = db.query_opt(&stmt, &[&id]).await?;
    Ok(row.as_ref().map(account))
}

/// For `.ok_or_else(accounts::not_found)` after [`get`].
pub fn not_found() -> Error {
    Error::NotFound
}

/// [`Error::UnknownTier`] unless `tier` is configured.
fn known_tier(tiers: &Tiers, tier: &str) -> Result<(), Error> {
    if tiers.get(tier).is_some() {
        return Ok(());
    }
    Err(Error::UnknownTier {
        tier: tier.to_owned(),
        known: tiers.names().collect::<Vec<_>>().join(", "),
    })
}

pub struct NewAccount {
    pub email: Email,
    pub password_hash: Option<String>,
    pub tier: String,
    pub credits: i64,
    /// The starting credits expire then (an expiring grant, `credits::grants`).
    pub credits_expire_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Creates an account, its starting credits (a `grant` ledger row) and its first key, all in
/// the caller's transaction: either everything exists afterwards or nothing does.
pub async fn create(
    tx: &Transaction<'_>,
    tiers: &Tiers,
    new: NewAccount,
    first_key: &KeySpec,
) -> Result<(Account, CreatedKey), Error> {
    known_tier(tiers, &new.tier)?;
    if new.credits < 0 {
        return Err(Error::NegativeCredits);
    }
    let id = Uuid::now_v7();
    let inserted = tx
        .query_opt(
            "INSERT INTO accounts (id, email, password_hash, tier)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT ((lower(email))) DO NOTHING
             RETURNING id",
            &[&id, &new.email.as_str(), &new.password_hash, &new.tier],
        )
        .await?;
    if inserted.is_none() {
        return Err(Error::EmailTaken);
    }
    if new.credits > 0 {
        match new.credits_expire_at {
            Some(at) => {
                credits::grants::grant_expiring(tx, id, new.credits, "starting credits", at).await
            }
            None => {
                credits::ledger::credit(
                    tx,
                    id,
                    new.credits,
                    Kind::Grant,
                    Some("starting credits"),
                    None,
                )
                .await
            }
        }
        .map_err(Error::Credits)?;
    }
    let key = key_store::insert(tx, id, first_key).await?;
    let acct = get(tx, id).await?.ok_or_else(not_found)?;
    Ok((acct, key))
}

pub async fn set_tier(
    tx: &Transaction<'_>,
    tiers: &Tiers,
    id: Uuid,
    tier: &str,
) -> Result<Account, Error> {
    known_tier(tiers, tier)?;
    let row = tx
        .query_opt(
            &format!("UPDATE accounts SET tier = $2, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"),
            &[&id, &tier],
        )
        .await?
        .ok_or_else(not_found)?;
    notify_account_changed(tx, id).await?;
    Ok(account(&row))
}

pub async fn set_status(tx: &Transaction<'_>, id: Uuid, active: bool) -> Result<Account, Error> {
    let status = if active { "active" } else { "suspended" };
    let row = tx
        .query_opt(
            &format!("UPDATE accounts SET status = $2, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"),
            &[&id, &status],
        )
        .await?
        .ok_or_else(not_found)?;
    notify_account_changed(tx, id).await?;
    Ok(account(&row))
}

/// Looks up the password hash for a login attempt.
pub async fn password_hash_for(
    db: &impl GenericClient,
    email: &Email,
) -> Result<Option<(Uuid, Option<String>, String)>, db::Error> {
    let row = db
        .query_opt(
            "SELECT id, password_hash, status FROM accounts WHERE lower(email) = lower($1)",
            &[&email.as_str()],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_simply() {
        assert!(Email::parse("a@example.com").is_ok());
        assert!(Email::parse("  A.B+c@Sub.Example.org ").is_ok());
        for bad in [
            "",
            "no-at",
            "@example.com",
            "a@",
            "a@b",
            "a b@example.com",
            "a@.com",
            "a@example.",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Email::parse("A@Example.COM").unwrap().key(),
            "a@example.com"
        );
    }
}
