//! Per-key spend limits: a key may spend at most `credits` per UTC calendar day or month.
//!
//! The counter (`key_spend_limits.spent`, owned here) moves under its row lock in the same
//! transaction as the charge, so it is exact under any concurrency, like the balance: a
//! charge that would take the key's spend in the period past its limit is refused
//! ([`Error::KeySpendLimitExceeded`], nothing written), and the charge that brings it to the
//! limit records `key.spend_limit_reached` (once per period) on its own transaction.
//!
//! Keys without a limit pay (almost) nothing: `accounts.key_spend_limits` says whether any of
//! the account's keys has one, and the ordinary one-statement charge checks that flag in its
//! WHERE clause (it holds the account's row lock anyway). Only when it is set does the charge
//! take the path here: the account row, then the key's counter (always in that order —
//! accounts before counters, as every charge, batch, refund and limit change takes them — so
//! nothing can deadlock), the decision in Rust ([`Counter::try_spend`]), the ledger row, the
//! counter and the event. Setting a limit flips the flag under the account's row lock, so a
//! charge racing it is re-checked against the flag and cannot slip past.
//!
//! Periods are UTC calendar days (00:00 to 00:00) and months (the 1st, 00:00, to the next
//! 1st), by the database's clock (`now()` of the charging transaction, the same time the
//! ledger row carries). A period's counter starts at zero; it is reset lazily by the first
//! charge of a new period. A refund (a job's, or a gateway charge's) gives its credits back
//! to the counter only when the charge and the refund fall in the same period (the counter's
//! current one): a refund never lends headroom to a period the charge did not spend in.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::ledger::{self, ChargeContext, Once};
use super::Error;
use crate::events::{self, EventType, NewEvent};

/// The largest limit a key may carry (the largest balance an account can hold).
pub const MAX_LIMIT: i64 = i64::MAX / 2;

/// The length of a spend limit's period: a UTC calendar day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    /// The start of the period holding `t`: midnight UTC, or the 1st of the month.
    pub fn start_of(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let day = match self {
            Period::Day => t.day(),
            Period::Month => 1,
        };
        Utc.with_ymd_and_hms(t.year(), t.month(), day, 0, 0, 0)
            .single()
            .unwrap_or(t)
    }

    /// The start of the period after the one starting at `start`.
    pub fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Period::Day => start + chrono::Duration::days(1),
            Period::Month => {
                let (y, m) = if start.month() == 12 {
                    (start.year() + 1, 1)
                } else {
                    (start.year(), start.month() + 1)
                };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .single()
                    .unwrap_or(start)
            }
        }
    }
}

/// A key's spend limit as a client sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpendLimit {
    /// Credits the key may spend per period, at least 1.
    #[schema(minimum = 1)]
    pub credits: i64,
    pub period: Period,
}

impl SpendLimit {
    /// `credits` from 1 to [`MAX_LIMIT`].
    pub fn check(self) -> Result<SpendLimit, Error> {
        if !(1..=MAX_LIMIT).contains(&self.credits) {
            return Err(Error::SpendLimitOutOfRange);
        }
        Ok(self)
    }
}

/// A key's spend limit as the API shows it, with what the key spent in the current period.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SpendLimitView {
    pub credits: i64,
    pub period: Period,
    /// Credits spent in the current period (net of refunds given back in it).
    pub spent: i64,
    /// When the current period started (UTC).
    pub period_start: DateTime<Utc>,
    /// When the counter goes back to zero: the start of the next period (UTC).
    pub resets_at: DateTime<Utc>,
}

/// One key's counter, locked for a charge.
#[derive(Debug, Clone)]
pub struct Counter {
    pub key_id: String,
    pub account_id: Uuid,
    pub credits: i64,
    pub period: Period,
    pub period_start: DateTime<Utc>,
    pub spent: i64,
    pub reached_period: Option<DateTime<Utc>>,
}

