//! The checker: after the cluster has settled, everything the clients saw is held against
//! what PostgreSQL holds, invariant by invariant (issue #19). Each broken rule is one
//! violation with enough detail to find it in `ops.jsonl` and the instances' logs.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::cluster::PACK_CREDITS;
use crate::workload::{Account, Kind, Op, Outcome};
use crate::FaultRecord;

/// How long after PostgreSQL is back a 503 may still be an effect of its absence: pools
/// reconnect, and an attempt that started during the outage may end a little after.
const PG_RECOVERY_MS: u64 = 5_000;

#[derive(Default, Serialize)]
pub struct Findings {
    pub violations: Vec<Value>,
    pub stats: BTreeMap<String, Value>,
}

impl Findings {
    fn violation(&mut self, rule: &str, detail: Value) {
        self.violations
            .push(json!({"rule": rule, "detail": detail}));
    }
    fn stat(&mut self, k: &str, v: impl Serialize) {
        self.stats.insert(k.to_owned(), json!(v));
    }
}

pub async fn check(
    db: &Client,
    ops: &[Op],
    accounts: &[Account],
    faults: &[FaultRecord],
    crashed: &[(usize, String)],
) -> Result<Findings> {
    let mut f = Findings::default();
    let account_ids: Vec<Uuid> = accounts.iter().filter_map(|a| a.id.parse().ok()).collect();
    let index_of: HashMap<Uuid, usize> = account_ids
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, i))
        .collect();

    // --- answers: no 500, 503 only while PostgreSQL is away -------------------------------
    let pg_windows: Vec<(u64, u64)> = faults
        .iter()
        .filter(|r| r.postgres)
        .map(|r| (r.started_ms, r.healed_ms.unwrap_or(u64::MAX)))
        .collect();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let (mut e500, mut e503_in, mut e503_out) = (0u64, 0u64, 0u64);
    for op in ops {
        for a in &op.attempts {
            let label = match (&a.ptype, a.status) {
                (_, 0) => format!("no answer ({})", a.error.as_deref().unwrap_or("?")),
                (Some(t), s) => format!("{s} {t}"),
                (None, s) => s.to_string(),
            };
            *statuses.entry(label).or_default() += 1;
            if a.status == 500 {
                e500 += 1;
                f.violation(
                    "no_500",
                    json!({"op": op.id, "kind": op.kind, "instance": a.inst, "t_ms": a.t0, "type": a.ptype}),
                );
            }
            if a.status == 503 && a.ptype.as_deref() != Some("upstream_unavailable") {
                let during = pg_windows
                    .iter()
                    .any(|(s, e)| a.t1 >= *s && a.t0 <= e.saturating_add(PG_RECOVERY_MS));
                if during {
                    e503_in += 1;
                } else {
                    e503_out += 1;
                    f.violation(
                        "503_only_without_postgres",
                        json!({"op": op.id, "kind": op.kind, "instance": a.inst, "t0_ms": a.t0,
                               "t1_ms": a.t1, "type": a.ptype}),
                    );
                }
            }
        }
    }
    f.stat("answers", &statuses);
    f.stat("503_during_postgres_outages", e503_in);
    f.stat("503_outside_postgres_outages", e503_out);
    f.stat("500s", e500);

    // --- metered charges ---------------------------------------------------------------------
    let rows = db
        .query(
            "SELECT id, account_id, delta, reason, idempotency_key FROM credit_ledger
              WHERE kind = 'charge' AND job_id IS NULL AND account_id = ANY($1)",
            &[&account_ids],
        )
        .await?;
    let mut by_reason: HashMap<String, Vec<(i64, Uuid, i64)>> = HashMap::new();
    for r in &rows {
        let reason: Option<String> = r.get(3);
        by_reason
            .entry(reason.unwrap_or_default())
            .or_default()
            .push((r.get(0), r.get(1), r.get(2)));
    }
    let idem_rows = db
        .query(
            "SELECT account_id, key, status, convert_from(response_body, 'UTF8')
               FROM idempotency_keys WHERE account_id = ANY($1)",
            &[&account_ids],
        )
        .await?;
    let mut idem_record: HashMap<(Uuid, String), (Option<i16>, Option<String>)> = HashMap::new();
    for r in &idem_rows {
        idem_record.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
    }
    let mut reasons_seen = HashSet::new();
    let (mut acked, mut refused, mut lost_charged, mut lost_not_charged, mut replays) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for op in ops.iter().filter(|o| o.kind == Kind::Charge) {
        let reason = op.reason.clone().unwrap_or_default();
        reasons_seen.insert(reason.clone());
        let found = by_reason.get(&reason).cloned().unwrap_or_default();
        let account = accounts[op.account].id.parse::<Uuid>().ok();
        if found.len() > 1 {
            f.violation(
                "charge_at_most_once",
                json!({"op": op.id, "idempotency_key": op.idem, "ledger_ids": found.iter().map(|r| r.0).collect::<Vec<_>>()}),
            );
        }
        for (id, acc, delta) in &found {
            if Some(*acc) != account || *delta != -op.amount {
                f.violation(
                    "charge_matches_request",
                    json!({"op": op.id, "ledger_id": id, "delta": delta, "amount": op.amount}),
                );
            }
        }
        match op.outcome {
            Outcome::Acked => {
                acked += 1;
                if op.ledger_ids.len() > 1 {
                    replays += op.ledger_ids.len() as u64 - 1;
                }
                let first = op.ledger_ids.first().copied();
                if op.ledger_ids.iter().any(|i| Some(*i) != first) {
                    f.violation(
                        "idempotent_replay_same_entry",
                        json!({"op": op.id, "ledger_ids": op.ledger_ids}),
                    );
                }
                // Sent again after its success, it must replay (a 429 is the rate limit
                // speaking before idempotency is looked at).
                if let Some(r) = op.replay.as_deref() {
                    if r != "replayed" && !r.starts_with("429") {
                        f.violation(
                            "idempotent_replay_answers",
                            json!({"op": op.id, "idempotency_key": op.idem, "answer": r}),
                        );
                    }
                }
                if found.len() != 1 || found.first().map(|r| r.0) != first {
                    f.violation(
                        "acknowledged_charge_in_ledger_once",
                        json!({"op": op.id, "acknowledged_id": first, "ledger_ids": found.iter().map(|r| r.0).collect::<Vec<_>>()}),
                    );
                }
            }
            Outcome::Refused => {
                refused += 1;
                if !found.is_empty() {
                    let last = op.attempts.last();
                    f.violation(
                        "no_charge_without_acknowledgement",
                        json!({"op": op.id, "answer": last.map(|a| a.status), "type": last.and_then(|a| a.ptype.clone()),
                               "ledger_ids": found.iter().map(|r| r.0).collect::<Vec<_>>()}),
                    );
                }
            }
            Outcome::Lost => {
                if found.is_empty() {
                    lost_not_charged += 1;
                } else {
                    lost_charged += 1;
                }
            }
        }
        // A charge with a key commits with its stored outcome: a charged key has a completed
        // record naming the same ledger entry.
        if let (Some(k), Some(acc), Some((id, _, _))) = (&op.idem, account, found.first()) {
            match idem_record.get(&(acc, k.clone())) {
                Some((Some(201), Some(body))) => {
                    let stored: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                    if stored["id"].as_i64() != Some(*id) {
                        f.violation(
                            "idempotency_record_consistent",
                            json!({"op": op.id, "ledger_id": id, "stored": stored["id"]}),
                        );
                    }
                }
                other => f.violation(
                    "idempotency_record_consistent",
                    json!({"op": op.id, "ledger_id": id, "record_status": other.map(|o| o.0)}),
                ),
            }
        }
    }
    for (reason, rows) in &by_reason {
        if !reasons_seen.contains(reason) {
            f.violation(
                "no_charge_without_request",
                json!({"reason": reason, "ledger_ids": rows.iter().map(|r| r.0).collect::<Vec<_>>()}),
            );
        }
    }
    let dup_keys = db
        .query(
            "SELECT account_id::text, idempotency_key, count(*) FROM credit_ledger
              WHERE kind = 'charge' AND job_id IS NULL AND idempotency_key IS NOT NULL
              GROUP BY 1, 2 HAVING count(*) > 1",
            &[],
        )
        .await?;
    for r in &dup_keys {
        f.violation(
            "idempotency_key_charged_once",
            json!({"account": r.get::<_, String>(0), "key": r.get::<_, String>(1), "charges": r.get::<_, i64>(2)}),
        );
    }
    f.stat(
        "charges",
        json!({"acknowledged": acked, "refused": refused, "answer_lost_charged": lost_charged,
               "answer_lost_not_charged": lost_not_charged, "replays_after_success": replays,
               "ledger_rows": rows.len()}),
    );

    // --- jobs ----------------------------------------------------------------------------
    let jobs = db
        .query(
            "SELECT j.id::text, j.status, j.cost, j.attempts,
                    count(l.id) FILTER (WHERE l.kind = 'charge'),
                    count(l.id) FILTER (WHERE l.kind = 'refund'),
                    COALESCE(sum(l.delta) FILTER (WHERE l.kind = 'charge'), 0)::bigint,
                    COALESCE(sum(l.delta) FILTER (WHERE l.kind = 'refund'), 0)::bigint
               FROM jobs j LEFT JOIN credit_ledger l ON l.job_id = j.id
              WHERE j.account_id = ANY($1)
              GROUP BY j.id",
            &[&account_ids],
        )
        .await?;
    let mut db_jobs: HashMap<String, String> = HashMap::new();
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut max_attempts = 0i32;
    for r in &jobs {
        let (id, status, cost, attempts): (String, String, i64, i32) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (charges, refunds, charged, refunded): (i64, i64, i64, i64) =
            (r.get(4), r.get(5), r.get(6), r.get(7));
        max_attempts = max_attempts.max(attempts);
        *by_status.entry(status.clone()).or_default() += 1;
        let d = json!({"job": id, "status": status, "cost": cost, "attempts": attempts,
                       "charges": charges, "refunds": refunds});
        if !matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            f.violation("job_final", d.clone());
        }
        if charges > 1 || refunds > 1 {
            f.violation("job_charged_and_refunded_at_most_once", d.clone());
        }
        if cost > 0 && (charges != 1 || charged != -cost) {
            f.violation("job_charged_its_cost", d.clone());
        }
        match status.as_str() {
            "succeeded" if refunds != 0 => f.violation("succeeded_job_kept_its_charge", d.clone()),
            "failed" | "cancelled" if cost > 0 && (refunds != 1 || refunded != cost) => {
                f.violation("failed_or_cancelled_job_refunded", d.clone())
            }
            _ => {}
        }
        db_jobs.insert(id, status);
    }
    let orphan = db
        .query(
            "SELECT l.id FROM credit_ledger l LEFT JOIN jobs j ON j.id = l.job_id
              WHERE l.job_id IS NOT NULL AND j.id IS NULL",
            &[],
        )
        .await?;
    if !orphan.is_empty() {
        f.violation(
            "job_ledger_rows_have_a_job",
            json!({"ledger_ids": orphan.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()}),
        );
    }
    let mut client_jobs = 0u64;
    for op in ops
        .iter()
        .filter(|o| matches!(o.kind, Kind::Scrape | Kind::Job | Kind::Cancel))
    {
        for id in &op.job_ids {
            client_jobs += 1;
            let Some(status) = db_jobs.get(id) else {
                f.violation("acknowledged_job_exists", json!({"op": op.id, "job": id}));
                continue;
            };
            let seen = op.job_status.as_deref().unwrap_or("");
            let wrong = match (op.kind, op.outcome) {
                (Kind::Scrape, Outcome::Acked) if seen == "succeeded" => status != "succeeded",
                (Kind::Scrape, Outcome::Refused) if seen.starts_with("problem:") => {
                    status != "failed"
                }
                (Kind::Cancel, Outcome::Acked) => status != "cancelled",
                _ => false,
            };
            if wrong {
                f.violation(
                    "job_ends_as_answered",
                    json!({"op": op.id, "job": id, "answered": seen, "kind": op.kind, "in_db": status}),
                );
            }
        }
    }
    let dup_jobs = db
        .query(
            "SELECT account_id::text, idempotency_key, count(*) FROM jobs
              WHERE idempotency_key IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1",
            &[],
        )
        .await?;
    for r in &dup_jobs {
        f.violation(
            "idempotency_key_one_job",
            json!({"account": r.get::<_, String>(0), "key": r.get::<_, String>(1), "jobs": r.get::<_, i64>(2)}),
        );
    }
    f.stat(
        "jobs",
        json!({"in_database": jobs.len(), "by_status": by_status, "named_in_answers": client_jobs,
               "most_attempts": max_attempts}),
    );

    // --- balances ------------------------------------------------------------------------
    let bal = db
        .query(
            "SELECT a.id, a.credit_balance, a.clawback_debt, COALESCE(l.total, 0)::bigint, COALESCE(l.n, 0)
               FROM accounts a LEFT JOIN (SELECT account_id, sum(delta) AS total, count(*) AS n
                                            FROM credit_ledger GROUP BY account_id) l ON l.account_id = a.id",
            &[],
        )
        .await?;
    let mut ledger_rows = 0i64;
    for r in &bal {
        let (id, balance, debt, total, n): (Uuid, i64, bool, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        ledger_rows += n;
        if balance != total {
            f.violation(
                "balance_is_sum_of_ledger",
                json!({"account": id, "balance": balance, "sum": total}),
            );
        }
        if balance < 0 && !debt {
            f.violation(
                "balance_not_negative",
                json!({"account": id, "balance": balance}),
            );
        }
    }
    let kinds = db
        .query(
            "SELECT kind, count(*) FROM credit_ledger WHERE account_id = ANY($1) GROUP BY kind ORDER BY kind",
            &[&account_ids],
        )
        .await?;
    let kinds: BTreeMap<String, i64> = kinds.iter().map(|r| (r.get(0), r.get(1))).collect();
    for k in kinds.keys() {
        if !matches!(k.as_str(), "grant" | "charge" | "refund" | "purchase") {
            f.violation("only_expected_ledger_kinds", json!({"kind": k}));
        }
    }
    f.stat(
        "ledger",
        json!({"accounts": bal.len(), "rows": ledger_rows, "by_kind": kinds}),
    );

    // --- Stripe ----------------------------------------------------------------------------
    let purchases = db
        .query(
            "SELECT id, account_id, delta, stripe_event_id FROM credit_ledger WHERE kind = 'purchase'",
            &[],
        )
        .await?;
    let mut by_event: HashMap<String, Vec<(i64, Uuid, i64)>> = HashMap::new();
    for r in &purchases {
        let e: Option<String> = r.get(3);
        by_event
            .entry(e.unwrap_or_default())
            .or_default()
            .push((r.get(0), r.get(1), r.get(2)));
    }
    let mut session_events: HashMap<String, HashSet<String>> = HashMap::new();
    let mut deliveries = 0u64;
    let mut undelivered = 0u64;
    for op in ops.iter().filter(|o| o.kind == Kind::StripeDelivery) {
        deliveries += 1;
        if let (Some(s), Some(e)) = (&op.session, &op.event) {
            session_events
                .entry(s.clone())
                .or_default()
                .insert(e.clone());
        }
        if op.outcome != Outcome::Acked {
            undelivered += 1;
            f.violation(
                "stripe_delivery_accepted",
                json!({"op": op.id, "event": op.event, "last": op.attempts.last()}),
            );
        }
    }
    let mut sessions = 0u64;
    let mut known_events = HashSet::new();
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::Checkout && o.outcome == Outcome::Acked)
    {
        let Some(s) = &op.session else { continue };
        sessions += 1;
        let events = session_events.get(s).cloned().unwrap_or_default();
        let mut rows = Vec::new();
        for e in &events {
            known_events.insert(e.clone());
            rows.extend(by_event.get(e).cloned().unwrap_or_default());
        }
        let account = accounts[op.account].id.parse::<Uuid>().ok();
        let ok = rows.len() == 1
            && rows[0].2 == PACK_CREDITS
            && Some(rows[0].1) == account
            && index_of.contains_key(&rows[0].1);
        if !ok {
            f.violation(
                "stripe_purchase_credited_once",
                json!({"session": s, "events": events, "purchase_rows": rows.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>()}),
            );
        }
    }
    for (e, rows) in &by_event {
        if !known_events.contains(e) {
            f.violation(
                "no_purchase_without_event",
                json!({"event": e, "ledger_ids": rows.iter().map(|r| r.0).collect::<Vec<_>>()}),
            );
        }
    }
    f.stat(
        "stripe",
        json!({"sessions": sessions, "deliveries": deliveries, "undelivered": undelivered,
               "events": known_events.len(), "purchase_rows": purchases.len()}),
    );

    // --- revocation ------------------------------------------------------------------------
    let mut worst_refusal: Option<u64> = None;
    let mut latest_acceptance: Option<u64> = None;
    let mut probed = 0u64;
    let mut unreachable = 0u64;
    let mut revoked_ids = Vec::new();
    let mut rotated_ids = Vec::new();
    for op in ops.iter().filter(|o| {
        matches!(o.kind, Kind::KeyRevoke | Kind::KeyRotate) && o.outcome == Outcome::Acked
    }) {
        if let Some(k) = &op.key_id {
            if op.kind == Kind::KeyRevoke {
                revoked_ids.push(k.clone());
            } else {
                rotated_ids.push(k.clone());
            }
        }
        for p in &op.probe {
            probed += 1;
            if let Some(ms) = p.last_acceptance_ms {
                latest_acceptance = Some(latest_acceptance.map_or(ms, |w| w.max(ms)));
            }
            match p.first_refusal_ms {
                Some(ms) => worst_refusal = Some(worst_refusal.map_or(ms, |w| w.max(ms))),
                None => unreachable += 1,
            }
            if p.last_acceptance_ms.is_some_and(|ms| ms >= 1_000) {
                f.violation(
                    "revoked_key_refused_within_1s",
                    json!({"op": op.id, "kind": op.kind, "key": op.key_id, "instance": p.inst,
                           "last_acceptance_ms": p.last_acceptance_ms, "first_refusal_ms": p.first_refusal_ms}),
                );
            }
        }
    }
    let still = db
        .query(
            "SELECT id FROM api_keys WHERE (id = ANY($1) AND revoked_at IS NULL)
                OR (id = ANY($2) AND (grace_until IS NULL OR grace_until > now()) AND revoked_at IS NULL)",
            &[&revoked_ids, &rotated_ids],
        )
        .await?;
    for r in &still {
        f.violation(
            "acknowledged_revocation_recorded",
            json!({"key": r.get::<_, String>(0)}),
        );
    }
    f.stat(
        "revocations",
        json!({"revoked": revoked_ids.len(), "rotated_away": rotated_ids.len(),
               "instance_probes": probed, "worst_first_refusal_ms": worst_refusal,
               "latest_acceptance_ms": latest_acceptance,
               "probes_without_an_answer": unreachable}),
    );

    for (i, st) in crashed {
        f.violation("no_instance_crash", json!({"instance": i, "exit": st}));
    }
    Ok(f)
}

