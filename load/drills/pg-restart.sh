#!/usr/bin/env bash
# Drill: PostgreSQL restarted under load.   load/drills/pg-restart.sh
#
# Starts its OWN PostgreSQL (initdb into a temporary directory, a free port on 127.0.0.1, as
# user postgres through runuser when run as root), so stopping it disturbs no one else; then
# keymeter on it, ACCOUNTS accounts, and k6 (load/k6/drill-load.js: GET /v1/account and
# POST /v1/credits/charge, VUS virtual users) for BEFORE_SECS + DOWN_SECS + AFTER_SECS.
# After BEFORE_SECS it stops PostgreSQL (pg_ctl -m fast), keeps it down DOWN_SECS, starts it
# again, and lets the load run AFTER_SECS more. Then it judges every request k6 made:
#   - fail fast: while PostgreSQL is down, every answer is 503 application/problem+json,
#     none takes longer than the pool wait (KEYMETER_DB_POOL_TIMEOUT_MS, 2000 ms) plus the
#     connect timeout (KEYMETER_DB_CONNECT_TIMEOUT_MS, 2000 ms) plus a 500 ms margin, and none
#     goes unanswered (status 0: refused, reset, timed out);
#   - no crash: the server process is still running at the end;
#   - recovery: the last failure ends within 5 s of PostgreSQL accepting connections again,
#     and requests succeed after it;
#   - the ledger invariant (balance = sum of ledger deltas) for every account, in SQL.
# Prints the figures and one line  VERDICT pg-restart: PASS|FAIL — …  ; exit code 0 on PASS.
# Bounded: every wait has a limit; everything it started is stopped and removed at exit.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh

BEFORE_SECS=${BEFORE_SECS:-5}
DOWN_SECS=${DOWN_SECS:-5}
AFTER_SECS=${AFTER_SECS:-10}
ACCOUNTS=${ACCOUNTS:-4}
RECOVERY_LIMIT_MS=${RECOVERY_LIMIT_MS:-5000}
POOL_TIMEOUT_MS=${KEYMETER_DB_POOL_TIMEOUT_MS:-2000}
CONNECT_TIMEOUT_MS=${KEYMETER_DB_CONNECT_TIMEOUT_MS:-2000}
export VUS=${VUS:-8} PACE_MS=${PACE_MS:-10} MIX=account,charge REQ_TIMEOUT=30s

load_init
ensure_k6
load_build
ensure_postgres_installed

# --- our own PostgreSQL ---------------------------------------------------------------------
pg_bin=$(pg_bindir)
pg_dir=$(mktemp -d /tmp/keymeter-drill-pg.XXXXXX)
pg_data=$pg_dir/data
pg_log=$pg_dir/postgres.log # copied to load/out/drill-pg.log at exit
pg_port=$(free_port)
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
# shellcheck disable=SC2317 # called from the EXIT trap
pg_remove() {
    if [ -f "$pg_data/postmaster.pid" ]; then
        as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
    cp "$pg_log" "$OUT_DIR/drill-pg.log" 2>/dev/null || true
    rm -rf "$pg_dir"
}
LOAD_FINAL_HOOKS+=(pg_remove)
if [ "$(id -u)" = 0 ]; then chown postgres: "$pg_dir"; fi
log "initdb in $pg_dir (PostgreSQL from $pg_bin)"
as_pg "$pg_bin/initdb" -D "$pg_data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
pg_start() {
    as_pg "$pg_bin/pg_ctl" -D "$pg_data" -l "$pg_log" -w -t 30 \
        -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off" start >/dev/null
}
pg_stop() { as_pg "$pg_bin/pg_ctl" -D "$pg_data" -m fast -w -t 30 stop >/dev/null; }
pg_start
log "drill PostgreSQL on 127.0.0.1:$pg_port"

create_database "postgres://postgres@127.0.0.1:$pg_port/postgres"
start_server server
keys=()
for _ in $(seq 1 "$ACCOUNTS"); do
    create_account internal 1000000
    keys+=("$API_KEY")
done
KEYS=$(IFS=,; echo "${keys[*]}")
export KEYS

# --- load, and the fault in the middle of it ------------------------------------------------
total=$((BEFORE_SECS + DOWN_SECS + AFTER_SECS))
requests=$OUT_DIR/drill-pg-restart-requests.log
rm -f "$requests"
DURATION=${total}s LOAD_K6_EXEC=1 run_k6 load/k6/drill-load.js --quiet --console-output="$requests" &
k6_pid=$!
LOAD_PIDS+=("$k6_pid")
sleep "$BEFORE_SECS"
t_stop=$(now_ms)
log "stopping PostgreSQL"
pg_stop
t_down=$(now_ms)
sleep "$DOWN_SECS"
log "starting PostgreSQL again"
t_start=$(now_ms)
pg_start
t_up=$(now_ms)
log "PostgreSQL accepts connections again (start took $((t_up - t_start)) ms)"
for _ in $(seq 1 $(((AFTER_SECS + 60) * 10))); do kill -0 "$k6_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$k6_pid" 2>/dev/null && { log "k6 did not finish in time; stopping it"; stop_pid "$k6_pid" 5; }
wait "$k6_pid" 2>/dev/null || true