impl Counter {
    /// Decides a charge of `cost` at `now` (the charging transaction's time): the counter
    /// rolls over into `now`'s period, a charge beyond the limit is refused (the counter
    /// untouched), and `Ok(true)` says this charge reached the limit for the first time in
    /// the period (so its transaction records the event).
    pub fn try_spend(&mut self, cost: i64, now: DateTime<Utc>) -> Result<bool, Error> {
        let start = self.period.start_of(now);
        let spent = if self.period_start >= start {
            self.spent
        } else {
            0
        };
        if spent.saturating_add(cost) > self.credits {
            return Err(Error::KeySpendLimitExceeded {
                key_id: self.key_id.clone(),
                limit: self.credits,
                period: self.period,
                spent,
                cost,
                resets_at: self.period.next(start),
            });
        }
        self.spent = spent + cost;
        self.period_start = start;
        let reached = self.spent >= self.credits && self.reached_period != Some(start);
        if reached {
            self.reached_period = Some(start);
        }
        Ok(reached)
    }

    /// The `key.spend_limit_reached` event of this counter's current period.
    pub fn reached_event(&self) -> NewEvent {
        NewEvent::new(
            self.account_id,
            EventType::KeySpendLimitReached,
            json!({
                "key_id": self.key_id,
                "spend_limit": {"credits": self.credits, "period": self.period.as_str()},
                "spent": self.spent,
                "period_start": self.period_start,
                "resets_at": self.period.next(self.period_start),
            }),
        )
    }
}

/// Locks the counters of `key_ids` (those that have a limit), in key order; with them the
/// transaction's time, which decides the period. Lock the accounts' rows first.
pub async fn lock(
    db: &impl GenericClient,
    key_ids: &[&str],
) -> Result<(HashMap<String, Counter>, Option<DateTime<Utc>>), Error> {
    let mut ids: Vec<&str> = key_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let stmt = db
        .prepare_cached(
            "SELECT key_id, account_id, credits, period, period_start, spent, reached_period, now()
               FROM key_spend_limits WHERE key_id = ANY($1) ORDER BY key_id FOR UPDATE",
        )
        .await?;
    let rows = db.query(&stmt, &[&ids]).await?;
    let now = rows.first().map(|r| r.get::<_, DateTime<Utc>>(7));
    let counters = rows
        .iter()
        .map(|r| {
            let c = Counter {
                key_id: r.get(0),
                account_id: r.get(1),
                credits: r.get(2),
                period: Period::parse(r.get(3)).unwrap_or(Period::Day),
                period_start: r.get(4),
                spent: r.get(5),
                reached_period: r.get(6),
            };
            (c.key_id.clone(), c)
        })
        .collect();
    Ok((counters, now))
}

/// Writes counters back (after the charges they counted), with the events of those that
/// reached their limit.
pub async fn write(
    db: &impl GenericClient,
    counters: &[&Counter],
    reached: Vec<NewEvent>,
) -> Result<(), Error> {
    if !counters.is_empty() {
        let stmt = db
            .prepare_cached(
                "UPDATE key_spend_limits k
                    SET spent = f.spent, period_start = f.start, reached_period = f.reached
                   FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::timestamptz[])
                        AS f(key_id, spent, start, reached)
                  WHERE k.key_id = f.key_id",
            )
            .await?;
        let ids: Vec<&str> = counters.iter().map(|c| c.key_id.as_str()).collect();
        let spent: Vec<i64> = counters.iter().map(|c| c.spent).collect();
        let starts: Vec<DateTime<Utc>> = counters.iter().map(|c| c.period_start).collect();
        let reached_periods: Vec<Option<DateTime<Utc>>> =
            counters.iter().map(|c| c.reached_period).collect();
        db.execute(&stmt, &[&ids, &spent, &starts, &reached_periods])
            .await?;
    }
    events::record_many(db, reached).await?;
    Ok(())
}

