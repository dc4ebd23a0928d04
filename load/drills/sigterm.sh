#!/usr/bin/env bash
# Drill: SIGTERM under load.   load/drills/sigterm.sh
#
# A fresh database, the local upstream and keymeter instance A (KEYMETER_SHUTDOWN_TIMEOUT_SECS
# =SHUTDOWN_SECS, 5). First LONG_JOBS (4) async jobs of a page that takes JOB_LONG_MS (20000,
# far beyond the shutdown timeout: A cannot finish them and must put them back); then k6
# (load/k6/drill-load.js, VUS virtual users) sends A a mix of GET /v1/account,
# POST /v1/credits/charge, sync POST /v1/scrape of a page that takes SCRAPE_MS (500) and
# async POST /v1/jobs of a page that takes JOB_SHORT_MS (1000). After BEFORE_SECS (4) A gets
# SIGTERM; k6 keeps going AFTER_SECS (3) more (its new connections are refused: A has
# stopped listening). Then:
#   - every request k6 started before the SIGTERM got a complete HTTP answer (2xx or a
#     problem; status 0 — reset, refused, timed out — is a dropped request), and the ones in
#     flight at the SIGTERM are counted (the drill is only meaningful if there were some);
#   - A exits by itself (exit code 0) within SHUTDOWN_SECS × 2 + 10 s;
#   - no job is left 'running' after A is gone (it finished them or put them back);
#   - instance B, started afterwards on the same database, runs every queued job to its
#     end (bounded: JOB_LONG_MS + 60 s), each job charged exactly once and refunded at most
#     once (a refund only for a failed or cancelled job), and the ledger invariant holds.
# Prints the figures and one line  VERDICT sigterm: PASS|FAIL — …  ; exit code 0 on PASS.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh

BEFORE_SECS=${BEFORE_SECS:-4}
AFTER_SECS=${AFTER_SECS:-3}
SHUTDOWN_SECS=${SHUTDOWN_SECS:-5}
LONG_JOBS=${LONG_JOBS:-4}
export VUS=${VUS:-8} PACE_MS=${PACE_MS:-20} MIX=${MIX:-account,charge,scrape,job_short}
export SCRAPE_MS=${SCRAPE_MS:-500} JOB_SHORT_MS=${JOB_SHORT_MS:-1000} JOB_LONG_MS=${JOB_LONG_MS:-20000}
export REQ_TIMEOUT=30s

load_init
ensure_k6
load_build
create_database
start_upstream
# The runner's info lines say how many jobs A put back in the queue.
start_server server-a KEYMETER_SHUTDOWN_TIMEOUT_SECS="$SHUTDOWN_SECS" \
    KEYMETER_LOG=warn,keymeter::cli=info,keymeter::jobs::runner=info
a_pid=$SERVER_PID
create_account internal 1000000

for _ in $(seq 1 "$LONG_JOBS"); do
    curl -fsS --max-time 5 -o /dev/null -H "Authorization: Bearer $API_KEY" -H 'Content-Type: application/json' \
        -d "{\"url\":\"$UPSTREAM_URL/slow/$JOB_LONG_MS\",\"timeout_ms\":60000}" "$BASE_URL/v1/jobs"
done

requests=$OUT_DIR/drill-sigterm-requests.log
rm -f "$requests" "$OUT_DIR/drill-sigterm-k6.log" # k6 appends to its log file
DURATION=$((BEFORE_SECS + AFTER_SECS))s LOAD_K6_EXEC=1 run_k6 load/k6/drill-load.js --quiet \
    --console-output="$requests" --log-output=file="$OUT_DIR/drill-sigterm-k6.log" &
k6_pid=$!
LOAD_PIDS+=("$k6_pid")
sleep "$BEFORE_SECS"
running_at_term=$(db_psql -c "SELECT count(*) FROM jobs WHERE status = 'running'")
t_term=$(now_ms)
log "SIGTERM to instance A (pid $a_pid) with $running_at_term jobs running"
kill -TERM "$a_pid"
a_exit=
limit_s=$((SHUTDOWN_SECS * 2 + 10))
for _ in $(seq 1 $((limit_s * 10))); do
    if ! kill -0 "$a_pid" 2>/dev/null; then
        set +e; wait "$a_pid"; a_exit=$?; set -e
        break
    fi
    sleep 0.1
done
t_exit=$(now_ms)
if [ -z "$a_exit" ]; then
    log "instance A did not exit within $limit_s s; killing it"
    stop_pid "$a_pid" 1
    a_exit=timeout
fi
log "instance A exited ($a_exit) $((t_exit - t_term)) ms after the SIGTERM"
for _ in $(seq 1 $(((AFTER_SECS + 40) * 10))); do kill -0 "$k6_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$k6_pid" 2>/dev/null && { log "k6 did not finish in time; stopping it"; stop_pid "$k6_pid" 5; }
wait "$k6_pid" 2>/dev/null || true

# What A left behind.
left=$(db_psql -F ' ' -c "SELECT count(*) FILTER (WHERE status = 'running'), count(*) FILTER (WHERE status = 'queued'), count(*) FROM jobs")
read -r left_running left_queued jobs_total <<<"$left"
requeued=$(grep -o '"message":"re-queued unfinished jobs[^}]*' "$OUT_DIR/server-a.log" | grep -o '"jobs":[0-9]*' | cut -d: -f2 || true)
requeued=${requeued:-0}
log "after A: $left_running running, $left_queued queued, $jobs_total jobs in all"

