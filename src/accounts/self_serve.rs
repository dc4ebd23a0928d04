//! Self-serve accounts: signup and password login, the two ways in that need no key. Both
//! hash with Argon2 under [`Passwords`]' bound, and neither holds a pooled connection while a
//! password is being hashed (the slow part on purpose).

use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use secrecy::SecretString;

use super::login::{self, Attempt};
use super::password::{Password, Passwords};
use super::{create, password_hash_for, Account, Email, Error, NewAccount};
use crate::audit::{self, Action, Actor};
use crate::auth::key_store::{self, CreatedKey, KeySpec};
use crate::auth::Scope;
use crate::tiers::{Tiers, DEFAULT_TIER};

/// How long a login key works.
const LOGIN_KEY_HOURS: i64 = 12;

/// A new account on the default tier with `credits` starting credits, and its first key (all
/// scopes), in one transaction.
pub async fn signup(
    db: &Pool,
    tiers: &Tiers,
    passwords: &Passwords,
    email: &str,
    password: SecretString,
    credits: i64,
    credits_ttl: Option<std::time::Duration>,
) -> Result<(Account, CreatedKey), Error> {
    let email = Email::parse(email)?;
    let password = Password::parse(password)?;
    let hash = passwords
        .slot_for_hash()
        .await?
        .hash(password)
        .await
        .map_err(Error::Password)?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let (account, key) = create(
        &tx,
        tiers,
        NewAccount {
            email,
            password_hash: Some(hash),
            tier: DEFAULT_TIER.to_owned(),
            credits,
            // `KEYMETER_SIGNUP_CREDITS_TTL_DAYS`
            credits_expire_at: credits_ttl
                .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
                .map(|ttl| chrono::Utc::now() + ttl),
        },
        &KeySpec::full_access("default"),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(account_id = %account.id, key_id = %key.view.id, "account created");
    Ok((account, key))
}

/// A password login: a new 12-hour key with `keys:manage` and `read`.
///
/// Refused with [`Error::InvalidCredentials`] for a wrong email or password, an unknown
/// email or a suspended account alike (that failure is counted and on the audit trail, as
/// `who`), and with [`Error::LockedOut`] while the email is locked out (see
/// `accounts::login`; `lockout_window` is `KEYMETER_LOGIN_LOCKOUT_SECS`).
pub async fn password_login(
    db: &Pool,
    passwords: &Passwords,
    email: &str,
    password: SecretString,
    lockout_window: Duration,
    who: &Actor,
) -> Result<CreatedKey, Error> {
    let account_id = check_password(db, passwords, email, password, lockout_window, who).await?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let now = Utc::now();
    let spec = KeySpec {
        name: format!("login {}", now.format("%Y-%m-%dT%H:%M:%SZ")),
        scopes: vec![Scope::KeysManage, Scope::Read],
        expires_at: Some(now + chrono::Duration::hours(LOGIN_KEY_HOURS)),
        rate_limit: None,
    };
    // Not held to the tier's `max_keys`: logging in with the password must never lock the
    // owner out of their own account. Login keys expire in 12 hours and are throttled per
    // email and per address, so they cannot pile up; they do count towards the cap for keys
    // created with `POST /v1/keys`.
    let key = key_store::insert(&tx, account_id, &spec).await?;
    audit::record(
        &tx,
        who,
        Action::LoginSuccess,
        Some(account_id),
        Some(&key.view.id),
        serde_json::json!({"expires_at": key.view.expires_at}),
    )
    .await?;
    tx.commit().await?;
    Ok(key)
}

/// The password check behind [`password_login`] and the console's login: the lockout, the
/// bounded Argon2 verification and the failure's audit row, without minting anything. `Ok`
/// is the account whose password it is (an active one); the caller records the success with
/// whatever it grants.
pub async fn check_password(
    db: &Pool,
    passwords: &Passwords,
    email: &str,
    password: SecretString,
    lockout_window: Duration,
    who: &Actor,
) -> Result<uuid::Uuid, Error> {
    let email = Email::parse(email)?;
    let email_key = email.key();
    let locked = |retry_after| Error::LockedOut { retry_after };
    let found = {
        let client = db.get().await?;
        // A locked email is refused before it can take a hashing slot.
        if let Some(secs) = login::locked_for(&client, &email_key).await? {
            return Err(locked(secs));
        }
        password_hash_for(&client, &email).await?
    };
    let (account_id, stored, status) = match found {
        Some((id, hash, status)) => (Some(id), hash, status),
        None => (None, None, String::new()),
    };
    // The slot first: an attempt refused for lack of one is not counted against the email.
    let slot = passwords.slot_for_verify().await?;
    {
        let client = db.get().await?;
        // Counted before the check, so parallel guesses cannot all be checked (see
        // `accounts::login`).
        if let Attempt::Locked(secs) =
            login::reserve_attempt(&client, &email_key, lockout_window).await?
        {
            return Err(locked(secs));
        }
    }
    // No pooled connection is held during the deliberately slow hash.
    let ok = slot
        .verify(password, stored)
        .await
        .map_err(Error::Password)?
        && status == "active";
    let mut client = db.get().await?;
    let Some(account_id) = account_id.filter(|_| ok) else {
        // The failure was counted when the attempt was reserved; the trail records it, and
        // the lockout when this attempt's reservation (or a concurrent one) set it.
        let tx = client.transaction().await?;
        let locked = login::locked_for(&tx, &email_key).await?.is_some();
        audit::login_failed(&tx, who, account_id, locked).await?;
        tx.commit().await?;
        return Err(Error::InvalidCredentials);
    };
    login::clear(&client, &email_key).await?;
    Ok(account_id)
}

/// Changes an account's password, given its current one: checked like a login (the same
/// lockout counts the attempt, under the same Argon2 bound), so a stolen session cannot
/// guess its way to the password. A wrong current password is [`Error::InvalidCredentials`].
pub async fn change_password(
    db: &Pool,
    passwords: &Passwords,
    account_id: uuid::Uuid,
    current: SecretString,
    new: SecretString,
    lockout_window: Duration,
    who: &Actor,
) -> Result<(), Error> {
    let new = Password::parse(new)?;
    let email: String = {
        let client = db.get().await?;
        client
            .query_opt("SELECT email FROM accounts WHERE id = $1", &[&account_id])
            .await?
            .ok_or(Error::NotFound)?
            .get(0)
    };
    let checked = check_password(db, passwords, &email, current, lockout_window, who).await?;
    if checked != account_id {
        return Err(Error::InvalidCredentials);
    }
    store_password(db, passwords, account_id, new).await
}

/// Sets an account's password without asking for the old one: for `keymeter dev`'s demo
/// account, which an operator created without a password.
pub async fn set_password(
    db: &Pool,
    passwords: &Passwords,
    account_id: uuid::Uuid,
    password: SecretString,
) -> Result<(), Error> {
    store_password(db, passwords, account_id, Password::parse(password)?).await
}

async fn store_password(
    db: &Pool,
    passwords: &Passwords,
    account_id: uuid::Uuid,
    new: Password,
) -> Result<(), Error> {
    let hash = passwords
        .slot_for_hash()
        .await?
        .hash(new)
        .await
        .map_err(Error::Password)?;
    let client = db.get().await?;
    let n = client
        .execute(
            "UPDATE accounts SET password_hash = $2, updated_at = now() WHERE id = $1",
            &[&account_id, &hash],
        )
        .await?;
    if n == 0 {
        return Err(Error::NotFound);
    }
    Ok(())
}
