//! Creating jobs in one flight, group-committed: the submits that arrive while one is in
//! flight share the next transaction and its one commit.
//!
//! A flight is BEGIN, then each job's reservation (the ledger's one-statement charge) and its
//! insert, then COMMIT, all sent together on one connection: one round trip and one durable
//! commit however many jobs it holds, and no connection idle in a transaction between them.
//! A lone submit (none other in progress) sends a flight of one from its own task; under
//! concurrency they queue in one lane ([`crate::db::batch`]) and a drain sends them as one
//! flight. Jobs of one account in a flight take that account's row once and share one flush
//! (alone, one account's jobs were created one flush at a time on its row lock).
//!
//! The same guarantees as the transaction of [`super::create`]:
//! - each insert is a statement of its own after its reservation, so it counts (running
//!   slots, the queue cap) everything committed before the account's row was granted and
//!   everything earlier in the flight;
//! - the insert writes only when the job's charge is there: a reservation the plain charge
//!   refuses (a short balance, keys with spend limits, no account) writes nothing and its job
//!   nothing, and that job's caller takes the transaction path, which says why;
//! - a full queue found after the reservation raises (`keymeter_refuse`, migration V19): only
//!   an error can still roll the reservation back once the COMMIT is on its way, and
//!   PostgreSQL answers the COMMIT of a failed transaction with a ROLLBACK;
//! - accounts are locked in id order (the flight is sorted by account), the order the charge
//!   batches and the finish lane take them in.
//!
//! One account cannot stall the others' creations: when a statement of a flight fails (its
//! queue was full), that job and the rest of its account's jobs in the flight are set aside
//! and the others go again as one flight at once — one extra flight per refusing account,
//! whatever it sends. The jobs set aside are then made one by one, each its own flight so
//! each gets its exact answer, in a task of their own: the lane goes on with the next batch
//! meanwhile.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use deadpool_postgres::Pool;
use futures_util::future::{maybe_done, MaybeDone};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_postgres::Row;

use super::enqueue::{created, refusal, InsertArgs, INSERT};
use super::{Claimed, Job, NewJob, QueueError, StartHere};
use crate::credits::ledger::{self, Movement};
use crate::db::batch::{Batcher, InProgress};

/// The most jobs in one flight (two statements each); the rest wait for the next one.
const MAX_BATCH: usize = 64;

/// What a creation answers: the job and, when it was started here, its claim; `None` when
/// the plain reservation did not apply and nothing was written.
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

    /// Reserves the cost of `new` and inserts it (started here when `start` is given and its
    /// account has a free running slot), in a flight shared with the creations in progress.
    /// `Ok(None)`: the plain reservation did not apply and nothing was written; the caller
    /// creates the job in a transaction of its own ([`super::create`]), which charges through
    /// the key's spend limit or says why not. Only for a job with a cost: a free job reserves
    /// nothing for its insert to find.
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
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            new,
            max_queued,
            start,
            reply,
        };
        if entered.alone {
            // Nothing else in progress: nothing to share a commit with, and the hop to the
            // drain task and back would only add latency. A flight of one from the request's
            // own task (its messages all leave at the flight's first poll, so even a request
            // that hangs up leaves the flight whole: committed or rolled back).
            create_all(db, vec![pending]).await;
        } else {
            self.lane.push(pending, |lane| drain(lane, db.clone()));
        }
        answer
            .await
            .map_err(|_| QueueError::Invariant("the create lane dropped a request"))?
    }
}

async fn drain(lane: Arc<Batcher<Pending>>, db: Pool) {
    while let Some(batch) = lane.next_batch(MAX_BATCH) {
        create_all(&db, batch).await;
    }
}

/// Creates every job of `batch` and answers each: as one flight, less the jobs set aside
/// after a failed flight, which then go one flight each in a task of their own (see the
/// module's doc).
async fn create_all(db: &Pool, batch: Vec<Pending>) {
    let set_aside = fly(db, batch).await;
    if set_aside.is_empty() {
        return;
    }
    let db = db.clone();
    tokio::spawn(async move {
        for p in set_aside {
            // A flight of one answers its job whatever happens: nothing is set aside again.
            fly(&db, vec![p]).await;
        }
    });
}

