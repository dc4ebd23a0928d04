//! Ledger writes. Each movement is a single SQL statement — a data-modifying CTE that updates
//! the balance under its row lock and inserts the ledger row from the updated value — so the
//! two can never disagree, and a charge costs one round trip.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use super::alerts::{CHARGE_EVENTS, THRESHOLD_SQL};
use super::gateway_charges::{self, GatewayTag};
use super::grants::SPEND_EXPIRING;
use super::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Grant,
    Purchase,
    Charge,
    Refund,
    Adjustment,
    Clawback,
    /// Credits taken back when a purchase's charge is disputed (like a full refund).
    Dispute,
    /// Credits given back when a dispute closes in the merchant's favour.
    DisputeWon,
    /// Credits bought by an auto-recharge's off-session payment.
    AutoRecharge,
    /// The unspent rest of an expiring grant, leaving at its expiry (see `credits::grants`).
    Expiry,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Grant => "grant",
            Kind::Purchase => "purchase",
            Kind::Charge => "charge",
            Kind::Refund => "refund",
            Kind::Adjustment => "adjustment",
            Kind::Clawback => "clawback",
            Kind::Dispute => "dispute",
            Kind::DisputeWon => "dispute_won",
            Kind::AutoRecharge => "auto_recharge",
            Kind::Expiry => "expiry",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Grant,
            Kind::Purchase,
            Kind::Charge,
            Kind::Refund,
            Kind::Adjustment,
            Kind::Clawback,
            Kind::Dispute,
            Kind::DisputeWon,
            Kind::AutoRecharge,
            Kind::Expiry,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One ledger row as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Movement {
    pub id: i64,
    #[schema(value_type = String, example = "ledger_entry")]
    pub object: &'static str,
    pub account_id: Uuid,
    /// Credits added (positive) or taken (negative).
    pub delta: i64,
    pub balance_after: i64,
    #[schema(value_type = Kind)]
    pub kind: String,
    pub reason: Option<String>,
    pub job_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub stripe_event_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The key whose request caused a charge or a refund (`null` for other kinds, and for
    /// rows written before keys were recorded).
    pub key_id: Option<String>,
}

pub const MOVEMENT_COLUMNS: &str = "id, account_id, delta, balance_after, kind, reason, job_id, idempotency_key, stripe_event_id, created_at, key_id";

pub fn movement(row: &tokio_postgres::Row) -> Movement {
    Movement {
        id: row.get(0),
        object: "ledger_entry",
        account_id: row.get(1),
        delta: row.get(2),
        balance_after: row.get(3),
        kind: row.get(4),
        reason: row.get(5),
        job_id: row.get(6),
        idempotency_key: row.get(7),
        stripe_event_id: row.get(8),
        created_at: row.get(9),
        key_id: row.get(10),
    }
}

/// Counts a movement that was just written in the metrics (`crate::metrics::credits_moved`
/// says when that over-counts).
pub(crate) fn counted(m: Movement) -> Movement {
    if let Some(kind) = Kind::parse(&m.kind) {
        crate::metrics::credits_moved(kind, m.delta);
    }
    m
}

/// Adds `amount` (> 0) credits of `kind` (grant or purchase). Returns the new balance.
pub async fn credit(
    db: &impl GenericClient,
    account_id: Uuid,
    amount: i64,
    kind: Kind,
    reason: Option<&str>,
    stripe_event_id: Option<&str>,
) -> Result<Movement, Error> {
    if amount <= 0 {
        return Err(Error::CreditNotPositive);
    }
    let row = db
        .query_opt(
            &format!(
                "WITH acct AS (
                     UPDATE accounts
                        SET credit_balance = credit_balance + $2,
                            clawback_debt = (credit_balance + $2) < 0
                      WHERE id = $1
                  RETURNING credit_balance)
                 INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, stripe_event_id)
                 SELECT $1, $2, credit_balance, $3, $4, $5 FROM acct
                 RETURNING {MOVEMENT_COLUMNS}"
            ),
            &[&account_id, &amount, &kind.as_str(), &reason, &stripe_event_id],
        )
        .await
        .map_err(|e| {
            // A bigint balance cannot grow past 2^63 − 1; the client asked for it, so 422.
            if e.code() == Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
                Error::BalanceOverflow
            } else {
                Error::from(e)
            }
        })?
        .ok_or(Error::AccountNotFound)?;
    Ok(counted(movement(&row)))
}

