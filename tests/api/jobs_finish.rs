//! The end of a job through the workers' group-commit lane (`jobs::queue::Finisher`):
//! concurrent finishes share commits, yet each job is still ended exactly once — by its
//! worker or by whoever raced it — and refunded at most once, and the money adds up.

use std::collections::HashMap;

use keymeter::jobs::queue::{self, End, Finisher};
use serde_json::json;
use uuid::Uuid;

use crate::support::app::spawn_app;
use crate::support::db::{assert_ledger_invariant, balance};

const COST: i64 = 3;
const JOBS: usize = 90;

#[tokio::test]
async fn concurrent_finishes_on_one_account_end_each_job_once_and_refund_at_most_once() {
    let app = spawn_app().await;
    let (account, _key) = app.create_account("pro", 1_000).await;
    let pool = app.pool();
    let owner = Uuid::now_v7();

    // Jobs already running under `owner`'s lease, each with its cost reserved; every third
    // has a webhook.
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let id = Uuid::now_v7();
        let client = pool.get().await.unwrap();
        match keymeter::credits::ledger::reserve(&client, account, COST, id, None)
            .await
            .unwrap()
        {
            keymeter::credits::Once::Done(_) => {}
            other => panic!("a new job was already charged: {other:?}"),
        }
        let webhook = (i % 3 == 0).then(|| "https://hooks.example.com/in".to_owned());
        client
            .execute(
                "INSERT INTO jobs (id, account_id, status, mode, url, formats, timeout_ms,
                                   webhook_url, cost, attempts, lease_owner, lease_expires_at,
                                   started_at)
                 VALUES ($1, $2, 'running', 'async', 'https://example.com/', '{metadata}',
                         30000, $3, $4, 1, $5, now() + interval '1 hour', now())",
                &[&id, &account, &webhook, &COST, &owner],
            )
            .await
            .unwrap();
        ids.push(id);
    }
    assert_eq!(
        balance(&app, account).await.credits,
        1_000 - COST * JOBS as i64
    );

    // All at once: the worker's finish of every job (a third succeed), a stale attempt's
    // finish of every fifth job, and a waiting request's time-out racing every fourth.
    let finisher = Finisher::new(tokio::runtime::Handle::current());
    let finishes = ids.iter().enumerate().map(|(i, &id)| {
        let end = if i % 3 == 1 {
            End::Succeeded {
                result: json!({"metadata": {"title": format!("page {i}")}}),
                upstream_status: 200,
            }
        } else {
            End::failed("server_error", "The site answered with status 500.")
        };
        let (finisher, pool) = (&finisher, &pool);
        async move {
            let worker = finisher.finish(pool, id, account, end.clone(), owner, 1);
            let stale = async {
                if i % 5 == 0 {
                    finisher
                        .finish(pool, id, account, end, owner, 0)
                        .await
                        .map(|j| j.is_some())
                } else {
                    Ok(false)
                }
            };
            let timeout = async {
                if i % 4 == 0 {
                    queue::time_out(pool, id, "timed out")
                        .await
                        .map(|j| j.is_some())
                } else {
                    Ok(false)
                }
            };
            let (worker, stale, timeout) = tokio::join!(worker, stale, timeout);
            (id, worker.unwrap(), stale.unwrap(), timeout.unwrap())
        }
    });
    let outcomes = futures_util::future::join_all(finishes).await;

    let rows = app
        .db
        .query(
            "SELECT j.id, j.status,
                    (SELECT count(*) FROM credit_ledger l WHERE l.job_id = j.id AND l.kind = 'refund'),
                    (SELECT count(*) FROM job_webhooks w WHERE w.job_id = j.id),
                    (SELECT w.payload -> 'data' ->> 'status' FROM job_webhooks w WHERE w.job_id = j.id),
                    j.webhook_url IS NOT NULL, j.lease_owner IS NULL AND j.finished_at IS NOT NULL
               FROM jobs j",
            &[],
        )
        .await
        .unwrap();
    let by_id: HashMap<Uuid, _> = rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let status: String = r.get(1);
            let refunds: i64 = r.get(2);
            let hooks: i64 = r.get(3);
            let hook_status: Option<String> = r.get(4);
            let has_hook: bool = r.get(5);
            let closed: bool = r.get(6);
            (id, (status, refunds, hooks, hook_status, has_hook, closed))
        })
        .collect();
    let mut succeeded = 0;
    for (i, (id, ended, stale, timeout)) in outcomes.into_iter().enumerate() {
        let worker = ended.is_some();
        assert!(!stale, "job {i}: a stale attempt's finish wrote nothing");
        assert!(
            worker ^ timeout,
            "job {i}: exactly one of the worker and the time-out ended it"
        );
        let (status, refunds, hooks, hook_status, has_hook, closed) = &by_id[&id];
        assert!(closed, "job {i}: finished and its lease cleared");
        let expected = if worker && i % 3 == 1 {
            "succeeded"
        } else {
            "failed"
        };
        assert_eq!(status, expected, "job {i}");
        // The job the finish hands back (a sync request answers with it) is the committed row.
        if let Some(job) = &ended {
            assert_eq!(job.id, id, "job {i}");
            assert_eq!(&job.status, status, "job {i}: the handed job's status");
            assert!(job.charged, "job {i}: charged at creation");
            assert_eq!(
                job.refunded,
                *refunds == 1,
                "job {i}: the handed job's refund"
            );
            assert!(job.finished_at.is_some(), "job {i}");
            let expected_result = (status == "succeeded")
                .then(|| json!({"metadata": {"title": format!("page {i}")}}));
            assert_eq!(
                job.result, expected_result,
                "job {i}: the handed job's result"
            );
        }
        if status == "succeeded" {
            succeeded += 1;
            assert_eq!(*refunds, 0, "job {i}: a succeeded job keeps its charge");
        } else {
            assert_eq!(*refunds, 1, "job {i}: a failed job is refunded once");
        }
        assert_eq!(*hooks, i64::from(*has_hook), "job {i}: one webhook row");
        if *has_hook {
            assert_eq!(hook_status.as_deref(), Some(status.as_str()), "job {i}");
        }
    }
    assert_eq!(
        balance(&app, account).await.credits,
        1_000 - COST * succeeded,
        "only the succeeded jobs are paid for"
    );
    // Each ledger row's balance_after is the balance after it, in order: the batched refunds
    // read as if made one by one.
    let broken: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM (
                 SELECT balance_after,
                        sum(delta) OVER (PARTITION BY account_id ORDER BY id) AS running
                   FROM credit_ledger) l
              WHERE balance_after <> running",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(broken, 0, "every balance_after is the running balance");
    assert_ledger_invariant(&app).await;

    // A finish after the end, by the job's own worker (a retry), writes nothing.
    let again = finisher
        .finish(
            &pool,
            ids[1],
            account,
            End::failed("server_error", "again"),
            owner,
            1,
        )
        .await
        .unwrap();
    assert!(again.is_none(), "a job ends once");
    assert_ledger_invariant(&app).await;
}

