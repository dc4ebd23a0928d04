//! Group commit for creating jobs: the submits that arrive while one is in flight share the
//! next transaction and its one commit.
//!
//! A job made alone ([`create_at_once`]) is one round trip and one durable commit, and it
//! holds its account's row from its reservation to its commit — the WAL flush included — so
//! one account's jobs were created one flush at a time. Here a batch is one flight on one
//! connection: BEGIN, then each job's reservation and insert (the same two prepared
//! statements as alone, in the same order), then COMMIT, all sent together. Jobs of one
//! account in a batch take that account's row once and share one flush.
//!
//! The same guarantees as alone: each insert is a statement of its own after its
//! reservation, so it counts (running slots, the queue cap) everything committed before the
//! account's row was granted and everything earlier in the batch; a reservation the plain
//! charge refuses writes nothing and its insert nothing (that job's caller takes the
//! transaction path, as alone). Accounts are locked in id order (the batch is sorted by
//! account), the order the charge batches and the finish lane take them in.
//!
//! One job cannot poison the others: a batch in which any statement failed — a full queue
//! raises (`keymeter_refuse`) — was rolled back whole by its COMMIT, and each of its jobs is
//! then made alone, with its own outcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use deadpool_postgres::Pool;
use futures_util::future::{maybe_done, MaybeDone};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_postgres::Row;

use super::enqueue::{create_at_once, created, refusal, InsertArgs, INSERT};
use super::{Claimed, Job, NewJob, QueueError, StartHere};
use crate::credits::ledger::{self, Movement};
use crate::db::batch::{Batcher, InProgress};

/// The most jobs in one transaction (two statements each); the rest wait for the next one.
const MAX_BATCH: usize = 64;

/// What a creation answers: see [`create_at_once`].
type Created = Option<(Job, Option<Claimed>)>;

struct Pending {
    new: NewJob,
    max_queued: i64,
    start: Option<StartHere>,
    reply: oneshot::Sender<Result<Created, QueueError>>,
}

/// The lane the submits of one instance share.
pub struct Creator {
    lane: Arc<Batcher<Pending>>,
    /// Creations in progress, alone or in the lane.
    busy: InProgress,
}

impl Creator {
    /// `runtime`: the service's runtime, where the batches run (see `db::batch`).
    pub fn new(runtime: Handle) -> Self {
        Self {
            lane: Arc::new(Batcher::new(runtime)),
            busy: InProgress::default(),
        }
    }

    /// [`create_at_once`], group-committed with the creations that arrive meanwhile (alone,
    /// in the caller's task, when no other is in progress). The same answer: the job and its claim once committed, `Ok(None)` when the plain
    /// reservation did not apply (nothing was written), or the refusal.
    pub async fn create(
        &self,
        db: &Pool,
        new: NewJob,
        max_queued: i64,
        start: Option<StartHere>,
    ) -> Result<Created, QueueError> {
        if new.cost <= 0 {
            return Err(QueueError::Invariant(
                "the create lane is for jobs with a cost",
            ));
        }
        let entered = self.busy.enter();
        if entered.alone {
            // Nothing else in progress: nothing to share a commit with, and the lane's hop to
            // its drain task would only add latency. One flight, from the request's own task
            // (its messages all leave at its first poll, so even a request that hangs up
            // leaves the flight whole: committed or rolled back).
            let client = db.get().await?;
            let outcome = create_at_once(&client, &new, max_queued, start).await;
            if outcome.is_err() {
                end_transaction(client).await;
            }
            return outcome;
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            new,
            max_queued,
            start,
            reply,
        };
        self.lane.push(pending, |lane| drain(lane, db.clone()));
        answer
            .await
            .map_err(|_| QueueError::Invariant("the create lane dropped a request"))?
    }
}

async fn drain(lane: Arc<Batcher<Pending>>, db: Pool) {
    while let Some(mut batch) = lane.next_batch(MAX_BATCH) {
        if batch.len() == 1 {
            // Alone: the same one flight, nothing to share.
            for p in batch {
                let outcome = alone(&db, &p).await;
                let _ = p.reply.send(outcome);
            }
            continue;
        }
        // Accounts in id order (the order every batch locks them in); stable, so one
        // account's jobs keep their order of arrival.
        batch.sort_by_key(|p| p.new.account_id);
        match flush(&db, &batch).await {
            Ok(Flushed::Committed(outcomes)) => {
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = p.reply.send(outcome);
                }
            }
            Ok(Flushed::RolledBack) => {
                // A job of the batch was refused (its queue was full): nothing of the batch
                // was written. Each job alone, so only that one is refused.
                for p in batch {
                    let outcome = alone(&db, &p).await;
                    let _ = p.reply.send(outcome);
                }
            }
            Err(e) => {
                // The flight itself failed (the connection, the COMMIT): whether it committed
                // is unknown, so no job of it may be made again.
                tracing::warn!(error = %e, jobs = batch.len(), "batched job creation failed");
                let detail = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(QueueError::Db(crate::db::Error::Other(
                        anyhow::anyhow!("batched job creation failed: {detail}"),
                    ))));
                }
            }
        }
    }
}

