//! Credits: the only code that changes `accounts.credit_balance`, always together with one
//! row of the append-only `credit_ledger`, in one statement. Invariant for every account, at
//! every moment: balance = Σ ledger deltas.
//!
//! Refusals are [`Error`]s in the ledger's words; `http::problem` gives them their status.

pub mod alerts;
pub mod coalesce;
pub mod grants;
pub mod ledger;
pub mod metered;
pub mod report;

pub use ledger::{ChargeContext, Kind, Movement, Once};

/// Why a movement or a ledger read was refused. The message of each refusal is the
/// `detail` a client sees; [`Error::field`] names the request value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The balance does not cover the cost; nothing was written.
    #[error("This costs {cost} credits and the balance is {balance}.")]
    InsufficientCredits { balance: i64, cost: i64 },
    #[error("No account with that id.")]
    AccountNotFound,
    /// A credit (grant, purchase) of zero or less.
    #[error("amount must be positive.")]
    CreditNotPositive,
    /// A charge of zero or less.
    #[error("a charge must be positive.")]
    ChargeNotPositive,
    /// A metered charge outside 1..=[`metered::MAX_CHARGE`].
    #[error("amount must be between 1 and {}.", metered::MAX_CHARGE)]
    ChargeOutOfRange,
    /// A metered charge's reason that is too long or holds a NUL.
    #[error("reason must be at most 500 characters, without NUL characters.")]
    InvalidReason,
    /// A balance cannot grow past 2^63 − 1 (a bigint).
    #[error("This would take the balance past the largest one an account can hold.")]
    BalanceOverflow,
    /// An operator's adjustment that would take the balance below zero; nothing was written.
    #[error("An adjustment of {amount} would take the balance ({balance}) below zero.")]
    BelowZero { amount: i64, balance: i64 },
    /// A ledger filter naming no [`Kind`].
    #[error("kind must be one of grant, purchase, charge, refund, adjustment, clawback, dispute, dispute_won, expiry.")]
    UnknownKind,
    /// A usage report's granularity that is neither `day` nor `hour`.
    #[error("granularity must be day or hour.")]
    UnknownGranularity,
    /// A usage report whose `from` is not before its `to`.
    #[error("from must be before to.")]
    EmptyRange,
    /// A usage report over more days than its granularity allows.
    #[error("a {granularity} report covers at most {max_days} days.")]
    RangeTooLong {
        granularity: &'static str,
        max_days: i64,
    },
    /// A low-balance threshold outside 0..=[`alerts::MAX_THRESHOLD`].
    #[error(
        "low_balance_threshold must be between 0 and {}.",
        alerts::MAX_THRESHOLD
    )]
    ThresholdOutOfRange,
    /// An expiring grant whose `expires_at` is not in the future (or absurdly far).
    #[error("expires_at must be in the future and before the year 10000.")]
    ExpiryNotInFuture,
    /// The key of an idempotent charge could not be kept (see `idempotency`).
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::Error),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    /// A broken invariant: nothing a client did or can fix.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}
crate::impl_db_error_from!(Error);

impl Error {
    /// The request value a refusal is about, when it is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::CreditNotPositive
            | Error::ChargeNotPositive
            | Error::ChargeOutOfRange
            | Error::BalanceOverflow
            | Error::BelowZero { .. } => Some("amount"),
            Error::InvalidReason => Some("reason"),
            Error::ThresholdOutOfRange => Some("low_balance_threshold"),
            Error::ExpiryNotInFuture => Some("expires_at"),
            Error::UnknownKind => Some("kind"),
            Error::UnknownGranularity => Some("granularity"),
            Error::EmptyRange | Error::RangeTooLong { .. } => Some("from"),
            _ => None,
        }
    }
}
