//! Group commit for the end of a job a worker ran.
//!
//! [`super::finalize`] is a transaction of five to seven round trips (BEGIN, the fenced
//! UPDATE, the refund, the re-read, the webhook row, the notification, COMMIT) and one commit
//! per job. Here, finishes that arrive while a batch is in flight queue in one lane (the
//! [`crate::db::batch`] lane the charges use) and go as one transaction in one or two round
//! trips, one commit for the whole batch:
//!
//! 1. BEGIN, the batch's job rows locked in id order, the refunded accounts' rows locked in
//!    id order, and one statement that writes every result (each fenced by its lease, as
//!    [`super::finalize`] does), every refund (ledger row and balance together, each ledger
//!    row with its own running `balance_after`), the notification of each job it ended, and
//!    returns those jobs — sent together, with COMMIT when no job of the batch has a webhook
//!    (a sync job never has one: one round trip);
//! 2. otherwise the webhook rows of the jobs that have one and COMMIT — sent together.
//!
//! Jobs first, then accounts, each in id order: the order [`super::finalize`] takes them in
//! (job row, then its account), and the order the charge batches lock accounts in, so no
//! batch can deadlock with a cancel, a time-out, the reaper or a charge.
//!
//! Exactly once, as before: a job is ended only by the UPDATE whose fence holds (running,
//! this lease owner, this attempt), under its row lock; whoever ended it first — a cancel, a
//! waiting request's time-out, the reaper — leaves this one zero rows, and it writes
//! nothing for that job. A refund is written only for a job this very statement ended, and
//! the ledger's unique index on refunds stays the last word.
//!
//! Measured (release build, 2-core machine under other builds, `load/bench/jobs-bench.sh`
//! and `jobs-profile.sh` of branch bench14, baseline d841c24): at 16 clients over 16
//! accounts the finish transactions fell from 1 to 0.24 per job (batches of about four),
//! durable COMMITs per job from 3.00 to 2.24, round trips per job from 45.6 to 36.9, and sync
//! jobs/s rose by a median 1.33× over five runs (0.83×–1.54×: the machine's noise); one
//! client gains nothing measurable (a batch of one, still two round trips instead of five).
//!
//! One item cannot poison the others: a batch that fails is rolled back whole (nothing of it
//! was written) and each of its finishes is then made alone through [`super::finalize`],
//! each with its own outcome.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::finish::Webhook;
use super::{finalize, job_from_row, Claimed, End, Fence, Job, QueueError, CHANNEL};
use crate::credits::ledger::Kind;
use crate::db::batch::{Batcher, InProgress};

/// The most finishes in one transaction; the rest wait for the next one.
const MAX_BATCH: usize = 256;

struct Pending {
    id: Uuid,
    account_id: Uuid,
    has_webhook: bool,
    end: End,
    owner: Uuid,
    attempt: i32,
    reply: oneshot::Sender<Result<Option<Job>, QueueError>>,
}

/// The lane the workers' finishes share.
pub struct Finisher {
    lane: Arc<Batcher<Pending>>,
    /// Finishes in progress, alone or in the lane.
    busy: InProgress,
}

impl Finisher {
    /// `runtime`: the service's runtime, where the batches run (see `db::batch`).
    pub fn new(runtime: Handle) -> Self {
        Self {
            lane: Arc::new(Batcher::new(runtime)),
            busy: InProgress::default(),
        }
    }

    /// Ends job `id` (of `account_id`) as `end`, if `owner` still holds its lease for
    /// `attempt`: the same writes as [`super::finalize`] with [`Fence::Lease`]. `Ok(Some(job))`
    /// once committed — the job as it ended, its result included, what a read would return
    /// now; `Ok(None)` when the fence did not hold (nothing was written).
    pub async fn finish(
        &self,
        db: &Pool,
        id: Uuid,
        account_id: Uuid,
        end: End,
        owner: Uuid,
        attempt: i32,
    ) -> Result<Option<Job>, QueueError> {
        // Not knowing whether it has a webhook, its batch writes the webhook rows' flight.
        self.push(db, id, account_id, true, end, owner, attempt)
            .await
    }

