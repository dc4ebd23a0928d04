//! The audit trail: who did what to which account, when, and in which request — for every
//! operator action (the `/admin` API and `keymeter admin …`) and every security-relevant
//! customer action (keys created, revoked, rotated; logins and lockouts).
//!
//! [`record`] takes the action's own [`Transaction`], not a pool: the type system is what
//! keeps the row and the action together, so a committed action always has its row and a
//! rolled-back one never leaves a row behind. The table refuses UPDATE, DELETE and TRUNCATE
//! by trigger (see `sql/V9__audit_events.sql`), so not even a bug here can rewrite history.
//!
//! The `detail` is a small JSON object of facts (a tier changed from → to, a key's scopes, an
//! amount); it never holds a secret — no plaintext key, password, token or digest. This
//! module owns `audit_events`; nothing else writes it.

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::db;
use crate::http::request_id;
use crate::pagination::{self, Cursor};

/// Why the trail could not be listed: a cursor that is not one of its own, or the database.
/// Recording an event only fails with the database ([`db::Error`]), so that takes no enum.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Page(#[from] pagination::Error),
    #[error(transparent)]
    Db(#[from] db::Error),
}

crate::impl_db_error_from!(Error);

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The `/admin` API, authenticated by `KEYMETER_ADMIN_TOKEN` (one shared token, so there
    /// is no finer identity to record).
    AdminToken,
    /// `keymeter admin …`: the operating-system user who ran it.
    Cli(String),
    /// A customer's API key, by its public id.
    Key(String),
    /// A password login attempt, by the client address it came from (`unknown` when the
    /// address could not be told).
    Login(String),
    /// The customer console (a signed-in person, not a key), by the client address the
    /// request came from.
    Console(String),
}

impl Actor {
    /// The CLI's actor: the user the process runs as, from the password database rather
    /// than `$USER` (which any caller sets at will), with the invoking user when run through
    /// sudo.
    pub fn cli() -> Actor {
        let user = os_user();
        match std::env::var("SUDO_USER") {
            Ok(by) if !by.is_empty() && by != user => Actor::Cli(format!("{user} (sudo: {by})")),
            _ => Actor::Cli(user),
        }
    }

    /// A login attempt's actor: the client address the rate limits use (which honours
    /// `KEYMETER_TRUST_FORWARDED`).
    pub fn login(ip: Option<std::net::IpAddr>) -> Actor {
        Actor::Login(ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()))
    }

    fn kind(&self) -> &'static str {
        match self {
            Actor::AdminToken => "admin_token",
            Actor::Cli(_) => "cli",
            Actor::Key(_) => "api_key",
            Actor::Login(_) => "login",
            Actor::Console(_) => "console",
        }
    }

    fn name(&self) -> &str {
        match self {
            Actor::AdminToken => "admin_token",
            Actor::Cli(user) | Actor::Key(user) | Actor::Login(user) | Actor::Console(user) => user,
        }
    }
}

#[cfg(unix)]
fn os_user() -> String {
    // SAFETY: getuid cannot fail; getpwuid_r writes only into the buffers handed to it, and
    // the name is read only when it reports success with a non-null result.
    unsafe {
        let uid = libc::getuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
            let name = std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy();
            if !name.is_empty() {
                return name.chars().take(100).collect();
            }
        }
        format!("uid:{uid}")
    }
}

#[cfg(not(unix))]
fn os_user() -> String {
    std::env::var("USERNAME").unwrap_or_else(|_| "unknown".to_owned())
}

/// What was done. The names are stable: operators filter and alert on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum Action {
    #[serde(rename = "account.create")]
    AccountCreate,
    #[serde(rename = "account.set_tier")]
    AccountSetTier,
    #[serde(rename = "account.suspend")]
    AccountSuspend,
    #[serde(rename = "account.unsuspend")]
    AccountUnsuspend,
    #[serde(rename = "credits.grant")]
    CreditsGrant,
    #[serde(rename = "credits.adjust")]
    CreditsAdjust,
    #[serde(rename = "key.create")]
    KeyCreate,
    #[serde(rename = "key.revoke")]
    KeyRevoke,
    #[serde(rename = "key.rotate")]
    KeyRotate,
    #[serde(rename = "login.success")]
    LoginSuccess,
    #[serde(rename = "login.failure")]
    LoginFailure,
    #[serde(rename = "login.lockout")]
    LoginLockout,
}

