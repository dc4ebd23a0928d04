//! Why an account operation was refused, in the domain's words. The HTTP layer
//! (`http::problem::accounts`) gives each its status and problem type; the CLI prints the
//! message as it is, so every message is a whole sentence a person can act on.

use super::password::{MAX_LEN, MIN_LEN};
use crate::db;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("email must be an address like name@example.com.")]
    InvalidEmail,
    #[error("The password must be {MIN_LEN} to {MAX_LEN} characters long.")]
    InvalidPassword,
    /// `known`: the configured tiers, comma-separated.
    #[error("unknown tier {tier:?}; known: {known}.")]
    UnknownTier { tier: String, known: String },
    #[error("credits must not be negative.")]
    NegativeCredits,
    #[error("An account with this email already exists.")]
    EmailTaken,
    #[error("No account with that id.")]
    NotFound,
    /// A login with a wrong email or password — or an unknown email, or a suspended
    /// account: one case, so a login does not tell which emails have accounts.
    #[error("The email or password is wrong.")]
    InvalidCredentials,
    /// Too many failed logins for this email (see `accounts::login`); the same whether or
    /// not the email has an account.
    #[error("Too many failed logins for this email; try again later.")]
    LockedOut { retry_after: u64 },
    /// This instance is hashing as many passwords as it allows at once (see
    /// `accounts::password`); nothing was created and the login was not counted.
    #[error(
        "Too many signups and logins are being checked right now; retry in {retry_after} second."
    )]
    PasswordHashingBusy { retry_after: u64 },
    /// Hashing or verifying failed (a bug or a broken stored hash, never the client's doing).
    #[error("hashing or checking a password failed")]
    Password(#[source] anyhow::Error),
    #[error(transparent)]
    Credits(crate::credits::Error),
    #[error(transparent)]
    Db(#[from] db::Error),
}

crate::impl_db_error_from!(Error);
