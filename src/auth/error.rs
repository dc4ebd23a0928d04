//! Why an authentication or a key operation was refused, in the domain's words. The HTTP
//! layer (`http::problem::auth`) gives each its status and problem type; the CLI prints the
//! message as it is, so every message is a whole sentence a person can act on.

use chrono::{DateTime, Utc};

use super::key_store::MAX_GRACE_SECONDS;
use crate::db;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The presented key is missing, malformed, unknown, wrong, expired, revoked, past its
    /// rotation grace, or its account is suspended: deliberately one case, so a caller
    /// learns nothing about which (operators see which in the metrics).
    #[error("The API key is missing, malformed, unknown, expired or revoked.")]
    InvalidApiKey,
    /// The key lacks the scope an operation needs.
    #[error("This API key lacks the `{required}` scope this route needs.")]
    MissingScope { required: &'static str },

    // A key never creates (`verb` = create) or rotates into existence (`verb` = rotate) a
    // key with more power than its own.
    #[error("This key cannot {verb} a key with scopes it lacks itself: {}.", missing.join(", "))]
    ScopesBeyondCreator {
        verb: &'static str,
        missing: Vec<&'static str>,
    },
    #[error(
        "This key stops working at {}; it cannot {verb} a key that outlives it.",
        ends_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )]
    OutlivesCreator {
        verb: &'static str,
        ends_at: DateTime<Utc>,
    },
    #[error(
        "This key is limited to {rate} requests per minute; it cannot {verb} a key with a \
         higher limit."
    )]
    RateAboveCreator { verb: &'static str, rate: u32 },
    #[error(
        "This key may spend {credits} credits per {period}; it cannot {verb} a key without \
         such a limit, or with a higher one or another period."
    )]
    SpendAboveCreator {
        verb: &'static str,
        credits: i64,
        period: &'static str,
    },

    // A new key's own settings.
    #[error("name must be 1 to 100 characters, without control characters.")]
    InvalidName,
    #[error("unknown scope {0:?}; known: scrape, read, keys:manage, billing.")]
    UnknownScope(String),
    #[error("a key needs at least one scope.")]
    NoScopes,
    #[error("expires_at must be in the future.")]
    ExpiryNotInFuture,
    /// `max`: the tier's requests per minute (capped to what the column holds).
    #[error("rate_limit must be between 1 and {max} (the tier's requests per minute).")]
    RateLimitOutOfRange { max: i64 },
    #[error("grace_seconds must be between 0 and {MAX_GRACE_SECONDS}.")]
    GraceOutOfRange,

    /// The account already holds its tier's `max` active keys.
    #[error("The {tier} tier allows {max} active keys per account; revoke one first.")]
    KeyLimitReached { tier: String, max: u32 },
    #[error("A revoked key cannot be rotated.")]
    KeyRevoked,
    /// `next`: the id of the key's successor.
    #[error("This key was already rotated to {next}.")]
    KeyAlreadyRotated { next: String },
    /// No key with that id on this account (or, for the operator, at all).
    #[error("No API key with that id on this account.")]
    KeyNotFound,
    #[error("No such account.")]
    AccountNotFound,

    /// A spend limit the credits module refused (out of range), or its failure.
    #[error(transparent)]
    Credits(#[from] crate::credits::Error),

    #[error(transparent)]
    Db(#[from] db::Error),
}

crate::impl_db_error_from!(Error);
