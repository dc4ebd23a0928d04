//! Credits: the only code that changes `accounts.credit_balance`, always together with one
//! row of the append-only `credit_ledger`, in one statement. Invariant for every account, at
//! every moment: balance = Σ ledger deltas.

pub mod coalesce;
pub mod ledger;
pub mod report;

pub use ledger::{ChargeContext, Kind, Movement, Once};
