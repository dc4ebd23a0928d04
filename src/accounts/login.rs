//! Login lockout: after 5 failed logins for one email within the lockout window (15 minutes
//! unless `KEYMETER_LOGIN_LOCKOUT_SECS` says otherwise), further attempts for it are refused
//! with 429 for as long again — the same answer whether or not the email exists, so the
//! lockout cannot be used to discover accounts. The counter lives in PostgreSQL so every
//! instance enforces the same lockout.
//!
//! - **An attempt is counted before its password is checked.** Checking the count and adding
//!   a failure after the (slow) verification would let 20 guesses sent at once all read "no
//!   failures yet" and all be verified. [`reserve_attempt`] instead counts the attempt in one
//!   upsert — the row lock orders concurrent attempts — and only the first five of a window
//!   get to verify; a success then clears the count.
//! - **The table stays bounded.** Anyone can fail a login for any address, so a row is
//!   written per address tried; [`run_purge`] deletes each one once its window and any lock
//!   have ended.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use tokio_util::sync::CancellationToken;

use crate::db;

pub const MAX_FAILURES: i32 = 5;

/// `Some(seconds)` while the email is locked out.
pub async fn locked_for(
    db: &impl GenericClient,
    email_key: &str,
) -> Result<Option<u64>, db::Error> {
    let row = db
        .query_opt(
            "SELECT locked_until FROM login_failures WHERE email_key = $1 AND locked_until > now()",
            &[&email_key],
        )
        .await?;
    Ok(row.map(|r| {
        let until: DateTime<Utc> = r.get(0);
        (until - Utc::now()).num_seconds().max(1) as u64
    }))
}

/// Whether a login attempt may check its password.
pub enum Attempt {
    /// Counted as a failure until [`clear`] says otherwise.
    Reserved,
    /// The email is locked out for this many more seconds.
    Locked(u64),
}

/// Counts an attempt for `email_key` as a failure before its password is checked (the window
/// restarts once `window` has passed since its first failure); the fifth in a window locks
/// the email for `window`. A locked email's attempt is not counted and may not check.
pub async fn reserve_attempt(
    db: &impl GenericClient,
    email_key: &str,
    window: Duration,
) -> Result<Attempt, db::Error> {
    let secs = window.as_secs_f64();
    let reserved = db
        .query_opt(
            "INSERT INTO login_failures AS f (email_key, failures, window_start)
             VALUES ($1, 1, now())
             ON CONFLICT (email_key) DO UPDATE SET
                 failures = CASE WHEN f.window_start <= now() - make_interval(secs => $3)
                                 THEN 1 ELSE f.failures + 1 END,
                 window_start = CASE WHEN f.window_start <= now() - make_interval(secs => $3)
                                     THEN now() ELSE f.window_start END,
                 locked_until = CASE WHEN f.window_start > now() - make_interval(secs => $3)
                                          AND f.failures + 1 >= $2
                                     THEN now() + make_interval(secs => $3) END
               WHERE f.locked_until IS NULL OR f.locked_until <= now()
             RETURNING failures",
            &[&email_key, &MAX_FAILURES, &secs],
        )
        .await?;
    if reserved.is_some() {
        return Ok(Attempt::Reserved);
    }
    // Locked (the upsert's condition refused it); the lock may have ended a moment ago.
    let secs = locked_for(db, email_key).await?.unwrap_or(1);
    Ok(Attempt::Locked(secs))
}

/// A successful login: the attempt it reserved, and earlier failures, are forgotten.
pub async fn clear(db: &impl GenericClient, email_key: &str) -> Result<(), db::Error> {
    db.execute(
        "DELETE FROM login_failures WHERE email_key = $1",
        &[&email_key],
    )
    .await?;
    Ok(())
}

/// Deletes the rows whose window and lock have both ended: they no longer count for anything
/// ([`reserve_attempt`] would restart them).
pub async fn purge(db: &impl GenericClient, window: Duration) -> Result<u64, db::Error> {
    Ok(db
        .execute(
            "DELETE FROM login_failures
              WHERE window_start <= now() - make_interval(secs => $1)
                AND (locked_until IS NULL OR locked_until <= now())",
            &[&window.as_secs_f64()],
        )
        .await?)
}

/// Purges ended windows until cancelled, often enough that a row outlives its window by at
/// most half a window (and never more than a minute).
pub async fn run_purge(db: Pool, window: Duration, stop: CancellationToken) {
    let every = (window / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let purged = match db.get().await {
            Ok(client) => purge(&client, window).await,
            Err(e) => Err(e.into()),
        };
        match purged {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "purged ended login-failure windows"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging login failures failed"),
        }
    }
}
