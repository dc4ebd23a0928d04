//! Group commit for charges.
//!
//! A one-statement charge is its own commit, and commits — a WAL flush each, a round trip
//! each — are what bounds charges per second: one hot account by commits in a row on its
//! row lock, charges spread over many accounts by the commit and round trips per request.
//! Here, concurrent charges queue in one lane; one leader at a time drains it. A batch of
//! one uses the ordinary one-statement charge (no extra round trip when there is no
//! contention); a larger batch, over any mix of accounts, is one transaction in two round
//! trips — lock the batch's account rows in id order (so batches of two instances can never
//! deadlock), decide each charge in arrival order against its account's running balance,
//! write every balance with one UPDATE and every ledger row with one INSERT, commit — and
//! only then is every request in it answered. Each ledger row still carries its own
//! `balance_after`, so the ledger reads exactly as if the charges had been made one by one;
//! overspending is impossible because every decision is made under the row locks.
//!
//! Gateway mode's charges (a proxied call, `GET /v1/authz`) go through this lane too, as
//! [`ChargeRequest`]s carrying a [`GatewayTag`]: so they share every credit control — the key
//! on the ledger row and its spend limit, expiring credits first, the low-balance events, the
//! auto-recharge signal — by construction rather than by a copy kept in step. What they add
//! (their request id charged once, their `gateway_charges` row for refunds) rides on the same
//! two round trips: the request-id lookup is pipelined after the locking SELECT, the rows are
//! one more CTE of the write (see `gateway_charges`).
//!
//! One lane, not one per account or a few sharded by account: measured on the 2-core
//! machine (`load/bench/deduct.sh`, 32 clients over 1000 accounts), one lane made 12,500
//! charges/s, two 10,800, four 8,200 — while a batch commits, the next one fills up, so a
//! single lane makes the biggest batches. The price is that a batch waiting for a row lock
//! (another transaction on one of its accounts: a job's reservation, a grant, a purchase,
//! all a few milliseconds) delays the charges queued behind it by as long.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::alerts::BatchAlerts;
use super::gateway_charges::{self, BatchRecords, GatewayTag};
use super::key_caps;
use super::ledger::{self, movement, ChargeContext, Movement, Once, MOVEMENT_COLUMNS};
use super::Error;
use crate::db;
use crate::db::batch::Batcher;

/// The most charges in one transaction; the rest wait for the next one.
const MAX_BATCH: usize = 512;

/// One charge, as the lane (or [`charge_now`]) takes it.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub account_id: Uuid,
    /// Credits to take, > 0.
    pub cost: i64,
    pub reason: Option<String>,
    /// The key whose request it is (recorded on the ledger row; its spend limit applies).
    pub key_id: Option<String>,
    /// A proxied call's charge (gateway mode): also recorded for refunds, once per request
    /// id (see `gateway_charges`).
    pub gateway: Option<GatewayTag>,
}

impl ChargeRequest {
    fn context(&self) -> ChargeContext<'_> {
        ChargeContext {
            job_id: None,
            reason: self.reason.as_deref(),
            idempotency_key: None,
            key_id: self.key_id.as_deref(),
            gateway: self.gateway.as_ref(),
        }
    }

    /// The request id this charge may be charged once for.
    fn request_id(&self) -> Option<&str> {
        self.gateway.as_ref().and_then(|g| g.request_id.as_deref())
    }
}

type Reply = oneshot::Sender<Result<Once, Error>>;

struct Pending {
    request: ChargeRequest,
    reply: Reply,
}

pub struct Coalescer {
    lane: Arc<Batcher<Pending>>,
}

impl Coalescer {
    /// `runtime`: the service's runtime, where the batches run (see `db::batch`).
    pub fn new(runtime: Handle) -> Self {
        Self {
            lane: Arc::new(Batcher::new(runtime)),
        }
    }

    /// Charges `cost`; answers after the charge has committed (or was refused).
    pub async fn charge(
        &self,
        db: &Pool,
        account_id: Uuid,
        cost: i64,
        reason: Option<String>,
        key_id: Option<String>,
    ) -> Result<Movement, Error> {
        let request = ChargeRequest {
            account_id,
            cost,
            reason,
            key_id,
            gateway: None,
        };
        match self.submit(db, request).await? {
            Once::Done(m) => Ok(m),
            _ => Err(Error::Internal(anyhow::anyhow!(
                "a charge without a job or a request id reported as a duplicate"
            ))),
        }
    }