/// A charge on a transaction (the `Idempotency-Key`'s, a job's): the ordinary one-statement
/// charge, and when the account has limited keys, [`charge_limited`] on the same
/// transaction. `db` must be inside a transaction.
pub async fn charge(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    ctx: &ChargeContext<'_>,
) -> Result<Once, Error> {
    match ledger::charge(db, account_id, cost, ctx).await {
        Err(Error::KeyLimitsApply) => charge_limited(db, account_id, cost, ctx).await,
        other => other,
    }
}

/// A charge by a key of an account with limited keys, inside the caller's transaction: the
/// account row, then the key's counter, are locked; a charge beyond the key's limit is
/// refused before anything is written; otherwise the ledger row, the counter and (when this
/// charge reached the limit) the event are written.
pub async fn charge_limited(
    db: &impl GenericClient,
    account_id: Uuid,
    cost: i64,
    ctx: &ChargeContext<'_>,
) -> Result<Once, Error> {
    let stmt = db
        .prepare_cached("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .await?;
    if db.query_opt(&stmt, &[&account_id]).await?.is_none() {
        return Err(Error::AccountNotFound);
    }
    let (mut counters, now) = match ctx.key_id {
        Some(k) => lock(db, &[k]).await?,
        None => (HashMap::new(), None),
    };
    let mut counter = ctx.key_id.and_then(|k| counters.remove(k));
    let mut reached = false;
    if let (Some(c), Some(now)) = (counter.as_mut(), now) {
        reached = c.try_spend(cost, now)?;
    }
    let once = ledger::charge_after_key_check(db, account_id, cost, ctx).await?;
    if let (Once::Done(_), Some(c)) = (&once, &counter) {
        let events = if reached {
            vec![c.reached_event()]
        } else {
            Vec::new()
        };
        write(db, &[c], events).await?;
    }
    Ok(once)
}

/// Gives a refunded charge's credits back to its key's counter, when the charge and the
/// refund fall in the counter's current period (see the module's doc). `{charge}` picks the
/// charge's ledger row by `$1`: a job's, or a gateway charge's (its ledger id).
fn give_back_sql(charge: &str) -> String {
    format!(
        "UPDATE key_spend_limits k SET spent = greatest(k.spent - c.amount, 0)
           FROM (SELECT key_id, -delta AS amount, created_at FROM credit_ledger
                  WHERE {charge} AND kind = 'charge' AND key_id IS NOT NULL) c
          WHERE k.key_id = c.key_id
            AND k.period_start = date_trunc(k.period, now(), 'UTC')
            AND c.created_at >= k.period_start"
    )
}

static GIVE_BACK_JOB: LazyLock<String> = LazyLock::new(|| give_back_sql("job_id = $1"));
static GIVE_BACK_CHARGE: LazyLock<String> = LazyLock::new(|| give_back_sql("id = $1"));

/// Gives a job's refunded credits back to its key's counter (see [`give_back_sql`]). Call
/// it in the refund's transaction, after the refund (which locked the account row).
pub async fn give_back(db: &impl GenericClient, job_id: Uuid) -> Result<(), Error> {
    let stmt = db.prepare_cached(&GIVE_BACK_JOB).await?;
    db.execute(&stmt, &[&job_id]).await?;
    Ok(())
}

/// Gives a refunded gateway charge's credits (`charge_id`, its ledger id) back to its key's
/// counter, like [`give_back`] for a job. Call it in the refund's transaction, after the
/// refund (which locked the account row).
pub async fn give_back_charge(db: &impl GenericClient, charge_id: i64) -> Result<(), Error> {
    let stmt = db.prepare_cached(&GIVE_BACK_CHARGE).await?;
    db.execute(&stmt, &[&charge_id]).await?;
    Ok(())
}

/// Refunds a job (see [`ledger::refund`]) and gives its credits back to its key's counter.
pub async fn refund(db: &impl GenericClient, job_id: Uuid, reason: &str) -> Result<Once, Error> {
    let once = ledger::refund(db, job_id, reason).await?;
    if let Once::Done(m) = &once {
        if m.key_id.is_some() {
            give_back(db, job_id).await?;
        }
    }
    Ok(once)
}

/// Sets (`Some`) or removes (`None`) a key's spend limit, in the caller's transaction. The
/// account row is locked first and its `key_spend_limits` flag rewritten, so charges racing
/// this change wait for it and then see the flag. A new limit, or one whose period changes,
/// starts from what the key spent in the current period according to the ledger (charges,
/// less refunds of charges in the period); a limit whose period stays keeps its counter.
pub async fn set(
    db: &impl GenericClient,
    account_id: Uuid,
    key_id: &str,
    limit: Option<SpendLimit>,
) -> Result<(), Error> {
    if db
        .query_opt(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account_id],
        )
        .await?
        .is_none()
    {
        return Err(Error::AccountNotFound);
    }
    match limit {
        None => {
            db.execute(
                "DELETE FROM key_spend_limits WHERE key_id = $1 AND account_id = $2",
                &[&key_id, &account_id],
            )
            .await?;
        }
        Some(l) => {
            let l = l.check()?;
            let period = l.period.as_str();
            let kept = db
                .execute(
                    "UPDATE key_spend_limits SET credits = $3,
                            reached_period = CASE WHEN spent >= $3 THEN reached_period END
                      WHERE key_id = $1 AND account_id = $2 AND period = $4",
                    &[&key_id, &account_id, &l.credits, &period],
                )
                .await?;
            if kept == 0 {
                db.execute(
                    "WITH p AS (SELECT date_trunc($4, now(), 'UTC') AS start),
                     s AS (
                         SELECT greatest(COALESCE(sum(-l.delta), 0), 0)::bigint AS spent
                           FROM credit_ledger l, p
                          WHERE l.account_id = $2 AND l.key_id = $1 AND l.created_at >= p.start
                            AND (l.kind = 'charge'
                                 OR (l.kind = 'refund' AND EXISTS (
                                     SELECT 1 FROM credit_ledger c
                                      WHERE c.job_id = l.job_id AND c.kind = 'charge'
                                        AND c.created_at >= p.start))
                                 OR (l.kind = 'refund' AND EXISTS (
                                     SELECT 1 FROM gateway_charges g
                                       JOIN credit_ledger c ON c.id = g.ledger_id
                                      WHERE g.refund_id = l.id
                                        AND c.created_at >= p.start))))
                     INSERT INTO key_spend_limits (key_id, account_id, credits, period, period_start, spent)
                     SELECT $1, $2, $3, $4, p.start, s.spent FROM p, s
                     ON CONFLICT (key_id) DO UPDATE
                        SET credits = EXCLUDED.credits, period = EXCLUDED.period,
                            period_start = EXCLUDED.period_start, spent = EXCLUDED.spent,
                            reached_period = NULL",
                    &[&key_id, &account_id, &l.credits, &period],
                )
                .await?;
            }
        }
    }
    db.execute(
        "UPDATE accounts SET key_spend_limits =
                EXISTS (SELECT 1 FROM key_spend_limits WHERE account_id = $1)
          WHERE id = $1",
        &[&account_id],
    )
    .await?;
    Ok(())
}