impl Action {
    pub const ALL: [Action; 12] = [
        Action::AccountCreate,
        Action::AccountSetTier,
        Action::AccountSuspend,
        Action::AccountUnsuspend,
        Action::CreditsGrant,
        Action::CreditsAdjust,
        Action::KeyCreate,
        Action::KeyRevoke,
        Action::KeyRotate,
        Action::LoginSuccess,
        Action::LoginFailure,
        Action::LoginLockout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::AccountCreate => "account.create",
            Action::AccountSetTier => "account.set_tier",
            Action::AccountSuspend => "account.suspend",
            Action::AccountUnsuspend => "account.unsuspend",
            Action::CreditsGrant => "credits.grant",
            Action::CreditsAdjust => "credits.adjust",
            Action::KeyCreate => "key.create",
            Action::KeyRevoke => "key.revoke",
            Action::KeyRotate => "key.rotate",
            Action::LoginSuccess => "login.success",
            Action::LoginFailure => "login.failure",
            Action::LoginLockout => "login.lockout",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Records one event in the action's transaction. The request id is the current request's
/// (`X-Request-Id`), none outside a request (the CLI).
pub async fn record(
    tx: &Transaction<'_>,
    actor: &Actor,
    action: Action,
    account_id: Option<Uuid>,
    target: Option<&str>,
    detail: Value,
) -> Result<(), db::Error> {
    let detail = match detail {
        Value::Object(_) => detail,
        Value::Null => Value::Object(Default::default()),
        other => serde_json::json!({ "value": other }),
    };
    let stmt = tx
        .prepare_cached(
            "INSERT INTO audit_events
                 (id, actor_type, actor, action, account_id, target, request_id, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &Uuid::now_v7(),
            &actor.kind(),
            &actor.name(),
            &action.as_str(),
            &account_id,
            &target,
            &request_id::current(),
            &detail,
        ],
    )
    .await?;
    Ok(())
}

/// A failed login: one `login.failure` row, and a `login.lockout` row when this failure is
/// the one that locked the email. `account_id` is the account the email belongs to, if any;
/// the email itself is not recorded (it could be anything a client typed, even a password).
pub async fn login_failed(
    tx: &Transaction<'_>,
    actor: &Actor,
    account_id: Option<Uuid>,
    locked: bool,
) -> Result<(), db::Error> {
    let known = serde_json::json!({"known_account": account_id.is_some()});
    record(
        tx,
        actor,
        Action::LoginFailure,
        account_id,
        None,
        known.clone(),
    )
    .await?;
    if locked {
        record(tx, actor, Action::LoginLockout, account_id, None, known).await?;
    }
    Ok(())
}

/// One event as `GET /admin/audit` and `keymeter admin audit --json` show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEvent {
    pub id: Uuid,
    #[schema(value_type = String, example = "audit_event")]
    pub object: &'static str,
    pub at: DateTime<Utc>,
    /// `admin_token`, `cli`, `api_key` or `login`.
    #[schema(example = "admin_token")]
    pub actor_type: String,
    /// `admin_token`; the OS user for `cli`; the key id for `api_key`; the client address
    /// for `login`.
    #[schema(example = "admin_token")]
    pub actor: String,
    #[schema(value_type = Action)]
    pub action: String,
    pub account_id: Option<Uuid>,
    /// The key id when a key is the object of the action.
    pub target: Option<String>,
    /// The request's `X-Request-Id`; `null` for the CLI.
    pub request_id: Option<String>,
    /// Facts about the action (never a secret).
    #[schema(value_type = Object)]
    pub detail: Value,
}

/// Which events to list; every filter is optional.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub account_id: Option<Uuid>,
    pub action: Option<Action>,
    pub actor: Option<String>,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
}

/// Newest first; fetches `limit + 1` rows so the page can tell whether there is more.
pub async fn list(
    db: &impl GenericClient,
    filter: &Filter,
    limit: i64,
    cursor: Option<Cursor>,
) -> Result<Vec<AuditEvent>, Error> {
    let (at, id) = match cursor {
        Some(c) => {
            let id: Uuid = c.id_as()?;
            (Some(c.at), Some(id))
        }
        None => (None, None),
    };
    let action = filter.action.map(Action::as_str);
    let rows = db
        .query(
            "SELECT id, at, actor_type, actor, action, account_id, target, request_id, detail
               FROM audit_events
              WHERE ($1::uuid IS NULL OR account_id = $1)
                AND ($2::text IS NULL OR action = $2)
                AND ($3::text IS NULL OR actor = $3)
                AND ($4::timestamptz IS NULL OR at >= $4)
                AND ($5::timestamptz IS NULL OR at < $5)
                AND ($6::timestamptz IS NULL OR (at, id) < ($6, $7::uuid))
              ORDER BY at DESC, id DESC
              LIMIT $8",
            &[
                &filter.account_id,
                &action,
                &filter.actor,
                &filter.from,
                &filter.to,
                &at,
                &id,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AuditEvent {
            id: r.get(0),
            object: "audit_event",
            at: r.get(1),
            actor_type: r.get(2),
            actor: r.get(3),
            action: r.get(4),
            account_id: r.get(5),
            target: r.get(6),
            request_id: r.get(7),
            detail: r.get(8),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_round_trip_and_match_serde() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
        assert_eq!(Action::parse("key.delete"), None);
    }

    #[test]
    fn the_cli_actor_is_a_named_user() {
        let Actor::Cli(name) = Actor::cli() else {
            panic!("not a CLI actor");
        };
        assert!(!name.is_empty());
    }
}