    /// Charges `request` in the lane: `Done` after it has committed, `Replayed` (nothing
    /// taken) when its gateway request id was charged before.
    pub async fn submit(&self, db: &Pool, request: ChargeRequest) -> Result<Once, Error> {
        if request.cost <= 0 {
            return Err(Error::ChargeNotPositive);
        }
        let (reply, answer) = oneshot::channel();
        self.lane
            .push(Pending { request, reply }, |lane| drain(lane, db.clone()));
        answer
            .await
            .map_err(|_| Error::Internal(anyhow::anyhow!("charge lane dropped a request")))?
    }
}

/// `request` on its own, without the lane (group commit off): exactly what the lane does
/// with a batch of one.
pub async fn charge_now(db: &Pool, request: &ChargeRequest) -> Result<Once, Error> {
    if request.cost <= 0 {
        return Err(Error::ChargeNotPositive);
    }
    charge_one(db, request).await
}

async fn drain(lane: Arc<Batcher<Pending>>, db: Pool) {
    while let Some(batch) = lane.next_batch(MAX_BATCH) {
        if batch.len() == 1 {
            let Some(p) = batch.into_iter().next() else {
                continue;
            };
            let outcome = charge_one(&db, &p.request).await;
            let _ = p.reply.send(outcome);
            continue;
        }
        let (requests, replies): (Vec<ChargeRequest>, Vec<Reply>) =
            batch.into_iter().map(|p| (p.request, p.reply)).unzip();
        match flush(&db, &requests).await {
            Ok(outcomes) => {
                for (reply, o) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(o);
                }
            }
            Err(e) => {
                // Nothing committed: every request in the batch gets the same failure.
                let unavailable = match &e {
                    Error::Db(db::Error::Unavailable(why)) => Some(why.clone()),
                    _ => None,
                };
                for reply in replies {
                    let _ = reply.send(Err(if let Some(why) = &unavailable {
                        Error::Db(db::Error::Unavailable(why.clone()))
                    } else {
                        Error::Internal(anyhow::anyhow!("batched charge failed"))
                    }));
                }
                tracing::warn!(error = %e, "batched charge failed; nothing was written");
            }
        }
    }
}

/// A lone charge: the ordinary one-statement charge, one round trip — or, for an account
/// with keys under spend limits, a batch of one (which checks and counts the key).
async fn charge_one(db: &Pool, r: &ChargeRequest) -> Result<Once, Error> {
    let client = db.get().await?;
    match ledger::charge(&client, r.account_id, r.cost, &r.context()).await {
        Err(Error::KeyLimitsApply) => {
            drop(client);
            let mut outcomes = flush(db, std::slice::from_ref(r)).await?;
            outcomes.pop().unwrap_or_else(|| {
                Err(Error::Internal(anyhow::anyhow!(
                    "a batch of one lost its charge"
                )))
            })
        }
        Ok(Once::AlreadyDone) => Err(Error::Internal(anyhow::anyhow!(
            "duplicate charge without a job"
        ))),
        other => other,
    }
}

/// Locks the batch's account rows, in id order (ORDER BY is applied before FOR UPDATE),
/// with what the batch's decisions need: the balance; the auto-recharge arming (see
/// `recharge_signal`), so the batch can tell which accounts it takes below their threshold
/// without another query; whether the account has keys under spend limits (`key_caps`);
/// the expiring credits spent first (`grants`) and the low-balance threshold (`alerts`).
static LOCK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT id, credit_balance, recharge_below, recharge_after <= now(), key_spend_limits,
                expiring_credits, {} FROM accounts
          WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        super::alerts::THRESHOLD_SQL
    )
});

