//! Charging proxied calls: group-committed, once per request id, refundable once.
//!
//! Why not `credits::coalesce` itself: its lane writes only the ledger row, and a gateway
//! charge needs two more things in the same transaction — its `gateway_charges` row (so the
//! upstream can refund it, once) and a check that the proxy's `X-Request-Id` was not charged
//! already (so a proxy retrying the authorization, possibly on another instance, charges
//! once). This is the same design, a sibling lane: concurrent charges queue; one leader at a
//! time drains them. A batch of one is one statement (one round trip). A larger batch is one
//! transaction in two round trips: BEGIN, the account rows locked in id order, the batch's
//! request ids looked up and its ledger ids drawn (all pipelined); then the balances, ledger
//! rows and `gateway_charges` rows in one statement pipelined with COMMIT.
//!
//! Why the request-id check is exact: every writer of a gateway charge for an account holds
//! that account's row lock when it writes (the batch locks first; the lone statement's UPDATE
//! locks), so a lookup made after taking the lock sees every charge committed before, and
//! none can commit until this transaction ends. The unique index on (account, request id) is
//! the backstop that turns the one remaining race (the lone statement's snapshot predating a
//! concurrent commit) into a replay rather than a second charge.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Error;
use crate::credits::{self, Kind};
use crate::db;
use crate::db::batch::Batcher;

const MAX_BATCH: usize = 512;

/// What a charge (or its replay) left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charged {
    /// The ledger id of the charge: `X-Keymeter-Charge`, what a refund names.
    pub charge_id: i64,
    /// The balance after the charge (for a replay: the balance now).
    pub balance: i64,
    /// This request id had been charged already; nothing was taken now.
    pub replayed: bool,
}

type Reply = oneshot::Sender<Result<Charged, Error>>;

struct Pending {
    account_id: Uuid,
    cost: i64,
    route: String,
    request_id: Option<String>,
    reply: Reply,
}

pub struct GatewayCharges {
    lane: Arc<Batcher<Pending>>,
}

impl GatewayCharges {
    /// `runtime`: the service's runtime, where the batches run (see `db::batch`).
    pub fn new(runtime: Handle) -> Self {
        Self {
            lane: Arc::new(Batcher::new(runtime)),
        }
    }

    /// Charges `cost` (> 0) for a call to `route`; answers once it has committed (or was
    /// refused). With a `request_id` already charged on this account, answers that charge.
    pub async fn charge(
        &self,
        db: &Pool,
        account_id: Uuid,
        cost: i64,
        route: &str,
        request_id: Option<&str>,
    ) -> Result<Charged, Error> {
        if cost <= 0 {
            return Err(Error::Internal(anyhow::anyhow!(
                "a gateway charge of {cost}"
            )));
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            account_id,
            cost,
            route: route.to_owned(),
            request_id: request_id.map(str::to_owned),
            reply,
        };
        self.lane.push(pending, |lane| drain(lane, db.clone()));
        answer.await.map_err(|_| {
            Error::Internal(anyhow::anyhow!("gateway charge lane dropped a request"))
        })?
    }
}

async fn drain(lane: Arc<Batcher<Pending>>, db: Pool) {
    while let Some(batch) = lane.next_batch(MAX_BATCH) {
        if batch.len() == 1 {
            let Some(p) = batch.into_iter().next() else {
                continue;
            };
            let outcome = charge_one(&db, &p).await;
            let _ = p.reply.send(outcome);
            continue;
        }
        match flush(&db, &batch).await {
            Ok(outcomes) => {
                for (p, o) in batch.into_iter().zip(outcomes) {
                    let _ = p.reply.send(o);
                }
            }
            Err(e) => {
                // Nothing committed: every request in the batch gets the same failure.
                let unavailable = matches!(&e, Error::Db(db::Error::Unavailable(_)));
                tracing::warn!(error = %e, "batched gateway charge failed; nothing was written");
                for p in batch {
                    let _ = p.reply.send(Err(if unavailable {
                        Error::Db(db::Error::Unavailable("gateway charge batch".into()))
                    } else {
                        Error::Internal(anyhow::anyhow!("batched gateway charge failed"))
                    }));
                }
            }
        }
    }
}

fn reason(route: &str) -> String {
    format!("gateway {route}")
}