/// An operator's grant (amount > 0) or adjustment (amount < 0). An adjustment that would take
/// the balance below zero is refused with 422 and writes nothing.
pub async fn adjust(
    db: &impl GenericClient,
    account_id: Uuid,
    amount: i64,
    reason: &str,
) -> Result<Movement, Error> {
    if amount > 0 {
        return credit(db, account_id, amount, Kind::Grant, Some(reason), None).await;
    }
    let row = db
        .query_opt(
            &format!(
                "WITH acct AS (
                     UPDATE accounts SET credit_balance = credit_balance + $2
                      WHERE id = $1 AND credit_balance + $2 >= 0
                  RETURNING credit_balance)
                 INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason)
                 SELECT $1, $2, credit_balance, 'adjustment', $3 FROM acct
                 RETURNING {MOVEMENT_COLUMNS}"
            ),
            &[&account_id, &amount, &reason],
        )
        .await?;
    match row {
        Some(r) => Ok(counted(movement(&r))),
        None => {
            let bal = db
                .query_opt(
                    "SELECT credit_balance FROM accounts WHERE id = $1",
                    &[&account_id],
                )
                .await?
                .ok_or(Error::AccountNotFound)?;
            let balance: i64 = bal.get(0);
            Err(Error::BelowZero { amount, balance })
        }
    }
}

/// What a charge is for.
#[derive(Debug, Clone, Default)]
pub struct ChargeContext<'a> {
    pub job_id: Option<Uuid>,
    pub reason: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    /// The key whose request causes the charge: recorded on the ledger row, and its spend
    /// limit applies (see `key_caps`).
    pub key_id: Option<&'a str>,
    /// A proxied call's charge (gateway mode): recorded in `gateway_charges` too, so the
    /// upstream can refund it, and charged once per request id (see `gateway_charges`).
    pub gateway: Option<&'a GatewayTag>,
}

fn is_unique_violation(e: &tokio_postgres::Error, constraint: &str) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && d.constraint() == Some(constraint)
    })
}

/// Outcome of a job-scoped movement that may already have happened.
// Returned once per movement and never kept in bulk: boxing would cost an allocation per
// charge on the hot path to save stack space nobody holds.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Once {
    Done(Movement),
    AlreadyDone,
    /// A gateway charge whose request id was charged before (only a charge tagged with one,
    /// see `gateway_charges`): nothing was taken now. `balance` is the balance now.
    Replayed {
        charge_id: i64,
        balance: i64,
    },
}

/// Takes `cost` credits in one statement: the UPDATE locks the account row and checks the
/// balance in its WHERE clause, the ledger row is inserted from its RETURNING. No row means
/// the balance was short: 402 with the balance and cost, nothing written. A suspended
/// account cannot be charged.
///
/// When the account has keys with spend limits and the charge names a key, this statement
/// stands back ([`Error::KeyLimitsApply`], nothing written): `key_caps` charges it instead.
pub async fn charge(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    ctx: &ChargeContext<'_>,
) -> Result<Once, Error> {
    charge_checked(db, account_id, cost, ctx, false).await
}

/// [`charge`] once `key_caps` has checked and counted the key's spend under its lock.
pub(crate) async fn charge_after_key_check(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    ctx: &ChargeContext<'_>,
) -> Result<Once, Error> {
    charge_checked(db, account_id, cost, ctx, true).await
}

async fn charge_checked(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    ctx: &ChargeContext<'_>,
    key_checked: bool,
) -> Result<Once, Error> {
    let key_checked = key_checked || ctx.key_id.is_none();
    if cost <= 0 {
        return Err(Error::ChargeNotPositive);
    }
    let tag = ctx.gateway;
    let stmt = db
        .prepare_cached(if tag.is_some() {
            CHARGE_GATEWAY.as_str()
        } else {
            CHARGE.as_str()
        })
        .await?;
    let common: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
        &account_id,
        &cost,
        &ctx.reason,
        &ctx.job_id,
        &ctx.idempotency_key,
        &ctx.key_id,
        &key_checked,
    ];
    let res = match tag {
        None => db.query_opt(&stmt, &common).await,
        Some(t) => {
            let mut params = common.to_vec();
            params.push(&t.route);
            params.push(&t.request_id);
            db.query_opt(&stmt, &params).await
        }
    };
    match res {
        Ok(Some(row)) => Ok(Once::Done(counted(movement(&row)))),
        Ok(None) => why_not(db, account_id, cost, tag, key_checked).await,
        // A concurrent charge of the same request id committed after this statement's
        // snapshot was taken (see `gateway_charges`): a replay, not a second charge.
        Err(e) if is_unique_violation(&e, gateway_charges::ONE_PER_REQUEST) => {
            why_not(db, account_id, cost, tag, key_checked).await
        }
        Err(e) if is_unique_violation(&e, "credit_ledger_one_charge_per_job") => {
            Ok(Once::AlreadyDone)
        }
        Err(e) => Err(e.into()),
    }
}

