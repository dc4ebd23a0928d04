//! Fair, bounded, at-least-once delivery of outbox rows to URLs the customers chose: the one
//! sender loop behind job webhooks (`jobs::webhooks`, table `job_webhooks`) and account
//! events (`events::delivery`, table `event_deliveries`).
//!
//! Why one loop for both: the guarantees are the same and they are subtle, so they live in
//! one place.
//!
//! - **One account's receiver cannot delay another's.** A customer controls its endpoint, and
//!   one that accepts and never answers holds a delivery for the whole timeout. So rows are
//!   claimed fairly — round robin over the accounts with due rows, at most one per account
//!   and per destination origin in each pass ([`claim_sql`]), none for an account or an origin
//!   already at its in-flight limit on this instance — and each delivery runs on its own
//!   task and records its outcome when it ends, so a slow endpoint holds only its own slots.
//! - **Bounded memory whatever an account queues**: only what is in flight is counted here
//!   (at most `max_in_flight`); the backlog stays in PostgreSQL.
//! - **One sender per attempt across instances**: the claim takes rows `FOR UPDATE SKIP
//!   LOCKED` and pushes their next attempt out by a lease longer than a request can take,
//!   counting the attempt; each outbox writes its outcome fenced by that count.
//! - **A stopping instance hands its claims back** (the attempt uncounted, due at once), so
//!   another instance sends them without waiting for the lease to run out.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Client, Pool};
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// How much one instance sends at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deliveries in flight on this instance, all accounts together.
    pub max_in_flight: usize,
    /// Deliveries in flight on this instance for one account.
    pub per_account: usize,
    /// Deliveries in flight on this instance to one origin (scheme, host, port).
    pub per_destination: usize,
    /// The longest sleep between two looks at the table when nothing wakes the loop.
    pub poll: Duration,
    /// How long a claim keeps other instances off a row (longer than a request can take).
    pub lease: Duration,
}

/// One outbox table: how its rows are claimed, sent and recorded.
pub trait Outbox: Send + Sync + 'static {
    /// A claimed row: what to send and the attempt number that fences its outcome.
    type Item: Send + Sync + 'static;
    /// What came of one attempt.
    type Outcome: Send + 'static;

    /// The claim statement, built once with [`claim_sql`].
    fn claim_sql(&self) -> &str;
    /// A row the claim returned.
    fn item(&self, row: &Row) -> Self::Item;
    fn account_id(item: &Self::Item) -> Uuid;
    fn origin(item: &Self::Item) -> &str;
    /// One attempt at sending `item`.
    fn send(&self, item: &Self::Item) -> impl Future<Output = Self::Outcome> + Send;
    /// Writes what came of an attempt, fenced by its attempt number; `None`: the instance is
    /// stopping and hands the claim back.
    fn record(
        &self,
        db: &Pool,
        item: &Self::Item,
        outcome: Option<Self::Outcome>,
    ) -> impl Future<Output = Result<(), crate::db::Error>> + Send;
    /// What to log when recording failed (the lease runs out and the row is sent again).
    fn record_failed(item: &Self::Item, error: &crate::db::Error);
}

/// The fair claim of `table`, whose rows have the key `id`, `account_id`, `origin`,
/// `attempts`, `next_attempt_at`, `delivered_at` and `failed_at`, and an index on
/// (account_id, next_attempt_at) over the pending rows. Parameters: `$1` the account after
/// which the round robin goes on, `$2` how many accounts to scan, `$3` the busy accounts,
/// `$4` the busy origins, `$5` how many rows at most, `$6` the lease in seconds. `returning`
/// completes the UPDATE: the tables joined with `FROM picked p` (at least `p`), the join
/// conditions after `WHERE t.<id> = p.<id>`, and the RETURNING list (the row is `t`).
///
/// The accounts are found by a skip scan over the pending-by-account index — one probe per
/// account, however many rows it queued — so the cost of a pass does not grow with one
/// account's backlog.
pub fn claim_sql(table: &str, id: &str, from: &str, returning: &str) -> String {
    let pending = |t: &str| {
        format!("{t}delivered_at IS NULL AND {t}failed_at IS NULL AND {t}next_attempt_at <= now()")
    };
    let (pending, pending_t) = (pending(""), pending("t."));
    format!(
        "WITH RECURSIVE accts(account_id, n) AS (
             (SELECT account_id, 1::bigint FROM {table}
               WHERE {pending} AND account_id > $1
               ORDER BY account_id LIMIT 1)
           UNION ALL
             SELECT (SELECT t.account_id FROM {table} t
                      WHERE {pending_t} AND t.account_id > accts.account_id
                      ORDER BY t.account_id LIMIT 1),
                    accts.n + 1
               FROM accts
              WHERE accts.account_id IS NOT NULL AND accts.n < $2
         ),
         candidates AS (
             SELECT c.{id}, c.origin, c.next_attempt_at, a.n
               FROM accts a
              CROSS JOIN LATERAL (
                  SELECT t.{id}, t.origin, t.next_attempt_at FROM {table} t
                   WHERE t.account_id = a.account_id AND {pending_t}
                     AND t.origin <> ALL($4)
                   ORDER BY t.account_id, t.next_attempt_at
                   LIMIT 1
                   FOR UPDATE SKIP LOCKED
              ) c
              WHERE a.account_id IS NOT NULL AND a.account_id <> ALL($3)
         ),
         picked AS (
             SELECT {id} FROM (
                 SELECT DISTINCT ON (origin) {id}, n FROM candidates
                  ORDER BY origin, next_attempt_at
             ) one_per_origin
             ORDER BY n
             LIMIT $5
         )
         UPDATE {table} t
            SET attempts = t.attempts + 1,
                next_attempt_at = now() + make_interval(secs => $6)
           FROM {from}
          WHERE t.{id} = p.{id} {returning}"
    )
}

