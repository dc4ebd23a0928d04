//! Credits: the only code that changes `accounts.credit_balance`, always together with one
//! row of the append-only `credit_ledger`, in one statement. Invariant for every account, at
//! every moment: balance = Σ ledger deltas.
//!
//! Refusals are [`Error`]s in the ledger's words; `http::problem` gives them their status.

pub mod alerts;
pub mod coalesce;
pub mod gateway_charges;
pub mod grants;
pub mod key_caps;
pub mod ledger;
pub mod metered;
pub mod recharge_signal;
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
    #[error("kind must be one of grant, purchase, charge, refund, adjustment, clawback, dispute, dispute_won, auto_recharge, expiry.")]
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
    /// The charge would take its key's spend in the period past the key's limit; nothing
    /// was written (see `key_caps`).
    #[error(
        "This costs {cost} credits and key {key_id} has {} of its {limit} credits per {} left until {resets_at}.",
        limit - spent, period.as_str()
    )]
    KeySpendLimitExceeded {
        key_id: String,
        limit: i64,
        period: key_caps::Period,
        spent: i64,
        cost: i64,
        resets_at: chrono::DateTime<chrono::Utc>,
    },
    /// Not a refusal: the one-statement charge stood back because the account has keys with
    /// spend limits; the caller charges through `key_caps` on a transaction instead. Never
    /// leaves the credits module.
    #[error("the account has keys with spend limits")]
    KeyLimitsApply,
    /// A spend limit's credits outside 1..=`key_caps::MAX_LIMIT`.
    #[error("spend_limit.credits must be between 1 and {}.", key_caps::MAX_LIMIT)]
    SpendLimitOutOfRange,
    /// A usage report's `group_by` other than `key`.
    #[error("group_by must be key.")]
    UnknownGroupBy,
    /// A `key_id` filter that is not a key id (12 characters of 0-9A-Za-z).
    #[error("key_id must be a key id (12 characters of 0-9, A-Z, a-z).")]
    InvalidKeyId,
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
            Error::SpendLimitOutOfRange => Some("spend_limit"),
            Error::UnknownGroupBy => Some("group_by"),
            Error::InvalidKeyId => Some("key_id"),
            _ => None,
        }
    }
}