/// A lone charge in one statement. The `NOT EXISTS` spares the common replay an error; the
/// unique index catches the concurrent one (see the module comment).
const ONE: &str = "
    WITH acct AS (
        UPDATE accounts SET credit_balance = credit_balance - $2,
                            expiring_credits = expiring_credits - LEAST($2, expiring_credits)
         WHERE id = $1 AND credit_balance >= $2
           AND ($4::text IS NULL OR NOT EXISTS (
                SELECT 1 FROM gateway_charges WHERE account_id = $1 AND request_id = $4))
     RETURNING credit_balance),
    led AS (
        INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason)
        SELECT $1, -$2, credit_balance, 'charge', $5 FROM acct
     RETURNING id, balance_after),
    gw AS (
        INSERT INTO gateway_charges (ledger_id, account_id, request_id, route, amount)
        SELECT id, $1, $4, $3, $2 FROM led)
    SELECT id, balance_after FROM led";

/// Why a lone charge wrote nothing: an earlier charge of the request id, or the balance.
const WHY_NOT: &str = "
    SELECT a.credit_balance,
           (SELECT ledger_id FROM gateway_charges
             WHERE $2::text IS NOT NULL AND account_id = $1 AND request_id = $2)
      FROM accounts a WHERE a.id = $1";

async fn charge_one(db: &Pool, p: &Pending) -> Result<Charged, Error> {
    let client = db.get().await?;
    let stmt = client.prepare_cached(ONE).await?;
    let reason = reason(&p.route);
    let res = client
        .query_opt(
            &stmt,
            &[&p.account_id, &p.cost, &p.route, &p.request_id, &reason],
        )
        .await;
    match res {
        Ok(Some(row)) => {
            crate::metrics::credits_moved(Kind::Charge, -p.cost);
            Ok(Charged {
                charge_id: row.get(0),
                balance: row.get(1),
                replayed: false,
            })
        }
        Ok(None) => why_not(&client, p).await,
        Err(e) if is_duplicate_request(&e) => why_not(&client, p).await,
        Err(e) => Err(e.into()),
    }
}

async fn why_not(client: &deadpool_postgres::Client, p: &Pending) -> Result<Charged, Error> {
    let row = client
        .query_opt(WHY_NOT, &[&p.account_id, &p.request_id])
        .await?
        .ok_or(Error::Credits(credits::Error::AccountNotFound))?;
    let balance: i64 = row.get(0);
    match row.get::<_, Option<i64>>(1) {
        Some(charge_id) => Ok(Charged {
            charge_id,
            balance,
            replayed: true,
        }),
        None => Err(Error::Credits(credits::Error::InsufficientCredits {
            balance,
            cost: p.cost,
        })),
    }
}

fn is_duplicate_request(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && d.constraint() == Some("gateway_charges_one_per_request")
    })
}

/// With each account's expiring credits, which every charge spends first (`credits::grants`).
const LOCK: &str = "SELECT id, credit_balance, expiring_credits FROM accounts
                     WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const PRIOR: &str = "
    SELECT g.account_id, g.request_id, g.ledger_id
      FROM gateway_charges g
      JOIN unnest($1::uuid[], $2::text[]) AS k(a, r) ON g.account_id = k.a AND g.request_id = k.r";
const IDS: &str =
    "SELECT nextval(pg_get_serial_sequence('credit_ledger', 'id')) FROM generate_series(1, $1::int)";
const WRITE: &str = "
    WITH acct AS (
        UPDATE accounts a SET credit_balance = f.b, expiring_credits = f.e
          FROM unnest($1::uuid[], $2::bigint[], $9::bigint[]) AS f(id, b, e)
         WHERE a.id = f.id),
    led AS (
        INSERT INTO credit_ledger (id, account_id, delta, balance_after, kind, reason)
        OVERRIDING SYSTEM VALUE
        SELECT u.i, u.a, -u.c, u.b, 'charge', 'gateway ' || u.r
          FROM unnest($3::bigint[], $4::uuid[], $5::bigint[], $6::bigint[], $7::text[])
               AS u(i, a, c, b, r))
    INSERT INTO gateway_charges (ledger_id, account_id, request_id, route, amount)
    SELECT u.i, u.a, u.q, u.r, u.c
      FROM unnest($3::bigint[], $4::uuid[], $5::bigint[], $7::text[], $8::text[])
           AS u(i, a, c, r, q)";

