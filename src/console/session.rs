//! Console sessions and their CSRF tokens. This module owns `console_sessions` (V17).
//!
//! - **Only a digest is stored.** The cookie carries 256 random bits; the table keeps their
//!   SHA-256, so a leaked backup or a read-only SQL injection cannot be replayed as a login
//!   (the same reasoning as API keys: the id is random, so a fast hash is the right one).
//! - **Two expiries.** A session ends after [`IDLE`] without a request, and at [`ABSOLUTE`]
//!   after login whatever its activity: a stolen cookie is good for a bounded time.
//! - **A new id at every login** (session fixation cannot carry a planted id across the
//!   login), and logout deletes the row, so the cookie is dead on every instance at once.
//! - **CSRF tokens are derived, not stored.** A form's token is SHA-256 over a fixed label
//!   and the cookie's secret: per session, unguessable without the cookie (which scripts on
//!   other sites cannot read), and not derivable from the stored digest (another label). Forms
//!   shown before login bind to a short-lived pre-session cookie the same way, so a login or
//!   signup cannot be forged from another site either.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::db;

/// The signed-in session's cookie.
pub const COOKIE: &str = "km_console";
/// The cookie the forms shown before login (login, signup) bind their token to.
pub const PRE_COOKIE: &str = "km_console_pre";
/// A session unused this long is over.
pub const IDLE: Duration = Duration::from_secs(2 * 3600);
/// A session is over this long after login, however active.
pub const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);

/// A new random cookie secret: 32 bytes from the OS, as 64 hex characters.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The CSRF token of the forms bound to `secret` (a session's or a pre-session cookie).
pub fn csrf_token(secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"keymeter console csrf\0");
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

/// Whether `given` is the token of `secret`, compared in constant time over fixed-length
/// digests (so neither the length nor a prefix of the right token leaks).
pub fn csrf_matches(secret: &str, given: &str) -> bool {
    let want = Sha256::digest(csrf_token(secret).as_bytes());
    let got = Sha256::digest(given.as_bytes());
    want.ct_eq(&got).into()
}

/// Starts a session for `account_id` and returns the cookie's secret. The account's
/// sessions that are already over are deleted on the way, so its rows stay few.
pub async fn create(db: &impl GenericClient, account_id: Uuid) -> Result<String, db::Error> {
    let secret = new_secret();
    db.execute(
        "DELETE FROM console_sessions
          WHERE account_id = $1
            AND (expires_at <= now() OR last_seen_at <= now() - make_interval(secs => $2))",
        &[&account_id, &IDLE.as_secs_f64()],
    )
    .await?;
    db.execute(
        "INSERT INTO console_sessions (id_hash, account_id, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3))",
        &[&digest(&secret), &account_id, &ABSOLUTE.as_secs_f64()],
    )
    .await?;
    Ok(secret)
}

/// The account of a live session, marking it seen (which restarts its idle time). `None`
/// for an unknown, idle or expired session.
pub async fn touch(db: &impl GenericClient, secret: &str) -> Result<Option<Uuid>, db::Error> {
    // Not of the shape we hand out: no query.
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let row = db
        .query_opt(
            "UPDATE console_sessions SET last_seen_at = now()
              WHERE id_hash = $1 AND expires_at > now()
                AND last_seen_at > now() - make_interval(secs => $2)
          RETURNING account_id",
            &[&digest(secret), &IDLE.as_secs_f64()],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Ends the session (logout). Ending one that is already gone is not an error.
pub async fn delete(db: &impl GenericClient, secret: &str) -> Result<(), db::Error> {
    db.execute(
        "DELETE FROM console_sessions WHERE id_hash = $1",
        &[&digest(secret)],
    )
    .await?;
    Ok(())
}

/// Ends every session of the account but `keep` (after a password change: whoever knew the
/// old password is signed out everywhere else).
pub async fn delete_others(
    db: &impl GenericClient,
    account_id: Uuid,
    keep: &str,
) -> Result<u64, db::Error> {
    Ok(db
        .execute(
            "DELETE FROM console_sessions WHERE account_id = $1 AND id_hash <> $2",
            &[&account_id, &digest(keep)],
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_own_secret() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(csrf_matches(&a, &csrf_token(&a)));
        assert!(!csrf_matches(&a, &csrf_token(&b)));
        assert!(!csrf_matches(&a, ""));
        assert!(!csrf_matches(&a, &csrf_token(&a)[..63]));
        // The token is not the stored digest of the secret.
        assert_ne!(csrf_token(&a), hex::encode(digest(&a)));
    }
}
