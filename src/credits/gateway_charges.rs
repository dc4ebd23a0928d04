//! Gateway charges: what a proxied call's charge (gateway mode, `GET /v1/authz`) needs on
//! top of an ordinary charge, and its refund. This module owns `gateway_charges`.
//!
//! A gateway charge *is* an ordinary charge: it goes through the same lane
//! (`coalesce`) and the same one-statement charge (`ledger::charge`), so it records its key,
//! counts against the key's spend limit (`key_caps`), spends expiring credits first
//! (`grants`), fires the low-balance events (`alerts`) and arms the auto-recharge
//! (`recharge_signal`) exactly as the API's charges do — there is one place where a charge
//! is decided. Gateway mode once had a lane of its own, a near-copy of the credits lane that
//! had to learn every credit control twice and had learned only some; it is gone. What a
//! gateway charge adds are the fragments below, which those two writers put in their own
//! statements when a charge carries a [`GatewayTag`]:
//!
//! - a `gateway_charges` row in the same transaction as the ledger row, so the upstream can
//!   refund the call at most once ([`refund`]);
//! - a check that the proxy's `X-Request-Id` was not charged already, so a proxy retrying
//!   the authorization (possibly on another instance) charges once.
//!
//! Why the request-id check is exact: every writer of a gateway charge for an account holds
//! that account's row lock when it writes (the batch locks first, then looks the request ids
//! up in a later statement; the lone statement's UPDATE locks), so a lookup made after taking
//! the lock sees every charge committed before, and none can commit until this transaction
//! ends. The unique index on (account, request id) is the backstop that turns the one
//! remaining race — the lone statement's snapshot predating a concurrent commit — into a
//! replay rather than a second charge.
//!
//! The rows are kept only as long as they can matter (refunds, replays): [`purge`].

use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Error, Kind};

/// What makes a charge a gateway charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTag {
    /// The priced route, as the routes file names it (`GET /v1/search/*`).
    pub route: String,
    /// The proxy's `X-Request-Id`, when it sent a usable one: charged at most once.
    pub request_id: Option<String>,
}

impl GatewayTag {
    /// The ledger row's reason for a charge of this route.
    pub fn reason(&self) -> String {
        format!("gateway {}", self.route)
    }
}

/// The unique index that makes a request id chargeable once per account.
pub const ONE_PER_REQUEST: &str = "gateway_charges_one_per_request";

/// For the one-statement charge's UPDATE (`$1` the account, `$9` the request id): no earlier
/// charge of this request id. A replay then locks nothing and writes nothing.
pub const NOT_CHARGED_YET: &str = "($9::text IS NULL OR NOT EXISTS (
         SELECT 1 FROM gateway_charges WHERE account_id = $1 AND request_id = $9))";

/// A CTE for the one-statement charge, after `ins` (the ledger row): its `gateway_charges`
/// row (`$1` account, `$2` cost, `$8` route, `$9` request id).
pub const RECORD_ONE: &str = "gw AS (
         INSERT INTO gateway_charges (ledger_id, account_id, request_id, route, amount)
         SELECT id, $1, $9, $8, $2 FROM ins)";

/// A select-list expression over `accounts` (`$1` the account, `$2` a request id or NULL):
/// the ledger id of the earlier charge of that request id.
pub const PRIOR_ONE: &str = "(SELECT g.ledger_id FROM gateway_charges g
          WHERE $2::text IS NOT NULL AND g.account_id = $1 AND g.request_id = $2)";

/// The earlier charges of a batch's request ids (`$1` accounts, `$2` request ids, paired).
/// Run after the batch's account locks are held (see the module comment).
pub const PRIOR_MANY: &str = "SELECT g.account_id, g.request_id, g.ledger_id
       FROM gateway_charges g
       JOIN unnest($1::uuid[], $2::text[]) AS k(a, r) ON g.account_id = k.a AND g.request_id = k.r";

/// A CTE for the batch's write, after `led` (its ledger rows, inserted in the order of the
/// accepted charges): the `gateway_charges` rows of the batch's gateway charges. `$13` holds
/// each one's position among the accepted charges (1-based), `$14` its route, `$15` its
/// request id. Ledger ids follow insertion order (as the batch relies on to answer each
/// request), so numbering `led` by id pairs every row with its charge without drawing the
/// ids in another statement.
pub const RECORD_MANY: &str = "gw AS (
         INSERT INTO gateway_charges (ledger_id, account_id, request_id, route, amount)
         SELECT l.id, l.account_id, g.q, g.r, -l.delta
           FROM (SELECT id, account_id, delta, row_number() OVER (ORDER BY id) AS n FROM led) l
           JOIN unnest($13::bigint[], $14::text[], $15::text[]) AS g(n, r, q) ON g.n = l.n)";

/// The columns a batch's write carries for its gateway charges (see [`RECORD_MANY`]).
#[derive(Default)]
pub struct BatchRecords {
    pub positions: Vec<i64>,
    pub routes: Vec<String>,
    pub request_ids: Vec<Option<String>>,
}

impl BatchRecords {
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// A refunded gateway charge.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    /// The key whose call was charged (recorded on the refund's ledger row too).
    pub key_id: Option<String>,
}