/// The one-statement charge, built once from the fragments every charge shares. The
/// auto-recharge test rides on the row this statement updates anyway: a comparison, and a
/// NOTIFY only when it holds (see `recharge_signal`). Expiring credits are spent first
/// (`credits::grants`) and the low-balance events are written by the same statement
/// (`credits::alerts`): still one round trip. `gateway` adds what a proxied call's charge
/// needs in the same statement (`gateway_charges`): the request-id check in the UPDATE's
/// WHERE (so a replay locks and writes nothing) and its `gateway_charges` row; `$8` is the
/// route and `$9` the request id. A separate text, so the API's charges do not pay for it.
fn charge_sql(gateway: bool) -> String {
    let (not_charged_yet, record) = if gateway {
        (
            format!("AND {}", gateway_charges::NOT_CHARGED_YET),
            format!("{},", gateway_charges::RECORD_ONE),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "WITH acct AS (
             UPDATE accounts SET credit_balance = credit_balance - $2,
                                 {SPEND_EXPIRING}
              WHERE id = $1 AND credit_balance >= $2 AND ($7 OR NOT key_spend_limits)
                    {not_charged_yet}
          RETURNING credit_balance, {THRESHOLD_SQL} AS threshold, {armed} AS recharge),
         ins AS (
         INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, job_id, idempotency_key, key_id)
         SELECT $1, -$2, credit_balance, 'charge', $3, $4, $5, $6 FROM acct
         RETURNING {MOVEMENT_COLUMNS}),
         {record}
         {CHARGE_EVENTS}
         SELECT ins.*, (SELECT pg_notify('{channel}', ins.account_id::text || ':' || ins.id::text)::text = ''
                         WHERE acct.recharge)
           FROM ins, acct",
        armed = super::recharge_signal::ARMED,
        channel = super::recharge_signal::CHANNEL,
    )
}

static CHARGE: LazyLock<String> = LazyLock::new(|| charge_sql(false));
static CHARGE_GATEWAY: LazyLock<String> = LazyLock::new(|| charge_sql(true));
static WHY_NOT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT credit_balance, key_spend_limits, {} FROM accounts WHERE id = $1",
        gateway_charges::PRIOR_ONE
    )
});

/// Why the one-statement charge wrote nothing: the request id was charged before (a
/// replay, answered with that charge), the account's keys have limits (`key_caps` decides),
/// or the balance was short.
async fn why_not(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    tag: Option<&GatewayTag>,
    key_checked: bool,
) -> Result<Once, Error> {
    let request_id = tag.and_then(|t| t.request_id.as_deref());
    let row = db
        .query_opt(WHY_NOT.as_str(), &[&account_id, &request_id])
        .await?
        .ok_or(Error::AccountNotFound)?;
    let balance: i64 = row.get(0);
    if let Some(charge_id) = row.get::<_, Option<i64>>(2) {
        return Ok(Once::Replayed { charge_id, balance });
    }
    if row.get::<_, bool>(1) && !key_checked {
        return Err(Error::KeyLimitsApply);
    }
    Err(Error::InsufficientCredits { balance, cost })
}

/// Reserves a job's cost: the charge, tied to the job so it can happen only once, and
/// counted against the spend limit of `key_id` (the key that submitted it). Call it in the
/// transaction that creates the job.
pub async fn reserve(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    job_id: Uuid,
    key_id: Option<&str>,
) -> Result<Once, Error> {
    super::key_caps::charge(
        db,
        account_id,
        cost,
        &ChargeContext {
            job_id: Some(job_id),
            reason: Some("job"),
            idempotency_key: None,
            key_id,
            gateway: None,
        },
    )
    .await
}

/// Prepares [`reserve_prepared`]'s statement. A caller that pipelines the reservation with
/// other statements prepares it first, so that nothing in its flight waits for a round trip
/// of its own (a prepare between BEGIN and COMMIT would send the charge after the COMMIT).
pub async fn prepare_reserve(db: &impl GenericClient) -> Result<tokio_postgres::Statement, Error> {
    Ok(db.prepare_cached(CHARGE.as_str()).await?)
}