/// Gives a rotated key's successor the old key's limit and its counter as it stands (the
/// account's flag is already set, as the old key has a limit).
pub async fn inherit(db: &impl GenericClient, old_key: &str, new_key: &str) -> Result<(), Error> {
    db.execute(
        "INSERT INTO key_spend_limits (key_id, account_id, credits, period, period_start, spent, reached_period)
         SELECT $2, account_id, credits, period, period_start, spent, reached_period
           FROM key_spend_limits WHERE key_id = $1",
        &[&old_key, &new_key],
    )
    .await?;
    Ok(())
}

/// The spend limits (with their current period's spend) of `key_ids`, by key id.
pub async fn views(
    db: &impl GenericClient,
    key_ids: &[&str],
) -> Result<HashMap<String, SpendLimitView>, Error> {
    if key_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = db
        .query(
            "SELECT key_id, credits, period, period_start, spent, now()
               FROM key_spend_limits WHERE key_id = ANY($1)",
            &[&key_ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let period = Period::parse(r.get(2)).unwrap_or(Period::Day);
            let now: DateTime<Utc> = r.get(5);
            let start = period.start_of(now);
            let stored: DateTime<Utc> = r.get(3);
            let spent = if stored >= start { r.get(4) } else { 0 };
            (
                r.get(0),
                SpendLimitView {
                    credits: r.get(1),
                    period,
                    spent,
                    period_start: start,
                    resets_at: period.next(start),
                },
            )
        })
        .collect())
}