/// One job in its own flight ([`create_at_once`]).
async fn alone(db: &Pool, p: &Pending) -> Result<Created, QueueError> {
    let client = db.get().await?;
    let outcome = create_at_once(&client, &p.new, p.max_queued, p.start).await;
    if outcome.is_err() {
        end_transaction(client).await;
    }
    outcome
}

/// Ends whatever a failed flight left open before the connection goes back to the pool; a
/// connection that cannot even do that is discarded.
pub(super) async fn end_transaction(client: deadpool_postgres::Client) {
    if client.batch_execute("ROLLBACK").await.is_err() {
        drop(deadpool_postgres::Object::take(client));
    }
}

/// How a batch's flight ended.
enum Flushed {
    /// Committed: each job's own outcome, in the batch's order.
    Committed(Vec<Result<Created, QueueError>>),
    /// A statement failed, so the COMMIT rolled everything back.
    RolledBack,
}

/// The answer of one statement of a flight.
enum Step {
    Control(Result<(), tokio_postgres::Error>),
    Reserved(Result<Option<Movement>, crate::credits::Error>),
    Inserted(Result<Option<Row>, tokio_postgres::Error>),
}

type StepFuture<'a> = Pin<Box<dyn Future<Output = Step> + Send + 'a>>;

/// The batch as one flight: BEGIN, each job's reservation and insert, COMMIT.
async fn flush(db: &Pool, batch: &[Pending]) -> Result<Flushed, QueueError> {
    let client = db.get().await?;
    let outcome = flush_on(&client, batch).await;
    if outcome.is_err() {
        end_transaction(client).await;
    }
    outcome
}

async fn flush_on(
    client: &deadpool_postgres::Client,
    batch: &[Pending],
) -> Result<Flushed, QueueError> {
    // Prepared (once per connection) before the flight, as alone.
    let reserve = ledger::prepare_reserve(client).await?;
    let insert = client.prepare_cached(&INSERT).await?;
    let args: Vec<InsertArgs> = batch
        .iter()
        .map(|p| InsertArgs::new(&p.new, p.max_queued, p.start))
        .collect();
    let params: Vec<_> = batch
        .iter()
        .zip(&args)
        .map(|(p, a)| a.params(&p.new))
        .collect();
    let mut flight: Vec<StepFuture<'_>> = Vec::with_capacity(batch.len() * 2 + 2);
    flight.push(Box::pin(async {
        Step::Control(client.batch_execute("BEGIN").await)
    }));
    for (p, params) in batch.iter().zip(&params) {
        let (reserve, insert) = (&reserve, &insert);
        flight.push(Box::pin(async move {
            Step::Reserved(
                ledger::reserve_prepared(
                    client,
                    reserve,
                    p.new.account_id,
                    p.new.cost,
                    p.new.id,
                    p.new.key_id.as_deref(),
                )
                .await,
            )
        }));
        flight.push(Box::pin(async move {
            Step::Inserted(client.query_opt(insert, params).await)
        }));
    }
    flight.push(Box::pin(async {
        Step::Control(client.batch_execute("COMMIT").await)
    }));
    let mut steps = in_order(flight).await.into_iter();

    let Some(Step::Control(begin)) = steps.next() else {
        return Err(QueueError::Invariant("a create flight lost its BEGIN"));
    };
    begin?;
    let mut pairs = Vec::with_capacity(batch.len());
    let mut failed = false;
    for p in batch {
        let (Some(Step::Reserved(reserved)), Some(Step::Inserted(row))) =
            (steps.next(), steps.next())
        else {
            return Err(QueueError::Invariant("a create flight lost a statement"));
        };
        failed |= reserved.is_err() || row.is_err();
        pairs.push((p, reserved, row));
    }
    let Some(Step::Control(commit)) = steps.next() else {
        return Err(QueueError::Invariant("a create flight lost its COMMIT"));
    };
    commit?;
    if failed {
        // PostgreSQL answered the COMMIT of a failed transaction with a ROLLBACK.
        return Ok(Flushed::RolledBack);
    }
    let outcomes = pairs
        .into_iter()
        .map(|(p, reserved, row)| {
            let reserved = reserved?;
            let row = row.map_err(|e| refusal(e, p.max_queued))?;
            match (reserved, row) {
                (Some(charge), Some(row)) => {
                    ledger::counted(charge);
                    Ok(Some(created(&p.new, &row)))
                }
                (None, None) => Ok(None),
                _ => Err(QueueError::Invariant(
                    "a job's reservation and its insert disagreed",
                )),
            }
        })
        .collect();
    Ok(Flushed::Committed(outcomes))
}

/// Runs `futures` to their ends, each polled for the first time in order: a future of
/// tokio-postgres sends its message when first polled, so the statements of a flight on one
/// connection leave in this order (which `join_all` does not promise for many futures).
async fn in_order<'a>(futures: Vec<StepFuture<'a>>) -> Vec<Step> {
    let mut slots: Vec<MaybeDone<StepFuture<'a>>> = futures.into_iter().map(maybe_done).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for slot in slots.iter_mut() {
            done &= Pin::new(slot).poll(cx).is_ready();
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    slots
        .iter_mut()
        .filter_map(|slot| Pin::new(slot).take_output())
        .collect()
}