/// A job ends by its last attempt (the lease fence): a `/once/` page answers its first
/// request with the page and every later one with a 500 (see `upstream::once`), so a job
/// whose page was fetched twice was run again after its first attempt's lease expired, and
/// must not end `succeeded` — that ending could only come from the stale first attempt.
/// `fetches` is the upstream's count of requests per token.
pub async fn check_last_attempt(
    db: &Client,
    accounts: &[Account],
    fetches: &HashMap<String, u64>,
    f: &mut Findings,
) -> Result<()> {
    let account_ids: Vec<Uuid> = accounts.iter().filter_map(|a| a.id.parse().ok()).collect();
    let rows = db
        .query(
            "SELECT id::text, url, status, attempts FROM jobs
              WHERE account_id = ANY($1) AND url LIKE '%/once/%'",
            &[&account_ids],
        )
        .await?;
    let mut run_again = 0u64;
    for r in &rows {
        let (id, url, status, attempts): (String, String, String, i32) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let token = url.rsplit("/once/").next().unwrap_or_default();
        let n = fetches.get(token).copied().unwrap_or(0);
        if n < 2 {
            continue;
        }
        run_again += 1;
        if status == "succeeded" {
            f.violation(
                "job_ended_by_its_last_attempt",
                json!({"job": id, "fetches": n, "attempts": attempts, "status": status}),
            );
        }
    }
    f.stat(
        "flaky_page_jobs",
        json!({"jobs": rows.len(), "fetched_again_by_a_later_attempt": run_again}),
    );
    Ok(())
}