/// Sends `batch` as one flight until it commits or fails as a whole, answering its jobs;
/// returns the jobs set aside because their statement made a flight of several fail.
async fn fly(db: &Pool, mut batch: Vec<Pending>) -> Vec<Pending> {
    // Accounts in id order (the order every batch locks them in); stable, so one account's
    // jobs keep their order of arrival.
    batch.sort_by_key(|p| p.new.account_id);
    let mut set_aside = Vec::new();
    while !batch.is_empty() {
        match flight(db, &batch).await {
            Ok(Flown::Committed(outcomes)) => {
                for (p, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = p.reply.send(outcome);
                }
            }
            // Alone, its failure is its answer, as the transaction would have given it.
            Ok(Flown::Failed { error, .. }) if batch.len() == 1 => {
                if let Some(p) = batch.pop() {
                    let _ = p.reply.send(Err(error));
                }
            }
            // Nothing of the flight was written. The first failing statement's job and the
            // rest of its account's (the batch is sorted by account: they follow it) wait for
            // flights of their own; the others go again now.
            Ok(Flown::Failed { at, .. }) => {
                // `at` indexes `batch` (the flight enumerated it; bounded anyway, so at
                // least one job leaves and the loop ends).
                let at = at.min(batch.len() - 1);
                let account = batch.get(at).map(|p| p.new.account_id);
                while at < batch.len() && batch.get(at).map(|p| p.new.account_id) == account {
                    set_aside.push(batch.remove(at));
                }
            }
            Err(e) => {
                // The flight itself failed (the connection, the COMMIT): whether it committed
                // is unknown, so no job of it may be made again.
                if batch.len() > 1 {
                    tracing::warn!(error = %e, jobs = batch.len(), "batched job creation failed");
                }
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(each(&e)));
                }
            }
        }
    }
    set_aside
}

/// A flight's own failure, as the answer of each of its jobs: unavailable stays unavailable
/// (the client may retry: a 503), anything else is reported as what it was.
fn each(e: &QueueError) -> QueueError {
    QueueError::Db(match e {
        QueueError::Db(crate::db::Error::Unavailable(m)) => {
            crate::db::Error::Unavailable(m.clone())
        }
        other => crate::db::Error::Other(anyhow::anyhow!("job creation failed: {other}")),
    })
}

/// Ends whatever a failed flight left open before the connection goes back to the pool; a
/// connection that cannot even do that is discarded.
async fn end_transaction(client: deadpool_postgres::Client) {
    if client.batch_execute("ROLLBACK").await.is_err() {
        drop(deadpool_postgres::Object::take(client));
    }
}

/// How a flight ended.
enum Flown {
    /// Committed: each job's own outcome, in the batch's order.
    Committed(Vec<Result<Created, QueueError>>),
    /// A statement failed, so the COMMIT rolled everything back: the job of the first failing
    /// statement (by its index) and that statement's error.
    Failed { at: usize, error: QueueError },
}

/// `batch` as one flight: BEGIN, each job's reservation and insert, COMMIT.
async fn flight(db: &Pool, batch: &[Pending]) -> Result<Flown, QueueError> {
    let client = db.get().await?;
    let outcome = flight_on(&client, batch).await;
    if !matches!(outcome, Ok(Flown::Committed(_))) {
        end_transaction(client).await;
    }
    outcome
}

async fn flight_on(
    client: &deadpool_postgres::Client,
    batch: &[Pending],
) -> Result<Flown, QueueError> {
    // Prepared (once per connection) before the flight: a prepare inside it would be a round
    // trip of its own, and its statement would be sent after the COMMIT.
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
    let mut failed = None;
    for (i, p) in batch.iter().enumerate() {
        let (Some(Step::Reserved(reserved)), Some(Step::Inserted(row))) =
            (steps.next(), steps.next())
        else {
            return Err(QueueError::Invariant("a create flight lost a statement"));
        };
        if failed.is_none() {
            // The first failing statement is the cause; every later one only failed because
            // the transaction already had.
            match (reserved, row) {
                (Err(e), _) => failed = Some((i, QueueError::from(e))),
                (Ok(_), Err(e)) => failed = Some((i, refusal(e, p.max_queued))),
                (Ok(reserved), Ok(row)) => pairs.push((reserved, row)),
            }
        }
    }
    let Some(Step::Control(commit)) = steps.next() else {
        return Err(QueueError::Invariant("a create flight lost its COMMIT"));
    };
    commit?;
    if let Some((at, error)) = failed {
        // PostgreSQL answered the COMMIT of a failed transaction with a ROLLBACK.
        return Ok(Flown::Failed { at, error });
    }
    let outcomes = batch
        .iter()
        .zip(pairs)
        .map(|(p, (reserved, row))| match (reserved, row) {
            (Some(charge), Some(row)) => {
                ledger::counted(charge);
                Ok(Some(created(&p.new, &row)))
            }
            (None, None) => Ok(None),
            // The insert's condition is the reservation's row: one without the other cannot be.
            _ => Err(QueueError::Invariant(
                "a job's reservation and its insert disagreed",
            )),
        })
        .collect();
    Ok(Flown::Committed(outcomes))
}

/// The answer of one statement of a flight.
enum Step {
    Control(Result<(), tokio_postgres::Error>),
    Reserved(Result<Option<Movement>, crate::credits::Error>),
    Inserted(Result<Option<Row>, tokio_postgres::Error>),
}

type StepFuture<'a> = Pin<Box<dyn Future<Output = Step> + Send + 'a>>;

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