# Instance B finishes the queue.
start_server server-b
t_b=$(now_ms)
pending=unknown
for _ in $(seq 1 $(((JOB_LONG_MS / 1000 + 60) * 2))); do
    pending=$(db_psql -c "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")
    [ "$pending" = 0 ] && break
    sleep 0.5
done
t_done=$(now_ms)
log "instance B: $pending jobs pending after $((t_done - t_b)) ms"
stop_pid "$SERVER_PID" 15

ledger=PASS
check_ledger_invariant || ledger=FAIL
jobs_report=$(db_psql -F ' ' -c "
    SELECT count(*) FILTER (WHERE status = 'succeeded'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status NOT IN ('succeeded', 'failed', 'cancelled')),
           count(*) FILTER (WHERE charges <> 1),
           count(*) FILTER (WHERE refunds > 1 OR (refunds = 1) <> (status IN ('failed', 'cancelled')))
      FROM (SELECT j.status,
                   (SELECT count(*) FROM credit_ledger l WHERE l.job_id = j.id AND l.kind = 'charge') AS charges,
                   (SELECT count(*) FROM credit_ledger l WHERE l.job_id = j.id AND l.kind = 'refund') AS refunds
              FROM jobs j) s")
failed_reasons=$(db_psql -c "SELECT coalesce(string_agg(r || ': ' || n, ', '), 'none') FROM
    (SELECT error->>'reason' AS r, count(*) AS n FROM jobs WHERE status = 'failed' GROUP BY 1) s")

python3 - "$requests" "$t_term" "$t_exit" "$a_exit" "$limit_s" "$running_at_term" "$left_running" "$left_queued" \
    "$jobs_total" "$pending" "$((t_done - t_b))" "$ledger" "$jobs_report" "$failed_reasons" "$requeued" <<'PY'
import re, sys
from collections import Counter
(path, t_term, t_exit, a_exit, limit_s, running_at_term, left_running, left_queued, jobs_total, pending,
 b_ms, ledger, jobs_report, failed_reasons, requeued) = sys.argv[1:]
t_term, t_exit = int(t_term), int(t_exit)
succeeded, failed, unfinished, bad_charges, bad_refunds = map(int, jobs_report.split())
reqs = []
for line in open(path):
    m = re.search(r'msg="REQ (\d+) (\d+) (\d+) (\S+) (\S+) (\S+)"', line)
    if m:
        reqs.append((int(m[1]), int(m[2]), int(m[3]), m[4], m[5], m[6]))
before = [r for r in reqs if r[0] < t_term]
in_flight = [r for r in before if r[1] >= t_term]
dropped = [r for r in before if r[2] == 0]
after = [r for r in reqs if r[0] >= t_term]
print()
print(f"sigterm drill — SIGTERM at +0 ms, instance A exited after {t_exit - t_term} ms with {a_exit}")
print(f"  requests started before the SIGTERM: {len(before)} — answers {dict(Counter(r[2] for r in before))}")
print(f"  in flight at the SIGTERM: {len(in_flight)} — by kind {dict(Counter(r[3] for r in in_flight))}, "
      f"answers {dict(Counter((r[2], r[4]) for r in in_flight))}, longest {max((r[1] - r[0] for r in in_flight), default=0)} ms")
print(f"  dropped (no HTTP answer) among them: {len(dropped)} {dropped[:5]}")
print(f"  started after the SIGTERM: {len(after)} — {dict(Counter((r[2], r[5]) for r in after))} (0 = refused: A no longer listens)")
print(f"  jobs: {running_at_term} running at the SIGTERM; A put {requeued} unfinished ones back in the queue; after A exited: "
      f"{left_running} running, {left_queued} queued (of {jobs_total}); instance B left {pending} pending after {b_ms} ms")
print(f"  jobs at the end: {succeeded} succeeded, {failed} failed ({failed_reasons}), {unfinished} unfinished; "
      f"charged other than once: {bad_charges}; wrong refunds: {bad_refunds}; ledger: {ledger}")
problems = []
if not reqs: problems.append("no requests logged")
if dropped: problems.append(f"{len(dropped)} requests started before the SIGTERM got no answer")
if not in_flight: problems.append("nothing was in flight at the SIGTERM (drill not meaningful)")
if a_exit != "0": problems.append(f"instance A ended with {a_exit}")
if left_running != "0": problems.append(f"{left_running} jobs left running by A")
if pending != "0" or unfinished: problems.append("jobs left unfinished after instance B")
if bad_charges or bad_refunds: problems.append("jobs charged or refunded wrongly")
if ledger != "PASS": problems.append("ledger invariant broken")
verdict = "PASS" if not problems else "FAIL"
print(f"VERDICT sigterm: {verdict} — {len(in_flight)} requests in flight at SIGTERM, {len(dropped)} dropped; "
      f"A exited in {t_exit - t_term} ms ({a_exit}); {left_running} jobs left running, {requeued} re-queued by A, "
      f"{left_queued} queued in all, completed by instance B in {b_ms} ms; {succeeded} jobs succeeded, {failed} failed; ledger {ledger}"
      + (f"; problems: {'; '.join(problems)}" if problems else ""))
sys.exit(0 if not problems else 1)
PY