    /// [`Finisher::finish`] for a job a worker or its request ran: it knows whether the job
    /// has a webhook, so a batch without any commits in one round trip.
    pub async fn finish_claimed(
        &self,
        db: &Pool,
        job: &Claimed,
        end: End,
        owner: Uuid,
        attempt: i32,
    ) -> Result<Option<Job>, QueueError> {
        self.push(
            db,
            job.id,
            job.account_id,
            job.has_webhook,
            end,
            owner,
            attempt,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn push(
        &self,
        db: &Pool,
        id: Uuid,
        account_id: Uuid,
        has_webhook: bool,
        end: End,
        owner: Uuid,
        attempt: i32,
    ) -> Result<Option<Job>, QueueError> {
        let entered = self.busy.enter();
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            id,
            account_id,
            has_webhook,
            end,
            owner,
            attempt,
            reply,
        };
        if entered.alone {
            // Nothing else in progress: a batch of one, from the caller's own task (a job's
            // runner, never a request's), without the hop to the drain task and back.
            finish_all(db, vec![pending]).await;
        } else {
            self.lane.push(pending, |lane| drain(lane, db.clone()));
        }
        answer
            .await
            .map_err(|_| QueueError::Invariant("the finish lane dropped a request"))?
    }
}

async fn drain(lane: Arc<Batcher<Pending>>, db: Pool) {
    while let Some(batch) = lane.next_batch(MAX_BATCH) {
        finish_all(&db, batch).await;
    }
}

/// Ends every job of `batch` in one transaction and answers each; a batch that fails is
/// made again job by job through [`finalize`].
async fn finish_all(db: &Pool, batch: Vec<Pending>) {
    // A job twice in one batch (it cannot happen: one worker runs an attempt) would be
    // ended by one of its two rows, at random; the second goes alone, after the batch.
    let mut seen = std::collections::HashSet::new();
    let (batch, again): (Vec<Pending>, Vec<Pending>) =
        batch.into_iter().partition(|p| seen.insert(p.id));
    match flush(db, &batch).await {
        Ok(mut ended) => {
            for p in batch {
                let _ = p.reply.send(Ok(ended.remove(&p.id)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, jobs = batch.len(), "batched job finish failed; nothing was written, finishing each alone");
            for p in batch {
                let outcome = alone(db, &p).await;
                let _ = p.reply.send(outcome);
            }
        }
    }
    for p in again {
        let outcome = alone(db, &p).await;
        let _ = p.reply.send(outcome);
    }
}

/// One finish in its own transaction, through [`finalize`].
async fn alone(db: &Pool, p: &Pending) -> Result<Option<Job>, QueueError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let fence = Fence::Lease {
        owner: p.owner,
        attempt: p.attempt,
    };
    let done = finalize(&tx, p.id, &p.end, fence).await?;
    tx.commit().await?;
    Ok(done)
}

const LOCK_JOBS: &str = "SELECT 1 FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const LOCK_ACCOUNTS: &str = "SELECT 1 FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// Ends every job whose fence holds, refunds those that did not succeed, and returns them.
/// `result` comes back NULL (it may be megabytes, and the caller has it).
///
/// The jobs are found by primary key: `status = (SELECT 'running')` is the fence written so
/// that the planner cannot prove the partial indexes on `status = 'running'` (`jobs_leases`,
/// `jobs_running`) apply. With the literal, once statistics say few jobs run, it plans a scan
/// of all of `jobs_leases` joined to the batch — every running job of every account, plus
/// every finished job's dead entry until vacuum reaches the table — on every finish, so
/// each finish cost more the more jobs ran (0.35 → 0.62 ms a statement within 30 s of the
/// 16-account benchmark).
pub const END: &str = "WITH f AS (
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::int[],
                              $6::uuid[], $7::int[], $8::text[])
                    AS f(id, status, result, error, upstream_status, owner, attempt, reason)),
     upd AS (
         UPDATE jobs j
            SET status = f.status, result = f.result, error = f.error,
                upstream_status = f.upstream_status, finished_at = now(), headers = NULL,
                lease_owner = NULL, lease_expires_at = NULL
           FROM f
          WHERE j.id = f.id AND j.status = (SELECT 'running')
            AND j.lease_owner = f.owner AND j.attempts = f.attempt
      RETURNING j.id, j.account_id, j.status, j.mode, j.url, j.formats, j.timeout_ms,
                j.webhook_url, j.cost, j.attempts, j.error, j.created_at, j.started_at,
                j.finished_at, f.reason),
     ch AS (
         SELECT u.id AS job_id, l.account_id, -l.delta AS amount, u.reason,
                l.key_id, l.created_at AS charged_at,
                row_number() OVER (ORDER BY u.id) AS n
           FROM upd u
           JOIN credit_ledger l ON l.job_id = u.id AND l.kind = 'charge'
          WHERE u.reason IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM credit_ledger r
                             WHERE r.job_id = u.id AND r.kind = 'refund')),
     tot AS (
         SELECT account_id, sum(amount)::bigint AS total FROM ch GROUP BY account_id),
     acct AS (
         UPDATE accounts a
            SET credit_balance = a.credit_balance + t.total,
                clawback_debt = (a.credit_balance + t.total) < 0
           FROM tot t
          WHERE a.id = t.account_id
      RETURNING a.id, a.credit_balance),
     refunds AS (
         INSERT INTO credit_ledger (account_id, delta, balance_after, kind, reason, job_id, key_id)
         SELECT c.account_id, c.amount,
                (a.credit_balance - t.total
                   + sum(c.amount) OVER (PARTITION BY c.account_id ORDER BY c.n))::bigint,
                'refund', c.reason, c.job_id, c.key_id
           FROM ch c
           JOIN acct a ON a.id = c.account_id
           JOIN tot t ON t.account_id = c.account_id
          ORDER BY c.n
      RETURNING job_id, delta),
     -- Refunds give back to their keys' spend-limit counters (credits::key_caps), when charge
     -- and refund fall in the counter's current period; the accounts are already locked, so
     -- these counter locks come after them, as everywhere.
     give AS (
         UPDATE key_spend_limits k SET spent = greatest(k.spent - g.amount, 0)
           FROM (SELECT c.key_id, sum(c.amount)::bigint AS amount
                   FROM ch c JOIN key_spend_limits s ON s.key_id = c.key_id
                  WHERE s.period_start = date_trunc(s.period, now(), 'UTC')
                    AND c.charged_at >= s.period_start
                  GROUP BY c.key_id) g
          WHERE k.key_id = g.key_id),
     -- The account events of the jobs this statement ended (`events`: job.succeeded,
     -- job.failed), in the same statement, so a batch with no webhook still commits in one
     -- flight. The payload is `events::sources::job_finished`'s. Ids are random (v4) here.
     evs AS (
         INSERT INTO events (id, account_id, type, payload)
         SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), u.account_id,
                'job.' || u.status,
                jsonb_build_object(
                    'job_id', u.id, 'status', u.status, 'url', u.url, 'cost', u.cost,
                    'charged', EXISTS (SELECT 1 FROM credit_ledger l
                                        WHERE l.job_id = u.id AND l.kind = 'charge'),
                    'refunded', (r.delta IS NOT NULL
                                   OR EXISTS (SELECT 1 FROM credit_ledger l
                                               WHERE l.job_id = u.id AND l.kind = 'refund')),
                    'error', u.error)
           FROM upd u LEFT JOIN refunds r ON r.job_id = u.id
          WHERE u.status IN ('succeeded', 'failed'))
     SELECT u.id, u.account_id, u.status, u.mode, u.url, u.formats, u.timeout_ms,
            u.webhook_url, u.cost, u.attempts, NULL::jsonb AS result, u.error, u.created_at,
            u.started_at, u.finished_at,
            EXISTS (SELECT 1 FROM credit_ledger l
                     WHERE l.job_id = u.id AND l.kind = 'charge') AS charged,
            (r.delta IS NOT NULL
               OR EXISTS (SELECT 1 FROM credit_ledger l
                           WHERE l.job_id = u.id AND l.kind = 'refund')) AS refunded,
            r.delta AS refund_delta,
            pg_notify($9, 'done:' || u.id::text) IS NULL AS notified
       FROM upd u LEFT JOIN refunds r ON r.job_id = u.id";

