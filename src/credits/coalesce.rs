//! Group commit for charges to one hot account.
//!
//! Charges to one account serialize on its row lock, and each one-statement charge is its own
//! commit: a single busy account is capped by commits per second, not by CPU. Here, charges
//! for an account queue in a lane; one leader at a time drains the lane. A batch of one uses
//! the ordinary one-statement charge (no extra round trips when there is no contention); a
//! larger batch is one transaction — lock the row, decide each charge in arrival order
//! against the running balance, insert all ledger rows with one INSERT, write the balance
//! once, commit — and only then is every request in it answered. Each ledger row still
//! carries its own `balance_after`, so the ledger reads exactly as if the charges had been
//! made one by one; overspending is impossible because every decision is made under the lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::ledger::{self, movement, ChargeContext, Movement, Once, MOVEMENT_COLUMNS};
use crate::error::ApiError;

type Reply = oneshot::Sender<Result<Movement, ApiError>>;

struct Pending {
    cost: i64,
    reason: Option<String>,
    reply: Reply,
}

#[derive(Default)]
struct Lane {
    pending: Mutex<Vec<Pending>>,
    running: AtomicBool,
}

#[derive(Default)]
pub struct Coalescer {
    lanes: Mutex<HashMap<Uuid, Arc<Lane>>>,
}

impl Coalescer {
    fn lane(&self, account_id: Uuid) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.entry(account_id).or_default().clone()
    }

    /// Charges `cost`; answers after the charge has committed (or was refused).
    pub async fn charge(
        &self,
        db: &Pool,
        account_id: Uuid,
        cost: i64,
        reason: Option<String>,
    ) -> Result<Movement, ApiError> {
        let lane = self.lane(account_id);
        let (reply, answer) = oneshot::channel();
        lane.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending {
                cost,
                reason,
                reply,
            });
        if !lane.running.swap(true, Ordering::AcqRel) {
            // The drain runs in its own task: a client hanging up must not abandon the others.
            let db = db.clone();
            tokio::spawn(async move { drain(lane, db, account_id).await });
        }
        answer
            .await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("charge lane dropped a request")))?
    }

    /// Forgets idle lanes (called periodically) so the map does not grow with every account
    /// ever charged.
    pub fn housekeeping(&self) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.retain(|_, lane| {
            Arc::strong_count(lane) > 1
                || lane.running.load(Ordering::Acquire)
                || !lane.pending.lock().map(|p| p.is_empty()).unwrap_or(true)
        });
    }
}

async fn drain(lane: Arc<Lane>, db: Pool, account_id: Uuid) {
    loop {
        let batch: Vec<Pending> =
            std::mem::take(&mut *lane.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            lane.running.store(false, Ordering::Release);
            // A charge may have been queued between the take and the store: if so, and
            // nobody else picked it up, keep leading.
            let more = !lane.pending.lock().map(|p| p.is_empty()).unwrap_or(true);
            if more && !lane.running.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        }
        if batch.len() == 1 {
            let Some(p) = batch.into_iter().next() else {
                continue;
            };
            let ctx = ChargeContext {
                job_id: None,
                reason: p.reason.as_deref(),
                idempotency_key: None,
            };
            let result = async {
                let client = db.get().await?;
                match ledger::charge(&client, account_id, p.cost, &ctx).await? {
                    Once::Done(m) => Ok(m),
                    Once::AlreadyDone => Err(ApiError::Internal(anyhow::anyhow!(
                        "duplicate charge without a job"
                    ))),
                }
            }
            .await;
            let _ = p.reply.send(result);
            continue;
        }
        match flush(&db, account_id, &batch).await {
            Ok(outcomes) => {
                for (p, o) in batch.into_iter().zip(outcomes) {
                    let _ = p.reply.send(o);
                }
            }
            Err(e) => {
                // Nothing committed: every request in the batch gets the same failure.
                let status = actix_web::ResponseError::status_code(&e);
                for p in batch {
                    let err = if status == actix_web::http::StatusCode::SERVICE_UNAVAILABLE {
                        ApiError::DatabaseUnavailable
                    } else {
                        ApiError::Internal(anyhow::anyhow!("batched charge failed"))
                    };
                    let _ = p.reply.send(Err(err));
                }
                tracing::warn!(error = %e, "batched charge failed; nothing was written");
            }
        }
    }
}

/// One transaction for the whole batch; returns each request's outcome in order.
async fn flush(
    db: &Pool,
    account_id: Uuid,
    batch: &[Pending],
) -> Result<Vec<Result<Movement, ApiError>>, ApiError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    // Prepared once per connection: each statement is one round trip, not parse + execute.
    let lock = tx
        .prepare_cached("SELECT credit_balance FROM accounts WHERE id = $1 FOR UPDATE")
        .await?;
    let row = tx
        .query_opt(&lock, &[&account_id])
        .await?
        .ok_or_else(|| ApiError::NotFound("No account with that id.".into()))?;
    let mut balance: i64 = row.get(0);
    let (mut deltas, mut afters, mut reasons) =
        (Vec::new(), Vec::new(), Vec::<Option<String>>::new());
    let mut decisions = Vec::with_capacity(batch.len());
    for p in batch {
        if p.cost > 0 && balance >= p.cost {
            balance -= p.cost;
            deltas.push(-p.cost);
            afters.push(balance);
            reasons.push(p.reason.clone());
            decisions.push(None);
        } else {
            decisions.push(Some(ApiError::InsufficientCredits {
                balance,
                cost: p.cost,
            }));
        }
    }
    let mut rows = Vec::new();
    if !deltas.is_empty() {
        // The balance write and the ledger rows in one statement (one round trip).
        let write = tx
            .prepare_cached(&format!(
                "WITH acct AS (UPDATE accounts SET credit_balance = $5 WHERE id = $1)
                 INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason)
                 SELECT $1, u.d, u.b, 'charge', u.r
                   FROM unnest($2::bigint[], $3::bigint[], $4::text[]) WITH ORDINALITY AS u(d, b, r, n)
                  ORDER BY u.n
                 RETURNING {MOVEMENT_COLUMNS}"
            ))
            .await?;
        rows = tx
            .query(&write, &[&account_id, &deltas, &afters, &reasons, &balance])
            .await?;
    }
    tx.commit().await?;
    // Ledger ids follow insertion order; pair them back up with the accepted requests.
    let mut sorted: Vec<Movement> = rows.iter().map(|r| ledger::counted(movement(r))).collect();
    sorted.sort_by_key(|m| m.id);
    let mut accepted = sorted.into_iter();
    Ok(decisions
        .into_iter()
        .map(|d| match d {
            Some(refusal) => Err(refusal),
            None => accepted
                .next()
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("batched charge lost a row"))),
        })
        .collect())
}