alive=yes
kill -0 "$SERVER_PID" 2>/dev/null || alive=no
ledger=PASS
check_ledger_invariant || ledger=FAIL
charge_rows=$(db_psql -c "SELECT count(*) FROM credit_ledger WHERE kind = 'charge'")

python3 - "$requests" "$t_stop" "$t_down" "$t_start" "$t_up" "$POOL_TIMEOUT_MS" "$CONNECT_TIMEOUT_MS" \
    "$RECOVERY_LIMIT_MS" "$alive" "$ledger" "$charge_rows" <<'PY'
import re, sys
from collections import Counter
path, t_stop, t_down, t_start, t_up, pool_ms, connect_ms, limit_ms, alive, ledger, charge_rows = sys.argv[1:]
t_stop, t_down, t_start, t_up = map(int, (t_stop, t_down, t_start, t_up))
fast_limit = int(pool_ms) + int(connect_ms) + 500
reqs = []
for line in open(path):
    m = re.search(r'msg="REQ (\d+) (\d+) (\d+) (\S+) (\S+) (\S+)"', line)
    if m:
        t0, t1, st = int(m[1]), int(m[2]), int(m[3])
        reqs.append((t0, t1, st, m[4], m[5], m[6]))
ok = lambda r: 200 <= r[2] < 300
before = [r for r in reqs if r[1] < t_stop]
# Requests that overlapped the outage: started before PostgreSQL was back, ended after it began going down.
during = [r for r in reqs if r[0] < t_up and r[1] >= t_stop]
after = [r for r in reqs if r[0] >= t_up]
failures = [r for r in reqs if not ok(r)]
no_answer = [r for r in reqs if r[2] == 0]
not_503 = [r for r in failures if not (r[2] == 503 and r[4] != 'not-json' and '(ct:' not in r[4])]
slow_fail = [r for r in failures if r[1] - r[0] > fast_limit]
fail_ms = sorted(r[1] - r[0] for r in failures)
last_fail_end = max((r[1] for r in failures), default=None)
recovery_ms = max(0, last_fail_end - t_up) if last_fail_end is not None and last_fail_end >= t_down else 0
ok_after_recovery = sum(1 for r in reqs if ok(r) and last_fail_end is not None and r[0] > last_fail_end)
first_ok = min((r[1] for r in reqs if ok(r) and r[0] >= t_start), default=None)
pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0
print()
print(f"pg-restart drill — PostgreSQL stopped at +0 ms (down after {t_down - t_stop} ms), started at +{t_start - t_stop} ms, "
      f"accepting at +{t_up - t_stop} ms")
print(f"  requests: {len(reqs)} total; {len(before)} before the stop (failed: {sum(1 for r in before if not ok(r))}); "
      f"{len(during)} overlapping the outage; {len(after)} after PostgreSQL was back")
print(f"  failures: {len(failures)} — by status/type: {dict(Counter((r[2], r[4]) for r in failures))}")
print(f"  failure answer time: p50 {pct(fail_ms, .5)} ms, p99 {pct(fail_ms, .99)} ms, max {fail_ms[-1] if fail_ms else 0} ms "
      f"(limit: pool wait {pool_ms} + connect {connect_ms} + 500 = {fast_limit} ms)")
print(f"  not a 503 problem+json: {len(not_503)}; no answer at all: {len(no_answer)}; slower than the limit: {len(slow_fail)}")
print(f"  recovery: last failure ended {recovery_ms} ms after PostgreSQL was back (limit {limit_ms} ms); "
      f"{ok_after_recovery} successful requests after it; first success "
      f"{'n/a' if first_ok is None else f'{first_ok - t_up:+d} ms'} from pg_ctl's ready (negative: PostgreSQL "
      f"answered before pg_ctl noticed)")
print(f"  server still running: {alive}; ledger invariant: {ledger}; charge rows in the ledger: {charge_rows}, "
      f"201s k6 saw: {sum(1 for r in reqs if r[3] == 'charge' and r[2] == 201)}")
problems = []
if not reqs: problems.append("no requests logged")
if any(not ok(r) for r in before): problems.append("failures before the stop")
if not failures: problems.append("no failure seen: the outage was not observed")
if not_503: problems.append(f"{len(not_503)} failures that are not 503 problem+json")
if no_answer: problems.append(f"{len(no_answer)} requests without an answer")
if slow_fail: problems.append(f"{len(slow_fail)} failures slower than {fast_limit} ms")
if recovery_ms > int(limit_ms): problems.append(f"recovery took {recovery_ms} ms")
if ok_after_recovery == 0: problems.append("no success after the outage")
if alive != "yes": problems.append("the server died")
if ledger != "PASS": problems.append("ledger invariant broken")
verdict = "PASS" if not problems else "FAIL"
print(f"VERDICT pg-restart: {verdict} — {len(failures)} requests failed during the outage, all 503 problem+json: "
      f"{'yes' if not not_503 else 'no'}, slowest failure {fail_ms[-1] if fail_ms else 0} ms (limit {fast_limit}), "
      f"recovered {recovery_ms} ms after PostgreSQL's return (limit {limit_ms}), server alive: {alive}, ledger: {ledger}"
      + (f"; problems: {'; '.join(problems)}" if problems else ""))
sys.exit(0 if not problems else 1)
PY
