//! Metered charges: a customer spends credits on usage they meter themselves
//! (`POST /v1/credits/charge`). The request is checked here, then charged one of three ways:
//! with an idempotency key, in a transaction that also records the key's outcome; without
//! one, through the group-commit lane (`coalesce`) when it is on, or as one statement.

use deadpool_postgres::Pool;
use uuid::Uuid;

use super::coalesce::Coalescer;
use super::key_caps;
use super::ledger::{self, ChargeContext, Movement, Once};
use super::Error;
use crate::idempotency::Guard;

/// The most credits one metered charge may spend.
pub const MAX_CHARGE: i64 = 1_000_000;
/// The longest reason kept on the ledger entry, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// A metered charge that passed its checks.
#[derive(Debug, Clone)]
pub struct MeteredCharge {
    amount: i64,
    reason: Option<String>,
}

impl MeteredCharge {
    /// `amount` from 1 to [`MAX_CHARGE`]; `reason` at most [`MAX_REASON_CHARS`] characters
    /// and without NUL (PostgreSQL text cannot hold it: refused here, it cannot fail a shared
    /// group commit).
    pub fn new(amount: i64, reason: Option<String>) -> Result<MeteredCharge, Error> {
        if !(1..=MAX_CHARGE).contains(&amount) {
            return Err(Error::ChargeOutOfRange);
        }
        if reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS || r.contains('\0'))
        {
            return Err(Error::InvalidReason);
        }
        Ok(MeteredCharge { amount, reason })
    }
}

/// Spends the charge's credits; 402 ([`Error::InsufficientCredits`]) when short, nothing
/// written. With a `guard` (an `Idempotency-Key`), the charge and its recorded outcome
/// commit together. Without one, `lane` (when group commit is on) lets concurrent charges
/// to any accounts share a commit. `key_id`, the calling key, is recorded on the ledger row
/// and its spend limit applies (`key_caps`).
pub async fn charge(
    db: &Pool,
    lane: Option<&Coalescer>,
    account_id: Uuid,
    key_id: &str,
    charge: &MeteredCharge,
    guard: Option<Guard>,
) -> Result<Movement, Error> {
    let once = match (&guard, lane) {
        (Some(g), _) => {
            let mut client = db.get().await?;
            let tx = client.transaction().await?;
            let ctx = ChargeContext {
                job_id: None,
                reason: charge.reason.as_deref(),
                idempotency_key: Some(g.key().as_str()),
                key_id: Some(key_id),
                gateway: None,
            };
            let m = key_caps::charge(&tx, account_id, charge.amount, &ctx).await?;
            if let Once::Done(movement) = &m {
                g.record(&tx, movement, None).await?;
            }
            tx.commit().await?;
            m
        }
        (None, Some(lane)) => Once::Done(
            lane.charge(
                db,
                account_id,
                charge.amount,
                charge.reason.clone(),
                Some(key_id.to_owned()),
            )
            .await?,
        ),
        (None, None) => {
            let mut client = db.get().await?;
            let ctx = ChargeContext {
                job_id: None,
                reason: charge.reason.as_deref(),
                idempotency_key: None,
                key_id: Some(key_id),
                gateway: None,
            };
            match ledger::charge(&client, account_id, charge.amount, &ctx).await {
                // Keys of this account have spend limits: the key's counter moves with the
                // charge, so both go in one transaction.
                Err(Error::KeyLimitsApply) => {
                    let tx = client.transaction().await?;
                    let m = key_caps::charge_limited(&tx, account_id, charge.amount, &ctx).await?;
                    tx.commit().await?;
                    m
                }
                other => other?,
            }
        }
    };
    match once {
        Once::Done(m) => Ok(m),
        Once::AlreadyDone | Once::Replayed { .. } => Err(Error::Internal(anyhow::anyhow!(
            "charge without a job reported as duplicate"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amount_and_reason_are_checked() {
        assert!(MeteredCharge::new(1, None).is_ok());
        assert!(MeteredCharge::new(MAX_CHARGE, Some("x".repeat(500))).is_ok());
        for amount in [0, -1, MAX_CHARGE + 1, i64::MIN, i64::MAX] {
            assert!(matches!(
                MeteredCharge::new(amount, None),
                Err(Error::ChargeOutOfRange)
            ));
        }
        for reason in ["x".repeat(501), "a\0b".to_owned()] {
            assert!(matches!(
                MeteredCharge::new(1, Some(reason)),
                Err(Error::InvalidReason)
            ));
        }
    }
}