/// A key's limit as a [`SpendLimit`] (for the power checks), if it has one.
pub async fn limit_of(db: &impl GenericClient, key_id: &str) -> Result<Option<SpendLimit>, Error> {
    let row = db
        .query_opt(
            "SELECT credits, period FROM key_spend_limits WHERE key_id = $1",
            &[&key_id],
        )
        .await?;
    Ok(row.map(|r| SpendLimit {
        credits: r.get(0),
        period: Period::parse(r.get(1)).unwrap_or(Period::Day),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn counter(credits: i64, period: Period, start: &str, spent: i64) -> Counter {
        Counter {
            key_id: "k".into(),
            account_id: Uuid::nil(),
            credits,
            period,
            period_start: at(start),
            spent,
            reached_period: None,
        }
    }

    #[test]
    fn periods_are_utc_calendar_days_and_months() {
        let t = at("2026-12-31T23:59:59Z");
        assert_eq!(Period::Day.start_of(t), at("2026-12-31T00:00:00Z"));
        assert_eq!(Period::Month.start_of(t), at("2026-12-01T00:00:00Z"));
        assert_eq!(
            Period::Day.next(at("2026-12-31T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            Period::Month.next(at("2026-12-01T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            Period::Month.next(at("2028-02-01T00:00:00Z")),
            at("2028-03-01T00:00:00Z")
        );
    }

    #[test]
    fn spends_up_to_the_limit_then_refuses_and_reaches_once() {
        let now = at("2026-12-01T10:00:00Z");
        let mut c = counter(10, Period::Day, "2026-12-01T00:00:00Z", 7);
        assert!(!c.try_spend(2, now).unwrap());
        assert!(matches!(
            c.try_spend(2, now),
            Err(Error::KeySpendLimitExceeded {
                spent: 9,
                cost: 2,
                limit: 10,
                ..
            })
        ));
        assert_eq!(c.spent, 9, "a refusal leaves the counter alone");
        assert!(c.try_spend(1, now).unwrap(), "the charge that reaches it");
        assert!(c.try_spend(1, now).is_err());
        assert_eq!(c.reached_event().payload["spent"], 10);
    }

    #[test]
    fn a_new_period_starts_from_zero_and_may_reach_again() {
        let mut c = counter(5, Period::Month, "2026-11-01T00:00:00Z", 5);
        c.reached_period = Some(at("2026-11-01T00:00:00Z"));
        let now = at("2026-12-02T00:00:00Z");
        assert!(c.try_spend(5, now).unwrap());
        assert_eq!(c.period_start, at("2026-12-01T00:00:00Z"));
        assert_eq!(c.spent, 5);
    }

    #[test]
    fn limits_are_checked() {
        for credits in [0, -1, MAX_LIMIT + 1] {
            let l = SpendLimit {
                credits,
                period: Period::Day,
            };
            assert!(matches!(l.check(), Err(Error::SpendLimitOutOfRange)));
        }
    }
}