/// Each touched account's final balance, then all ledger rows, in one statement; with
/// `gateway`, the `gateway_charges` rows of the batch's gateway charges as well
/// ([`gateway_charges::RECORD_MANY`]; a separate text, so batches of API charges only do
/// not pay for it).
fn write_sql(gateway: bool) -> String {
    let (led, record, out) = if gateway {
        (
            "led AS (",
            format!("), {}", gateway_charges::RECORD_MANY),
            "SELECT * FROM led",
        )
    } else {
        ("", String::new(), "")
    };
    format!(
        "WITH acct AS (
             UPDATE accounts a SET credit_balance = f.b, expiring_credits = f.e
               FROM unnest($1::uuid[], $2::bigint[], $8::bigint[]) AS f(id, b, e)
              WHERE a.id = f.id),
         alerts AS (
             INSERT INTO events (id, account_id, type, payload)
             SELECT * FROM unnest($9::text[], $10::uuid[], $11::text[], $12::jsonb[])){comma}
         {led}
         INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, key_id)
         SELECT u.a, u.d, u.b, 'charge', u.r, u.k
           FROM unnest($3::uuid[], $4::bigint[], $5::bigint[], $6::text[], $7::text[])
                WITH ORDINALITY AS u(a, d, b, r, k, n)
          ORDER BY u.n
         RETURNING {MOVEMENT_COLUMNS}{record}
         {out}",
        comma = if gateway { "," } else { "" },
    )
}

static WRITE: LazyLock<String> = LazyLock::new(|| write_sql(false));
static WRITE_GATEWAY: LazyLock<String> = LazyLock::new(|| write_sql(true));

/// One transaction for the whole batch; returns each request's outcome in order.
///
/// Two round trips: BEGIN and the locking SELECT are sent together (with the lookup of the
/// batch's gateway request ids after it, when it has any), then the write and COMMIT
/// together (tokio-postgres pipelines requests polled concurrently). Should the write fail,
/// PostgreSQL turns that COMMIT into a rollback, so nothing is half-written.
async fn flush(db: &Pool, batch: &[ChargeRequest]) -> Result<Vec<Result<Once, Error>>, Error> {
    let client = db.get().await?;
    let outcome = flush_on(&client, batch).await;
    if outcome.is_err() {
        // Whatever failed, end the transaction before the connection goes back to the pool;
        // one that cannot even do that is discarded.
        if client.batch_execute("ROLLBACK").await.is_err() {
            let _ = deadpool_postgres::Object::take(client);
        }
    }
    outcome
}

/// What the batch decided for one request, before the write.
enum Decision {
    /// Charged by this batch.
    Charge,
    /// Its request id was charged before this batch: that charge's ledger id.
    Replay(i64),
    /// Its request id is charged by an earlier request of this batch (its index).
    SameAs(usize),
    Refuse(Error),
}