/// What the batch decided for one request, before the write.
enum Decision {
    Charge {
        id: i64,
        balance: i64,
    },
    /// Charged before this batch (or earlier in it: the index of that request).
    Replay(i64),
    SameAs(usize),
    Refuse(Error),
}

async fn flush(db: &Pool, batch: &[Pending]) -> Result<Vec<Result<Charged, Error>>, Error> {
    let client = db.get().await?;
    let outcome = flush_on(&client, batch).await;
    if outcome.is_err() && client.batch_execute("ROLLBACK").await.is_err() {
        // A connection that cannot even end its transaction is not given back.
        let _ = deadpool_postgres::Object::take(client);
    }
    outcome
}

async fn flush_on(
    client: &deadpool_postgres::Client,
    batch: &[Pending],
) -> Result<Vec<Result<Charged, Error>>, Error> {
    let lock = client.prepare_cached(LOCK).await?;
    let prior = client.prepare_cached(PRIOR).await?;
    let ids_stmt = client.prepare_cached(IDS).await?;
    let write = client.prepare_cached(WRITE).await?;

    let mut accounts: Vec<Uuid> = batch.iter().map(|p| p.account_id).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let (key_accounts, key_ids): (Vec<Uuid>, Vec<String>) = batch
        .iter()
        .filter_map(|p| p.request_id.clone().map(|r| (p.account_id, r)))
        .unzip();
    let n = i32::try_from(batch.len()).unwrap_or(i32::MAX);
    // One round trip: the server runs them in order, so the lookup and the ids come after
    // the locks are held.
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&accounts];
    let prior_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&key_accounts, &key_ids];
    let ids_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n];
    let ((), locked, earlier, ids) = tokio::try_join!(
        client.batch_execute("BEGIN"),
        client.query(&lock, &lock_params),
        client.query(&prior, &prior_params),
        client.query(&ids_stmt, &ids_params),
    )?;
    let mut balances: HashMap<Uuid, i64> = locked.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut expiring: HashMap<Uuid, i64> = locked.iter().map(|r| (r.get(0), r.get(2))).collect();
    let earlier: HashMap<(Uuid, String), i64> = earlier
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let mut ids = ids.iter().map(|r| r.get::<_, i64>(0));

    let mut seen: HashMap<(Uuid, &str), usize> = HashMap::new();
    let mut decisions = Vec::with_capacity(batch.len());
    let (mut w_ids, mut w_accounts, mut w_costs, mut w_afters, mut w_routes, mut w_requests) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (i, p) in batch.iter().enumerate() {
        if let Some(r) = p.request_id.as_deref() {
            if let Some(id) = earlier.get(&(p.account_id, r.to_owned())) {
                decisions.push(Decision::Replay(*id));
                continue;
            }
            if let Some(first) = seen.get(&(p.account_id, r)) {
                decisions.push(Decision::SameAs(*first));
                continue;
            }
            seen.insert((p.account_id, r), i);
        }
        let Some(balance) = balances.get_mut(&p.account_id) else {
            decisions.push(Decision::Refuse(Error::Credits(
                credits::Error::AccountNotFound,
            )));
            continue;
        };
        if *balance >= p.cost {
            let id = ids
                .next()
                .ok_or_else(|| Error::Internal(anyhow::anyhow!("ran out of ledger ids")))?;
            *balance -= p.cost;
            if let Some(left) = expiring.get_mut(&p.account_id) {
                *left -= p.cost.min(*left);
            }
            w_ids.push(id);
            w_accounts.push(p.account_id);
            w_costs.push(p.cost);
            w_afters.push(*balance);
            w_routes.push(p.route.clone());
            w_requests.push(p.request_id.clone());
            decisions.push(Decision::Charge {
                id,
                balance: *balance,
            });
        } else {
            decisions.push(Decision::Refuse(Error::Credits(
                credits::Error::InsufficientCredits {
                    balance: *balance,
                    cost: p.cost,
                },
            )));
        }
    }
    if w_ids.is_empty() {
        client.batch_execute("COMMIT").await?;
    } else {
        let touched: HashSet<Uuid> = w_accounts.iter().copied().collect();
        let (final_ids, final_balances): (Vec<Uuid>, Vec<i64>) = touched
            .into_iter()
            .map(|a| (a, balances.get(&a).copied().unwrap_or_default()))
            .unzip();
        let final_expiring: Vec<i64> = final_ids
            .iter()
            .map(|a| expiring.get(a).copied().unwrap_or_default())
            .collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
            &final_ids,
            &final_balances,
            &w_ids,
            &w_accounts,
            &w_costs,
            &w_afters,
            &w_routes,
            &w_requests,
            &final_expiring,
        ];
        let (_, ()) = tokio::try_join!(
            client.execute(&write, &params),
            client.batch_execute("COMMIT")
        )?;
        for c in &w_costs {
            crate::metrics::credits_moved(Kind::Charge, -c);
        }
    }
    // Replays answer with the balance as this batch left it.
    let balance_now = |a: &Uuid| balances.get(a).copied().unwrap_or_default();
    let mut out: Vec<Result<Charged, Error>> = Vec::with_capacity(batch.len());
    for (p, d) in batch.iter().zip(decisions) {
        let outcome = match d {
            Decision::Charge { id, balance } => Ok(Charged {
                charge_id: id,
                balance,
                replayed: false,
            }),
            Decision::Replay(id) => Ok(Charged {
                charge_id: id,
                balance: balance_now(&p.account_id),
                replayed: true,
            }),
            // The first request with this id came earlier in the batch, so its outcome is
            // already final: a duplicate gets the same answer.
            Decision::SameAs(first) => match out.get(first) {
                Some(Ok(c)) => Ok(Charged {
                    charge_id: c.charge_id,
                    balance: balance_now(&p.account_id),
                    replayed: true,
                }),
                Some(Err(Error::Credits(credits::Error::InsufficientCredits {
                    balance,
                    cost,
                }))) => Err(Error::Credits(credits::Error::InsufficientCredits {
                    balance: *balance,
                    cost: *cost,
                })),
                _ => Err(Error::Credits(credits::Error::AccountNotFound)),
            },
            Decision::Refuse(e) => Err(e),
        };
        out.push(outcome);
    }
    Ok(out)
}

