#!/usr/bin/env bash
# Where a sync scrape job's time goes, seen from PostgreSQL (issue 14):
#   load/bench/jobs-profile.sh                   (this tree's release build)
#   PROFILE_BIN=target/jobs-bench/keymeter-<commit> load/bench/jobs-profile.sh
#   VUS=16 ACCOUNTS=16 DURATION=5s TIER=internal load/bench/jobs-profile.sh
#
# One server on a fresh database whose sessions log every statement with its duration
# (ALTER DATABASE … SET log_min_duration_statement = 0: that database only, set before the
# server connects, so nothing else on the PostgreSQL server is affected). After a warm-up, k6
# runs sync scrapes of the local 10 KiB page (VUS VUs over ACCOUNTS accounts of tier TIER,
# `bench` = the jobs-bench tier: max_concurrent_jobs 50 enforced) for DURATION; then
# load/bench/jobs-profile.py reads the PostgreSQL log lines of that database and window and
# prints, per job: commits (pg_stat_database), transactions, round trips (parse, bind+execute,
# simple statements), each statement's count and time, and the job's phases from the jobs
# table (queued → running → finished) next to the latency k6 saw.
#
# The statement log costs time itself: take the latencies from jobs-bench.sh, the counts
# from here. Needs read access to the PostgreSQL server's log (PG_LOG, default the newest
# /var/log/postgresql/postgresql-*.log): a local server.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. load/lib.sh

export DURATION=${DURATION:-3s} VUS=${VUS:-1}
ACCOUNTS=${ACCOUNTS:-1}
TIER=${TIER:-bench}
PG_LOG=${PG_LOG:-$(ls -t /var/log/postgresql/postgresql-*.log 2>/dev/null | head -n1)}
[ -r "$PG_LOG" ] || { log "cannot read the PostgreSQL log ($PG_LOG); set PG_LOG"; exit 1; }

load_init
rm -f "$OUT_DIR"/jobs-bench-profile-*.json
ensure_k6
if [ -n "${PROFILE_BIN:-}" ]; then
    LOAD_SKIP_BUILD=1 LOAD_BINARY=$PROFILE_BIN load_build
else
    load_build
fi

TIERS_FILE=$OUT_DIR/jobs-bench-tiers.toml
cat >"$TIERS_FILE" <<'EOF'
[tiers.bench]
requests_per_minute = 1000000000
burst = 1000000
max_concurrent_jobs = 50
max_queued_jobs = 100000
EOF

create_database
PGCONNECT_TIMEOUT=5 timeout 30 psql "$DB_SERVER_URL" -qAtX -v ON_ERROR_STOP=1 \
    -c "ALTER DATABASE $DB_NAME SET log_min_duration_statement = 0" >/dev/null
start_upstream
start_server jobs-profile KEYMETER_TIERS="$TIERS_FILE"

KEYS=$(seq 1 "$ACCOUNTS" | xargs -P 4 -I{} curl -fsS --max-time 10 \
    -H "Authorization: Bearer $LOAD_ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d "{\"email\":\"profile{}-$(random_suffix)@example.com\",\"tier\":\"$TIER\",\"credits\":1000000000}" \
    "$BASE_URL/admin/accounts" | grep -o '"api_key":"[^"]*"' | cut -d'"' -f4 | paste -sd, -)
first=${KEYS%%,*}
for _ in $(seq 1 20); do # warm-up: pool connections, prepared plans, caches
    curl -fsS --max-time 10 -o /dev/null -H "Authorization: Bearer $first" -H 'Content-Type: application/json' \
        -d "{\"url\":\"$UPSTREAM_URL/page\",\"formats\":[\"metadata\"]}" "$BASE_URL/v1/scrape"
done
sleep 2

commits() { db_psql -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"; }
scenario=scrape_1vu
[ "$VUS" -gt 1 ] && scenario=$([ "$ACCOUNTS" -gt 1 ] && echo scrape_accounts || echo scrape_one)
c0=$(commits)
t0=$(db_psql -c "SELECT now()")
offset=$(stat -c %s "$PG_LOG")
log "profiling: $scenario, $VUS VU(s), $ACCOUNTS account(s) of tier $TIER, $DURATION; load average $(uptime | sed 's/.*load average: //')"
LABEL=profile SCENARIO=$scenario API_KEYS=$KEYS run_k6 load/k6/jobs-bench.js --quiet || true
sleep 2
c1=$(commits)
db_psql -F ' ' -c "SELECT count(*) FROM jobs WHERE created_at >= '$t0'" >"$OUT_DIR/jobs-profile.jobs"
# The jobs' phases, in ms: queued (created → started), running (started → finished).
db_psql -F ' ' -c "SELECT extract(epoch FROM started_at - created_at) * 1000,
                          extract(epoch FROM finished_at - started_at) * 1000
                     FROM jobs WHERE created_at >= '$t0' AND finished_at IS NOT NULL" >"$OUT_DIR/jobs-profile.phases"
tail -c +"$((offset + 1))" "$PG_LOG" >"$OUT_DIR/jobs-profile.pglog"
JOBS=$(cat "$OUT_DIR/jobs-profile.jobs") COMMITS=$((c1 - c0)) DB_NAME=$DB_NAME OUT_DIR=$OUT_DIR VUS=$VUS \
    python3 load/bench/jobs-profile.py | tee "$OUT_DIR/jobs-profile.txt"