/// [`reserve`]'s one-statement charge only, on `stmt` from [`prepare_reserve`], its message
/// sent when the future is first polled: for a caller that sends it in one flight with the
/// rest of its transaction. `None`: the one-statement charge did not apply (a short balance,
/// an account whose keys have spend limits, no account) and nothing was written; [`reserve`]
/// in a transaction of its own then charges through the key's limit or says why not. The
/// movement is not counted in the metrics yet: the caller counts it ([`counted`]) once its
/// flight has committed.
pub async fn reserve_prepared(
    db: &impl GenericClient,
    stmt: &tokio_postgres::Statement,
    account_id: Uuid,
    cost: i64,
    job_id: Uuid,
    key_id: Option<&str>,
) -> Result<Option<Movement>, Error> {
    if cost <= 0 {
        return Err(Error::ChargeNotPositive);
    }
    // `$7`, "the key's limit was checked": only true without a key (see `charge_checked`).
    let key_checked = key_id.is_none();
    let res = db
        .query_opt(
            stmt,
            &[
                &account_id,
                &cost,
                &Some("job"),
                &Some(job_id),
                &None::<&str>,
                &key_id,
                &key_checked,
            ],
        )
        .await;
    // A new job's id has no charge yet, so `credit_ledger_one_charge_per_job` cannot be
    // violated here; every error is the database's.
    Ok(res?.map(|r| movement(&r)))
}

/// Keeps a job's charge: the reservation already is the charge, so settling writes no money;
/// it only confirms the charge exists and was not refunded (an invariant check for callers).
pub async fn settle(db: &impl GenericClient, job_id: Uuid) -> Result<bool, Error> {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE kind = 'charge'), count(*) FILTER (WHERE kind = 'refund')
               FROM credit_ledger WHERE job_id = $1",
            &[&job_id],
        )
        .await?;
    let (charges, refunds): (i64, i64) = (row.get(0), row.get(1));
    Ok(charges == 1 && refunds == 0)
}

/// Gives a job's charge back, at most once whatever retries or instances do: the partial
/// unique index on (job_id) for refunds makes a second refund fail as a whole statement
/// (balance untouched), which is reported as `AlreadyDone`. No charge, no refund.
pub async fn refund(db: &impl GenericClient, job_id: Uuid, reason: &str) -> Result<Once, Error> {
    let res = db
        .query_opt(
            &format!(
                "WITH ch AS (
                     SELECT account_id, -delta AS amount, key_id FROM credit_ledger
                      WHERE job_id = $1 AND kind = 'charge'),
                 acct AS (
                     UPDATE accounts a
                        SET credit_balance = a.credit_balance + ch.amount,
                            clawback_debt = (a.credit_balance + ch.amount) < 0
                       FROM ch
                      WHERE a.id = ch.account_id
                        AND NOT EXISTS (SELECT 1 FROM credit_ledger WHERE job_id = $1 AND kind = 'refund')
                  RETURNING a.id, a.credit_balance, ch.amount, ch.key_id)
                 INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, job_id, key_id)
                 SELECT id, amount, credit_balance, 'refund', $2, $1, key_id FROM acct
                 RETURNING {MOVEMENT_COLUMNS}"
            ),
            &[&job_id, &reason],
        )
        .await;
    match res {
        Ok(Some(row)) => Ok(Once::Done(counted(movement(&row)))),
        Ok(None) => Ok(Once::AlreadyDone),
        Err(e) if is_unique_violation(&e, "credit_ledger_one_refund_per_job") => {
            Ok(Once::AlreadyDone)
        }
        Err(e) => Err(e.into()),
    }
}

/// Takes back credits a refunded Stripe payment had bought. Unlike a charge it may take the
/// balance below zero (the credits may already be spent); the account is then marked in
/// debt and charges are refused until purchases bring it back above zero.
pub async fn clawback(
    db: &impl GenericClient,
    account_id: Uuid,
    amount: i64,
    reason: &str,
    stripe_event_id: &str,
) -> Result<Movement, Error> {
    take_back(
        db,
        account_id,
        amount,
        Kind::Clawback,
        reason,
        stripe_event_id,
    )
    .await
}

/// A clawback under another ledger kind (`dispute`): the same below-zero semantics.
pub async fn take_back(
    db: &impl GenericClient,
    account_id: Uuid,
    amount: i64,
    kind: Kind,
    reason: &str,
    stripe_event_id: &str,
) -> Result<Movement, Error> {
    if amount <= 0 {
        return Err(Error::Internal(anyhow::anyhow!(
            "clawback of a non-positive amount"
        )));
    }
    let row = db
        .query_opt(
            &format!(
                "WITH acct AS (
                     UPDATE accounts
                        SET credit_balance = credit_balance - $2,
                            clawback_debt = (credit_balance - $2) < 0
                      WHERE id = $1
                  RETURNING credit_balance)
                 INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, stripe_event_id)
                 SELECT $1, -$2, credit_balance, $5, $3, $4 FROM acct
                 RETURNING {MOVEMENT_COLUMNS}"
            ),
            &[&account_id, &amount, &reason, &stripe_event_id, &kind.as_str()],
        )
        .await?
        .ok_or(Error::AccountNotFound)?;
    Ok(counted(movement(&row)))
}