const WEBHOOKS: &str =
    "INSERT INTO job_webhooks (job_id, account_id, url, event_id, event_type, payload)
     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::jsonb[])";

/// One transaction for the whole batch; the jobs it ended (by id, as they ended, results
/// included).
async fn flush(db: &Pool, batch: &[Pending]) -> Result<HashMap<Uuid, Job>, QueueError> {
    let client = db.get().await?;
    let outcome = flush_on(&client, batch).await;
    if outcome.is_err() {
        // End the transaction before the connection goes back to the pool; one that cannot
        // even do that is discarded.
        if client.batch_execute("ROLLBACK").await.is_err() {
            let _ = deadpool_postgres::Object::take(client);
        }
    }
    outcome
}

async fn flush_on(
    client: &deadpool_postgres::Client,
    batch: &[Pending],
) -> Result<HashMap<Uuid, Job>, QueueError> {
    // Prepared once per connection: each statement is one message, not parse + execute.
    let lock_jobs = client.prepare_cached(LOCK_JOBS).await?;
    let lock_accounts = client.prepare_cached(LOCK_ACCOUNTS).await?;
    let end = client.prepare_cached(END).await?;
    let webhooks = client.prepare_cached(WEBHOOKS).await?;

    let mut job_ids: Vec<Uuid> = batch.iter().map(|p| p.id).collect();
    job_ids.sort_unstable();
    let mut refunded_accounts: Vec<Uuid> = batch
        .iter()
        .filter(|p| p.end.refund_reason().is_some())
        .map(|p| p.account_id)
        .collect();
    refunded_accounts.sort_unstable();
    refunded_accounts.dedup();

    let n = batch.len();
    let (mut ids, mut statuses, mut results, mut errors, mut upstream, mut owners, mut attempts) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut reasons: Vec<Option<&str>> = Vec::with_capacity(n);
    for p in batch {
        let (result, error, upstream_status) = p.end.columns();
        ids.push(p.id);
        statuses.push(p.end.status());
        results.push(result);
        errors.push(error);
        upstream.push(upstream_status);
        owners.push(p.owner);
        attempts.push(p.attempt);
        reasons.push(p.end.refund_reason());
    }
    let params: [&(dyn ToSql + Sync); 9] = [
        &ids, &statuses, &results, &errors, &upstream, &owners, &attempts, &reasons, &CHANNEL,
    ];
    let jobs_param: [&(dyn ToSql + Sync); 1] = [&job_ids];
    let accounts_param: [&(dyn ToSql + Sync); 1] = [&refunded_accounts];
    // Nothing to write after the END once no job of the batch has a webhook (sync jobs never
    // have one): the COMMIT goes in the same flight, one round trip for the whole batch.
    // Should the END fail, PostgreSQL turns that COMMIT into a rollback.
    //
    // (Whatever is added to a job's end must be written in this transaction too: a
    // statement that needs the END's rows goes in the second flight below, and makes it
    // needed — `second_flight`; one that does not can join this flight, prepared first,
    // since only statements already prepared keep their order in a pipeline. The account
    // events of job ends are written by the END itself, `evs`.)
    let second_flight = batch.iter().any(|p| p.has_webhook);
    // A batch of one has nothing to order: its END takes its job's row, then (refunding) its
    // account's — the order [`super::finalize`] takes them in — so the two locking
    // statements, there to order many rows, are left out. A step left out answers at once
    // without sending anything; the others send their message at the first poll, in order.
    let single = n == 1;
    let ((), _, _, rows, ()) = tokio::try_join!(
        client.batch_execute("BEGIN"),
        async {
            if single {
                Ok(Vec::new())
            } else {
                client.query(&lock_jobs, &jobs_param).await
            }
        },
        async {
            if single {
                Ok(Vec::new())
            } else {
                client.query(&lock_accounts, &accounts_param).await
            }
        },
        client.query(&end, &params),
        async {
            // Nothing to write after the END: COMMIT in this flight.
            if second_flight {
                Ok(())
            } else {
                client.batch_execute("COMMIT").await
            }
        },
    )?;

    let by_id: HashMap<Uuid, &Pending> = batch.iter().map(|p| (p.id, p)).collect();
    let mut ended = HashMap::with_capacity(rows.len());
    let mut statuses_ended = Vec::with_capacity(rows.len());
    let mut refunds = Vec::new();
    let (mut hook_jobs, mut hook_accounts, mut hook_urls, mut hook_events, mut hook_types) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hook_payloads = Vec::new();
    for row in &rows {
        let mut job = job_from_row(row);
        let Some(p) = by_id.get(&job.id) else {
            return Err(QueueError::Invariant(
                "a batched finish ended a job not in its batch",
            ));
        };
        statuses_ended.push(p.end.status());
        if let Some(delta) = row.get::<_, Option<i64>>("refund_delta") {
            refunds.push(delta);
        }
        // The END returns no result (it may be megabytes): the runner's is the one written.
        if let End::Succeeded { result, .. } = &p.end {
            job.result = Some(result.clone());
        }
        if let Some(url) = job.webhook_url.clone() {
            let hook = Webhook::new(&job, url);
            hook_jobs.push(job.id);
            hook_accounts.push(job.account_id);
            hook_urls.push(hook.url);
            hook_events.push(hook.event_id);
            hook_types.push(hook.event_type);
            hook_payloads.push(hook.payload);
        }
        ended.insert(job.id, job);
    }
    if second_flight {
        let hook_params: [&(dyn ToSql + Sync); 6] = [
            &hook_jobs,
            &hook_accounts,
            &hook_urls,
            &hook_events,
            &hook_types,
            &hook_payloads,
        ];
        tokio::try_join!(
            client.execute(&webhooks, &hook_params),
            client.batch_execute("COMMIT")
        )?;
    }
    // Counted once committed.
    for status in statuses_ended {
        crate::metrics::jobs().transition(status);
    }
    for delta in refunds {
        crate::metrics::credits_moved(Kind::Refund, delta);
    }
    Ok(ended)
}