/// The hand-back of a claim by a stopping instance, for `table` keyed by `id`: `$1` the key,
/// `$2` the attempt claimed.
pub fn hand_back_sql(table: &str, id: &str) -> String {
    format!(
        "UPDATE {table} SET attempts = attempts - 1, next_attempt_at = now()
          WHERE {id} = $1 AND attempts = $2 AND delivered_at IS NULL AND failed_at IS NULL"
    )
}

/// Sends due rows of `outbox` until `stop`: claims a fair share whenever a slot is free, runs
/// each delivery on its own task and records each outcome as soon as it is known — no
/// delivery ever waits for another one. `wake` (a NOTIFY of new rows) shortens the sleep.
pub async fn run<O: Outbox>(
    outbox: Arc<O>,
    limits: Limits,
    db: Pool,
    stop: CancellationToken,
    wake: Option<Arc<tokio::sync::Notify>>,
    what: &'static str,
) {
    let in_flight = Arc::new(InFlight::default());
    let tasks = TaskTracker::new();
    let mut cursor = Uuid::nil();
    let wake = wake.unwrap_or_default();
    loop {
        if stop.is_cancelled() {
            break;
        }
        let free = limits.max_in_flight.saturating_sub(in_flight.total());
        let claimed = if free == 0 {
            Vec::new()
        } else {
            match claim_fairly(&*outbox, &limits, &db, &in_flight, &mut cursor, free).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(error = %e, what, "claiming deliveries failed");
                    Vec::new()
                }
            }
        };
        let n = claimed.len();
        for item in claimed {
            let slot = in_flight.take(O::account_id(&item), O::origin(&item));
            let (outbox, db, stop) = (outbox.clone(), db.clone(), stop.clone());
            tasks.spawn(async move {
                deliver(&*outbox, &db, item, &stop).await;
                drop(slot);
            });
        }
        if n > 0 {
            // Each pass gives an account (and an origin) one more delivery at most; keep
            // going until everyone due is at a limit or served.
            continue;
        }
        // Nothing to claim now: wait for a slot to free up, new rows, or the poll.
        tokio::select! {
            () = in_flight.freed.notified() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(limits.poll) => {}
            () = stop.cancelled() => break,
        }
    }
    // Deliveries still in flight hand their claims back (see `deliver`).
    tasks.close();
    tasks.wait().await;
}

/// Sends one claimed row and records what came of it; cancelled, hands the claim back.
async fn deliver<O: Outbox>(outbox: &O, db: &Pool, item: O::Item, stop: &CancellationToken) {
    let outcome = tokio::select! {
        outcome = outbox.send(&item) => Some(outcome),
        () = stop.cancelled() => None,
    };
    if let Err(e) = outbox.record(db, &item, outcome).await {
        O::record_failed(&item, &e);
    }
}