async fn flush_on(
    client: &deadpool_postgres::Client,
    batch: &[ChargeRequest],
) -> Result<Vec<Result<Once, Error>>, Error> {
    // Prepared once per connection: each statement is one message, not parse + execute.
    let lock = client.prepare_cached(&LOCK).await?;
    let mut ids: Vec<Uuid> = batch.iter().map(|p| p.account_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let (prior_accounts, prior_requests): (Vec<Uuid>, Vec<&str>) = batch
        .iter()
        .filter_map(|p| p.request_id().map(|r| (p.account_id, r)))
        .unzip();
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
    let (locked, earlier) = if prior_requests.is_empty() {
        let ((), locked) = tokio::try_join!(
            client.batch_execute("BEGIN"),
            client.query(&lock, &lock_params)
        )?;
        (locked, Vec::new())
    } else {
        // The server runs them in order: the lookup's snapshot is taken once the account
        // rows are locked, so it sees every earlier charge of these request ids.
        let prior = client.prepare_cached(gateway_charges::PRIOR_MANY).await?;
        let prior_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&prior_accounts, &prior_requests];
        tokio::try_join!(
            client.batch_execute("BEGIN"),
            client.query(&lock, &lock_params),
            client.query(&prior, &prior_params)
        )
        .map(|((), locked, earlier)| (locked, earlier))?
    };
    let earlier: HashMap<(Uuid, String), i64> = earlier
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let mut balances: HashMap<Uuid, i64> = locked.iter().map(|r| (r.get(0), r.get(1))).collect();
    // Armed accounts and their thresholds: the only ones a crossing is looked for in.
    let armed: HashMap<Uuid, i64> = locked
        .iter()
        .filter_map(
            |r| match (r.get::<_, Option<i64>>(2), r.get::<_, bool>(3)) {
                (Some(below), true) => Some((r.get(0), below)),
                _ => None,
            },
        )
        .collect();
    let mut caps = BatchCaps::lock(client, &locked, batch).await?;
    // (expiring credits, threshold) per account; see `grants` and `alerts`.
    let mut expiring: HashMap<Uuid, (i64, i64)> = locked
        .iter()
        .map(|r| (r.get(0), (r.get(5), r.get(6))))
        .collect();
    let mut alerts = BatchAlerts::default();
    let mut records = BatchRecords::default();
    let (mut accounts, mut deltas, mut afters, mut reasons, mut keys) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::<Option<String>>::new(),
        Vec::<Option<String>>::new(),
    );
    // Request ids this batch charged: the index of the request that did.
    let mut charged_here: HashMap<(Uuid, &str), usize> = HashMap::new();
    let mut decisions = Vec::with_capacity(batch.len());
    for (i, p) in batch.iter().enumerate() {
        if let Some(request_id) = p.request_id() {
            if let Some(id) = earlier.get(&(p.account_id, request_id.to_owned())) {
                decisions.push(Decision::Replay(*id));
                continue;
            }
            if let Some(first) = charged_here.get(&(p.account_id, request_id)) {
                decisions.push(Decision::SameAs(*first));
                continue;
            }
        }
        let Some(balance) = balances.get_mut(&p.account_id) else {
            decisions.push(Decision::Refuse(Error::AccountNotFound));
            continue;
        };
        if p.cost > 0 && *balance >= p.cost {
            if let Err(refusal) = caps.try_spend(p) {
                decisions.push(Decision::Refuse(refusal));
                continue;
            }
            if let Some((left, threshold)) = expiring.get_mut(&p.account_id) {
                *left -= p.cost.min(*left);
                alerts.charged(p.account_id, *balance, *balance - p.cost, *threshold);
            }
            *balance -= p.cost;
            accounts.push(p.account_id);
            deltas.push(-p.cost);
            afters.push(*balance);
            reasons.push(p.reason.clone());
            keys.push(p.key_id.clone());
            if let Some(g) = &p.gateway {
                // 1-based, as `row_number()` numbers the ledger rows.
                records.positions.push(accounts.len() as i64);
                records.routes.push(g.route.clone());
                records.request_ids.push(g.request_id.clone());
                if let Some(request_id) = p.request_id() {
                    charged_here.insert((p.account_id, request_id), i);
                }
            }
            decisions.push(Decision::Charge);
        } else {
            decisions.push(Decision::Refuse(Error::InsufficientCredits {
                balance: *balance,
                cost: p.cost,
            }));
        }
    }
    let rows = if deltas.is_empty() {
        client.batch_execute("COMMIT").await?;
        Vec::new()
    } else {
        // The balances written are the running balances after each account's last charge.
        let mut finals: HashMap<Uuid, i64> = HashMap::new();
        for (a, b) in accounts.iter().zip(&afters) {
            finals.insert(*a, *b);
        }
        // Accounts this batch leaves below their armed threshold: one NOTIFY each, naming the
        // row that crossed, pipelined before COMMIT (no extra round trip; none at all when
        // no account crossed, which is nearly always).
        let (mut crossed, mut crossed_at) = (Vec::new(), Vec::new());
        for (a, b) in &finals {
            if armed.get(a).is_some_and(|below| b < below) {
                crossed.push(*a);
                crossed_at.push(*b);
            }
        }
        let (final_ids, final_balances): (Vec<Uuid>, Vec<i64>) = finals.into_iter().unzip();
        let final_expiring: Vec<i64> = final_ids
            .iter()
            .map(|id| expiring.get(id).map_or(0, |e| e.0))
            .collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &final_ids,
            &final_balances,
            &accounts,
            &deltas,
            &afters,
            &reasons,
            &keys,
            &final_expiring,
            &alerts.ids,
            &alerts.accounts,
            &alerts.types,
            &alerts.payloads,
        ];
        let write = if records.is_empty() {
            client.prepare_cached(&WRITE).await?
        } else {
            params.push(&records.positions);
            params.push(&records.routes);
            params.push(&records.request_ids);
            client.prepare_cached(&WRITE_GATEWAY).await?
        };
        if !caps.is_empty() {
            // Its own round trips, before the pipelined write and COMMIT: a future of several
            // statements must not be polled alongside COMMIT, which could overtake its later ones.
            caps.write(client).await?;
        }
        if crossed.is_empty() {
            let (rows, ()) = tokio::try_join!(
                client.query(&write, &params),
                client.batch_execute("COMMIT")
            )?;
            rows
        } else {
            // Prepared (once per connection) before the pipeline, so its execution is sent
            // between the write and the COMMIT rather than after a Parse round trip.
            let notify_stmt = client
                .prepare_cached(super::recharge_signal::NOTIFY_CROSSINGS)
                .await?;
            let notify: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&crossed, &crossed_at];
            let (rows, _, ()) = tokio::try_join!(
                client.query(&write, &params),
                client.execute(&notify_stmt, &notify),
                client.batch_execute("COMMIT")
            )?;
            rows
        }
    };
    // Ledger ids follow insertion order; pair them back up with the accepted requests.
    let mut sorted: Vec<Movement> = rows.iter().map(|r| ledger::counted(movement(r))).collect();
    sorted.sort_by_key(|m| m.id);
    let mut accepted = sorted.into_iter();
    // Replays answer with the balance as this batch left it.
    let balance_now = |a: &Uuid| balances.get(a).copied().unwrap_or_default();
    let mut out: Vec<Result<Once, Error>> = Vec::with_capacity(batch.len());
    for (p, d) in batch.iter().zip(decisions) {
        let outcome = match d {
            Decision::Charge => accepted
                .next()
                .map(Once::Done)
                .ok_or_else(|| Error::Internal(anyhow::anyhow!("batched charge lost a row"))),
            Decision::Replay(charge_id) => Ok(Once::Replayed {
                charge_id,
                balance: balance_now(&p.account_id),
            }),
            // The request that charged this id came earlier in the batch, so its outcome is
            // already final.
            Decision::SameAs(first) => match out.get(first) {
                Some(Ok(Once::Done(m))) => Ok(Once::Replayed {
                    charge_id: m.id,
                    balance: balance_now(&p.account_id),
                }),
                _ => Err(Error::Internal(anyhow::anyhow!(
                    "a batch lost the charge of a request id"
                ))),
            },
            Decision::Refuse(e) => Err(e),
        };
        out.push(outcome);
    }
    Ok(out)
}