/// What a refund did.
#[derive(Debug)]
pub enum Refund {
    Done(Refunded),
    /// Refunded before, by this refund (its ledger id).
    Already {
        refund_id: i64,
    },
    /// No gateway charge has that id (or it is past the retention window).
    NotFound,
}

/// The refund, in one statement: the `gateway_charges` row locked first orders concurrent
/// refunds (the second finds `refund_id` set), then the account's row; the refund's ledger
/// row names the charge's key, like a job's refund.
const REFUND: &str = "
    WITH g AS (
        SELECT g.ledger_id, g.account_id, g.amount, c.key_id
          FROM gateway_charges g JOIN credit_ledger c ON c.id = g.ledger_id
         WHERE g.ledger_id = $1 AND g.refund_id IS NULL
           FOR UPDATE OF g),
    acct AS (
        UPDATE accounts a
           SET credit_balance = a.credit_balance + g.amount,
               clawback_debt = (a.credit_balance + g.amount) < 0
          FROM g WHERE a.id = g.account_id
     RETURNING a.id, a.credit_balance, g.amount, g.key_id),
    led AS (
        INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, key_id)
        SELECT id, amount, credit_balance, 'refund', $2, key_id FROM acct
     RETURNING id, account_id, delta, balance_after, key_id),
    mark AS (
        UPDATE gateway_charges SET refund_id = led.id FROM led WHERE ledger_id = $1)
    SELECT id, account_id, delta, balance_after, key_id FROM led";

/// Gives a gateway charge back, at most once whatever retries or instances do, and gives
/// its credits back to its key's spend counter as a job's refund does (`key_caps`). One
/// transaction: the refund, then the counter (accounts before counters, as every writer).
pub async fn refund(db: &Pool, charge_id: i64) -> Result<Refund, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let reason = format!("gateway refund of charge {charge_id}");
    if let Some(row) = tx.query_opt(REFUND, &[&charge_id, &reason]).await? {
        let key_id: Option<String> = row.get(4);
        if key_id.is_some() {
            super::key_caps::give_back_charge(&tx, charge_id).await?;
        }
        tx.commit().await?;
        let amount: i64 = row.get(2);
        crate::metrics::credits_moved(Kind::Refund, amount);
        return Ok(Refund::Done(Refunded {
            object: "gateway_refund",
            charge: charge_id,
            refund: row.get(0),
            account_id: row.get(1),
            amount,
            balance_after: row.get(3),
            key_id,
        }));
    }
    let row = tx
        .query_opt(
            "SELECT refund_id FROM gateway_charges WHERE ledger_id = $1",
            &[&charge_id],
        )
        .await?;
    tx.commit().await?;
    Ok(match row {
        None => Refund::NotFound,
        Some(r) => match r.get::<_, Option<i64>>(0) {
            Some(refund_id) => Refund::Already { refund_id },
            // Refunded by nobody yet the refund found nothing: the charge row is gone
            // between the two statements (purged); nothing to give back.
            None => Refund::NotFound,
        },
    })
}

/// How often each instance purges gateway charges past their retention.
pub const PURGE_EVERY: Duration = Duration::from_secs(600);
/// Rows per DELETE: a purge never holds many row locks (a refund may be waiting on one).
const PURGE_PAGE: i64 = 1000;

/// Deletes gateway charges older than `retention`, oldest first, a page at a time, until
/// a page holds a younger one. Returns how many went.
///
/// A `gateway_charges` row is needed only while its charge may be refunded or its request
/// id replayed; the money itself is its ledger row, which stays (so does the refund's). A
/// refund or a proxy's retry after the window finds nothing: `404 gateway_charge_not_found`,
/// or a new charge. The rows are walked by their primary key (ledger ids grow with time)
/// rather than by `created_at`, so the table needs no second index — which every gateway
/// charge would pay for on the hot path. Ids and times can disagree only among charges made
/// in the same few milliseconds, so a purge that stops at the first young row leaves at most
/// a handful of old ones for the next run.
pub async fn purge(db: &impl GenericClient, retention: Duration) -> Result<u64, Error> {
    let stmt = db
        .prepare_cached(
            "WITH page AS (SELECT ledger_id FROM gateway_charges ORDER BY ledger_id LIMIT $2)
             DELETE FROM gateway_charges g USING page
              WHERE g.ledger_id = page.ledger_id
                AND g.created_at < now() - make_interval(secs => $1)",
        )
        .await?;
    let mut total = 0;
    loop {
        let n = db
            .execute(&stmt, &[&retention.as_secs_f64(), &PURGE_PAGE])
            .await?;
        total += n;
        if n < PURGE_PAGE as u64 {
            return Ok(total);
        }
    }
}

/// Purges every `every` until cancelled (see [`purge`]).
pub async fn run_purge(db: Pool, retention: Duration, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let purged = match db.get().await {
            Ok(client) => purge(&client, retention).await,
            Err(e) => Err(Error::from(e)),
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged gateway charges past their retention"),
            Err(e) => tracing::warn!(error = %e, "purging gateway charges failed"),
        }
    }
}