/// A refunded gateway charge.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Refunded {
    #[schema(value_type = String, example = "gateway_refund")]
    pub object: &'static str,
    /// The charge refunded (its ledger id, as `X-Keymeter-Charge` gave it).
    pub charge: i64,
    /// The ledger id of the refund.
    pub refund: i64,
    pub account_id: Uuid,
    /// Credits given back.
    pub amount: i64,
    pub balance_after: i64,
}

const REFUND: &str = "
    WITH g AS (
        SELECT ledger_id, account_id, amount FROM gateway_charges
         WHERE ledger_id = $1 AND refund_id IS NULL
           FOR UPDATE),
    acct AS (
        UPDATE accounts a
           SET credit_balance = a.credit_balance + g.amount,
               clawback_debt = (a.credit_balance + g.amount) < 0
          FROM g WHERE a.id = g.account_id
     RETURNING a.id, a.credit_balance, g.amount),
    led AS (
        INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason)
        SELECT id, amount, credit_balance, 'refund', $2 FROM acct
     RETURNING id, account_id, delta, balance_after),
    mark AS (
        UPDATE gateway_charges SET refund_id = led.id FROM led WHERE ledger_id = $1)
    SELECT id, account_id, delta, balance_after FROM led";

/// Gives a gateway charge back, at most once: the row lock on its `gateway_charges` row
/// orders concurrent refunds, and the second finds `refund_id` set.
pub async fn refund(db: &Pool, charge_id: i64) -> Result<Refunded, Error> {
    let client = db.get().await?;
    let reason = format!("gateway refund of charge {charge_id}");
    if let Some(row) = client.query_opt(REFUND, &[&charge_id, &reason]).await? {
        let amount: i64 = row.get(2);
        crate::metrics::credits_moved(Kind::Refund, amount);
        return Ok(Refunded {
            object: "gateway_refund",
            charge: charge_id,
            refund: row.get(0),
            account_id: row.get(1),
            amount,
            balance_after: row.get(3),
        });
    }
    let row = client
        .query_opt(
            "SELECT refund_id FROM gateway_charges WHERE ledger_id = $1",
            &[&charge_id],
        )
        .await?;
    match row.and_then(|r| r.get::<_, Option<i64>>(0)) {
        Some(refund_id) => Err(Error::AlreadyRefunded { refund_id }),
        None => Err(Error::ChargeNotFound),
    }
}