/// The finish statement finds its batch's jobs by primary key, whatever the statistics say.
/// With the fence written as the literal `status = 'running'`, the planner proved the partial
/// indexes on that status apply and, once statistics said few jobs run, scanned all of
/// `jobs_leases` (every running job of every account, and every finished job's dead entry
/// until vacuum) on every finish. The plan is the one a connection keeps: generic, made
/// after `ANALYZE` of a table of finished jobs with a few running.
#[tokio::test]
async fn the_finish_statement_reads_its_jobs_by_primary_key() {
    let app = spawn_app().await;
    let (account, _key) = app.create_account("pro", 1_000).await;
    let pool = app.pool();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "INSERT INTO jobs (id, account_id, status, mode, url, formats, timeout_ms, cost,
                               attempts, started_at, finished_at)
             SELECT gen_random_uuid(), '{account}', 'succeeded', 'sync', 'https://example.com/',
                    '{{metadata}}', 30000, 1, 1, now(), now()
               FROM generate_series(1, 20000);
             INSERT INTO jobs (id, account_id, status, mode, url, formats, timeout_ms, cost,
                               attempts, lease_owner, lease_expires_at, started_at)
             SELECT gen_random_uuid(), '{account}', 'running', 'sync', 'https://example.com/',
                    '{{metadata}}', 30000, 1, 1, gen_random_uuid(), now() + interval '1 minute',
                    now()
               FROM generate_series(1, 40);
             ANALYZE jobs;"
        ))
        .await
        .unwrap();
    let tx_sql = format!(
        "BEGIN;
         SET LOCAL plan_cache_mode = force_generic_plan;
         PREPARE finish AS {};",
        queue::FINISH_STATEMENT
    );
    client.batch_execute(&tx_sql).await.unwrap();
    let rows = client
        .query(
            "EXPLAIN EXECUTE finish('{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', 'x')",
            &[],
        )
        .await
        .unwrap();
    client
        .batch_execute("ROLLBACK; DEALLOCATE finish")
        .await
        .unwrap();
    let plan: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let plan = plan.join("\n");
    let update = plan
        .split("Update on jobs j")
        .nth(1)
        .and_then(|rest| rest.split("CTE ").next())
        .unwrap_or_else(|| panic!("no update of jobs in the plan:\n{plan}"));
    assert!(
        update.contains("jobs_pkey")
            && !update.contains("jobs_leases")
            && !update.contains("jobs_running"),
        "the finish should find its jobs by primary key:\n{update}"
    );
}
