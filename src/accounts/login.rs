//! Login lockout: after 5 failed logins for one email within 15 minutes, further attempts
//! for it are refused with 429 for 15 minutes — the same answer whether or not the email
//! exists, so the lockout cannot be used to discover accounts. The counter lives in
//! PostgreSQL so every instance enforces the same lockout.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use crate::error::ApiError;

pub const MAX_FAILURES: i32 = 5;
pub const LOCKOUT_MINUTES: i64 = 15;

/// `Some(seconds)` while the email is locked out.
pub async fn locked_for(db: &impl GenericClient, email_key: &str) -> Result<Option<u64>, ApiError> {
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

/// Counts a failure (the window restarts after 15 minutes); locks on the fifth.
pub async fn record_failure(db: &impl GenericClient, email_key: &str) -> Result<(), ApiError> {
    db.execute(
        "INSERT INTO login_failures AS f (email_key, failures, window_start)
         VALUES ($1, 1, now())
         ON CONFLICT (email_key) DO UPDATE SET
             failures = CASE WHEN f.window_start < now() - make_interval(mins => $3::int)
                             THEN 1 ELSE f.failures + 1 END,
             window_start = CASE WHEN f.window_start < now() - make_interval(mins => $3::int)
                                 THEN now() ELSE f.window_start END,
             locked_until = CASE WHEN f.window_start >= now() - make_interval(mins => $3::int)
                                      AND f.failures + 1 >= $2
                                 THEN now() + make_interval(mins => $3::int) ELSE f.locked_until END",
        &[&email_key, &MAX_FAILURES, &(LOCKOUT_MINUTES as i32)],
    )
    .await?;
    Ok(())
}

pub async fn clear(db: &impl GenericClient, email_key: &str) -> Result<(), ApiError> {
    db.execute(
        "DELETE FROM login_failures WHERE email_key = $1",
        &[&email_key],
    )
    .await?;
    Ok(())
}