/// One pass of the round robin: from the account after `cursor` on (wrapping around once),
/// at most one due row per account and per origin, none for an account or an origin already
/// at its limit, `free` at most.
async fn claim_fairly<O: Outbox>(
    outbox: &O,
    limits: &Limits,
    db: &Pool,
    in_flight: &InFlight,
    cursor: &mut Uuid,
    free: usize,
) -> Result<Vec<O::Item>, crate::db::Error> {
    let client = db.get().await?;
    let (busy_accounts, busy_origins) = in_flight.busy(limits.per_account, limits.per_destination);
    let busy = (&busy_accounts[..], &busy_origins[..]);
    let mut claimed = claim_after(outbox, limits, &client, *cursor, free, busy).await?;
    if claimed.len() < free && !cursor.is_nil() {
        // Wrap around: the accounts before the cursor get their turn too. One this pass
        // already served may get a second row — never beyond its limit, which the next pass
        // enforces again.
        let more = claim_after(
            outbox,
            limits,
            &client,
            Uuid::nil(),
            free - claimed.len(),
            busy,
        )
        .await?;
        *cursor = Uuid::nil();
        claimed.extend(more);
    }
    if let Some(last) = claimed.iter().map(O::account_id).max() {
        *cursor = (*cursor).max(last);
    }
    Ok(claimed)
}

async fn claim_after<O: Outbox>(
    outbox: &O,
    limits: &Limits,
    client: &Client,
    after: Uuid,
    limit: usize,
    (busy_accounts, busy_origins): (&[Uuid], &[String]),
) -> Result<Vec<O::Item>, crate::db::Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let scan = limit.saturating_add(i64::try_from(busy_accounts.len()).unwrap_or(0));
    let lease = limits.lease.as_secs_f64();
    let statement = client.prepare_cached(outbox.claim_sql()).await?;
    let rows = client
        .query(
            &statement,
            &[&after, &scan, &busy_accounts, &busy_origins, &limit, &lease],
        )
        .await?;
    Ok(rows.iter().map(|row| outbox.item(row)).collect())
}

/// What this instance has in flight, per account and per origin: the claim skips whatever is
/// at its limit. Only deliveries in flight are counted, so the maps stay as small as the
/// in-flight bound whatever the accounts queue. A `std` mutex: the critical sections are a
/// few map operations and never await.
#[derive(Default)]
struct InFlight {
    counts: Mutex<Counts>,
    /// Signalled whenever a delivery ends and frees a slot.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct Counts {
    total: usize,
    accounts: HashMap<Uuid, usize>,
    origins: HashMap<String, usize>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn total(&self) -> usize {
        self.lock().total
    }

    /// The accounts and origins at their limits.
    fn busy(&self, per_account: usize, per_origin: usize) -> (Vec<Uuid>, Vec<String>) {
        let c = self.lock();
        (
            c.accounts
                .iter()
                .filter(|(_, n)| **n >= per_account)
                .map(|(a, _)| *a)
                .collect(),
            c.origins
                .iter()
                .filter(|(_, n)| **n >= per_origin)
                .map(|(o, _)| o.clone())
                .collect(),
        )
    }

    /// Counts a delivery in flight until the returned slot is dropped (even if its task
    /// panics).
    fn take(self: &Arc<Self>, account_id: Uuid, origin: &str) -> Slot {
        let mut c = self.lock();
        c.total += 1;
        *c.accounts.entry(account_id).or_default() += 1;
        *c.origins.entry(origin.to_owned()).or_default() += 1;
        Slot {
            in_flight: self.clone(),
            account_id,
            origin: origin.to_owned(),
        }
    }
}

struct Slot {
    in_flight: Arc<InFlight>,
    account_id: Uuid,
    origin: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut c = self.in_flight.lock();
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.accounts.get_mut(&self.account_id) {
                *n -= 1;
                if *n == 0 {
                    c.accounts.remove(&self.account_id);
                }
            }
            if let Some(n) = c.origins.get_mut(&self.origin) {
                *n -= 1;
                if *n == 0 {
                    c.origins.remove(&self.origin);
                }
            }
        }
        self.in_flight.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_origins_are_busy_at_their_limits_and_free_again_when_a_slot_ends() {
        let in_flight = Arc::new(InFlight::default());
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let first = in_flight.take(a, "http://slow.example");
        let _second = in_flight.take(a, "http://slow.example");
        let other = in_flight.take(b, "https://fast.example");
        assert_eq!(in_flight.total(), 3);
        let (accounts, origins) = in_flight.busy(2, 2);
        assert_eq!(accounts, vec![a]);
        assert_eq!(origins, vec!["http://slow.example".to_owned()]);
        drop(first);
        assert_eq!(in_flight.total(), 2);
        assert_eq!(in_flight.busy(2, 2), (vec![], vec![]));
        // Only what is in flight is remembered: the maps shrink back with it.
        drop(other);
        assert!(!in_flight.lock().accounts.contains_key(&b));
        assert!(!in_flight
            .lock()
            .origins
            .contains_key("https://fast.example"));
    }
}