/// The spend-limit counters of a batch's keys (`key_caps`): locked after the accounts, only
/// for keys of accounts whose flag says some of their keys have limits — a batch of
/// accounts without any costs nothing more.
struct BatchCaps {
    counters: HashMap<String, key_caps::Counter>,
    now: Option<chrono::DateTime<chrono::Utc>>,
    touched: Vec<String>,
    reached: Vec<crate::events::NewEvent>,
}

impl BatchCaps {
    async fn lock(
        client: &deadpool_postgres::Client,
        locked: &[tokio_postgres::Row],
        batch: &[ChargeRequest],
    ) -> Result<BatchCaps, Error> {
        let limited: std::collections::HashSet<Uuid> = locked
            .iter()
            .filter(|r| r.get::<_, bool>(4))
            .map(|r| r.get(0))
            .collect();
        let keys: Vec<&str> = batch
            .iter()
            .filter(|p| limited.contains(&p.account_id))
            .filter_map(|p| p.key_id.as_deref())
            .collect();
        let (counters, now) = if keys.is_empty() {
            (HashMap::new(), None)
        } else {
            key_caps::lock(client, &keys).await?
        };
        Ok(BatchCaps {
            counters,
            now,
            touched: Vec::new(),
            reached: Vec::new(),
        })
    }

    fn is_empty(&self) -> bool {
        self.touched.is_empty()
    }

    /// Decides `p` against its key's running counter, in arrival order; a refusal leaves it
    /// as it was.
    fn try_spend(&mut self, p: &ChargeRequest) -> Result<(), Error> {
        let (Some(key), Some(now)) = (p.key_id.as_deref(), self.now) else {
            return Ok(());
        };
        let Some(counter) = self.counters.get_mut(key) else {
            return Ok(());
        };
        if counter.try_spend(p.cost, now)? {
            self.reached.push(counter.reached_event());
        }
        if !self.touched.iter().any(|k| k == key) {
            self.touched.push(key.to_owned());
        }
        Ok(())
    }

    async fn write(&self, client: &deadpool_postgres::Client) -> Result<(), Error> {
        let counters: Vec<&key_caps::Counter> = self
            .touched
            .iter()
            .filter_map(|k| self.counters.get(k))
            .collect();
        key_caps::write(client, &counters, self.reached.clone()).await
    }
}
