#!/usr/bin/env bash
# The job benchmark (issues 5 and 14): sync scrape jobs of two keymeter binaries side by side,
# with the raw fetch of the same page and /health/live measured in the same run.
#   load/bench/jobs-bench.sh                 (baseline d841c24 vs this tree, DURATION=10s)
#   QUICK=1 load/bench/jobs-bench.sh         (3 s per scenario, no breaker scenarios)
#   BASE_REV=<rev> | BASE_BIN=<path>  NEW_BIN=<path>  ONLY=new|base  BREAKER=1  ROUNDS=3
#   SCENARIOS="scrape_accounts"             (only the server scenarios named)
#
# 1. Binaries. "base": BASE_BIN, else the commit BASE_REV (default d841c24, the code before
#    issue 14), checked out with `git worktree add` into a temporary directory and built with
#    `cargo build --release --locked`, once: the binary is kept as
#    target/jobs-bench/keymeter-<commit>. "new": NEW_BIN, else this tree's release build
#    (LOAD_PROFILE=debug for the debug one; LOAD_SKIP_BUILD=1 uses it as it is).
# 2. One local upstream (this tree's examples/upstream) for everything. The raw fetch of its
#    10 KiB page straight from k6 at 1 and VUS VUs: the floor.
# 3. For each binary, one after the other: a fresh database, its own server, a tiers file
#    (KEYMETER_TIERS) with a tier `bench` whose request limit is out of the way but whose
#    max_concurrent_jobs = 50 is enforced (the built-in tiers' per-minute limits would be
#    what is measured otherwise), 16 accounts on it; a WARMUP (5 s) of the 16-account
#    scenario, not measured, so the tables have a history when plans are made; then the
#    scenarios, each its own k6 run after a VACUUM ANALYZE (VACUUM=0: none):
#    /health/live at 1 and VUS VUs; POST /v1/scrape {url: page, formats: [metadata]} with
#    1 VU on one account, VUS VUs over 16 accounts, VUS VUs on one account; with BREAKER=1
#    also the open-breaker answer at 1 and VUS VUs. Between scenarios it reads
#    pg_stat_database.xact_commit + xact_rollback of the run's database: transactions per
#    job (autocommit reads included; jobs-profile.sh counts the durable commits). The
#    ledger invariant is checked, the server stopped and the database dropped before the next.
# 4. One table: rows = scenarios, columns = base, new, raw fetch, new/base and the goals of
#    issue 14. Also kept in load/out/jobs-bench-table.txt (and one JSON per k6 run).
#
# Same upstream, same client settings, same scenario order for both. The machine load
# (uptime) is printed beside each server's run: figures taken while something else compiles
# are noise; compare ratios within one run, and repeat.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh

if [ "${QUICK:-0}" = 1 ]; then
    DURATION=${DURATION:-3s}
    BREAKER=${BREAKER:-0}
fi
export DURATION=${DURATION:-10s} VUS=${VUS:-16}
BASE_REV=${BASE_REV:-d841c24}
ONLY=${ONLY:-}
BREAKER=${BREAKER:-0}
ACCOUNTS=${ACCOUNTS:-16}
PAUSE_S=${PAUSE_S:-2} # between scenarios: the server's idle work settles, stats are flushed
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-5s}
# VACUUM=1 (default): VACUUM ANALYZE the run's database before each server scenario — what
# autovacuum does within its one-minute nap — so every scenario starts from the same state
# (the previous one's dead rows gone, statistics current) whatever its order. VACUUM=0 off.
VACUUM=${VACUUM:-1}

load_init
ensure_k6
mkdir -p target/jobs-bench
rm -f "$OUT_DIR"/jobs-bench-*.json "$OUT_DIR"/jobs-bench-*.commits

# --- binaries -------------------------------------------------------------------------------
# build_base: sets BASE_PATH to the baseline binary, building it once per commit. Runs in
# this shell (not a command substitution), so an interrupted build's worktree and temporary
# directory are removed by the exit trap.
BASE_TMP=
remove_base_worktree() {
    [ -n "$BASE_TMP" ] || return 0
    git worktree remove --force "$BASE_TMP/src" >/dev/null 2>&1 || true
    rm -rf "$BASE_TMP"
    git worktree prune >/dev/null 2>&1 || true
    BASE_TMP=
}
LOAD_CLEANUP_HOOKS+=(remove_base_worktree)
build_base() {
    if [ -n "${BASE_BIN:-}" ]; then BASE_PATH=$BASE_BIN; return 0; fi
    local rev
    rev=$(git rev-parse --verify "$BASE_REV^{commit}")
    BASE_PATH=$PWD/target/jobs-bench/keymeter-$rev
    if [ -x "$BASE_PATH" ]; then log "baseline $BASE_REV ($rev): cached $BASE_PATH"; return 0; fi
    # Its own target directory: sharing this tree's would let cargo take one tree's build
    # for the other's (same package, same relative paths, fresh by mtime). Seeded with a
    # copy of this tree's release build, timestamps kept (cargo decides freshness by them),
    # so the dependencies are not compiled again; keymeter's own fingerprints and artifacts
    # are dropped from the copy, so keymeter itself is always compiled from the commit.
    local target=$PWD/target/jobs-bench/target-$rev
    rm -rf "$target"
    if [ -d target/release/deps ]; then
        log "seeding $target with a copy of this tree's release dependencies"
        mkdir -p "$target/release"
        cp -a target/release/deps target/release/build target/release/.fingerprint "$target/release/"
        rm -rf "$target"/release/.fingerprint/keymeter-* "$target"/release/deps/*keymeter* \
            "$target"/release/build/keymeter-*
    fi
    BASE_TMP=$(mktemp -d "${TMPDIR:-/tmp}/keymeter-base.XXXXXX")
    log "building baseline $BASE_REV ($rev) in $BASE_TMP/src"
    git worktree add --detach --quiet "$BASE_TMP/src" "$rev"
    (cd "$BASE_TMP/src" && CARGO_TARGET_DIR=$target cargo build --release --locked --bin keymeter)
    cp "$target/release/keymeter" "$BASE_PATH.tmp"
    mv "$BASE_PATH.tmp" "$BASE_PATH"
    remove_base_worktree
    rm -rf "$target"
}

want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

BINS=()
LABELS=()
if want base; then
    build_base
    BINS+=("$BASE_PATH")
    LABELS+=(base)
fi
if [ -n "${NEW_BIN:-}" ]; then
    LOAD_SKIP_BUILD=1 LOAD_BINARY=$NEW_BIN load_build
else
    load_build # this tree's keymeter and the upstream example
fi
if want new; then
    BINS+=("$KM_BIN")
    LABELS+=(new)
fi
NEW_BUILD_BIN=$KM_BIN

# --- the tier -------------------------------------------------------------------------------
TIERS_FILE=$OUT_DIR/jobs-bench-tiers.toml
cat >"$TIERS_FILE" <<'EOF'
# Written by load/bench/jobs-bench.sh: request limits out of the way, the job limits enforced.
[tiers.bench]
requests_per_minute = 1000000000
burst = 1000000
max_concurrent_jobs = 50
max_queued_jobs = 100000
EOF

# --- helpers --------------------------------------------------------------------------------
drop_database() {
    [ "$DB_CREATED" = 1 ] || return 0
    PGCONNECT_TIMEOUT=5 timeout 30 psql "$DB_SERVER_URL" -qAtX -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null
    DB_CREATED=0
}

# Commits (and rollbacks) of the run's database so far. The counters are flushed by each
# backend when it goes idle, at most once a second: the pause before reading lets them land.
db_commits() {
    db_psql -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
}

# new_accounts N: N accounts on tier bench; their keys, comma-separated.
new_accounts() {
    admin_accounts "$1" bench 1000000000 "$OUT_DIR/jobs-bench-keys.txt" || return 1
    paste -sd, - <"$OUT_DIR/jobs-bench-keys.txt"
}

# scenario LABEL NAME: one k6 run; with a server, the commits it caused in OUT_DIR.
K6_FAILED=()
scenario() {
    local label=$1 name=$2 before= server=0
    [ "${label#raw}" = "$label" ] && server=1 # not the raw fetch: a server and its database
    if [ "$server" = 1 ]; then
        [ "$VACUUM" = 1 ] && db_psql -c "VACUUM ANALYZE" >/dev/null
        before=$(db_commits)
    fi
    local rc=0
    LABEL=$label SCENARIO=$name API_KEYS=${KEYS:-} run_k6 load/k6/jobs-bench.js --quiet || rc=$?
    [ "$rc" = 0 ] || K6_FAILED+=("$label/$name (k6 exit $rc)")
    sleep "$PAUSE_S"
    if [ "$server" = 1 ]; then
        echo $(($(db_commits) - before)) >"$OUT_DIR/jobs-bench-$label-$name.commits"
    fi
}

# warm_up: WARMUP (default 5s; 0 skips) of the 16-account scenario, not measured, so the
# database holds a job history (jobs, ledger, events) before the plans the measured
# scenarios use are made. On the empty tables of a fresh database PostgreSQL plans
# sequential scans, and each connection keeps its prepared statements' plans until the
# tables' statistics change — in production autovacuum analyzes within a minute; a 10 s
# scenario would measure the first minute of a new install instead.
warm_up() {
    [ "$WARMUP" != 0 ] || return 0
    DURATION=$WARMUP LABEL=warmup SCENARIO=scrape_accounts API_KEYS=${KEYS:-} \
        run_k6 load/k6/jobs-bench.js --quiet >/dev/null || log "warm-up run failed (not measured)"
    rm -f "$OUT_DIR"/jobs-bench-warmup-*.json
}

SERVER_SCENARIOS=(health_1vu health scrape_1vu scrape_accounts scrape_one)
[ "$BREAKER" = 1 ] && SERVER_SCENARIOS+=(breaker_1vu breaker)
# SCENARIOS="scrape_accounts …": only those (a profile of one scenario; the table leaves
# the others blank).
[ -n "${SCENARIOS:-}" ] && read -r -a SERVER_SCENARIOS <<<"$SCENARIOS"

# note_load PART: the load average at the start of each part, for the table.
note_load() {
    local l
    l=$(uptime | sed 's/.*load average: //')
    echo "$1: $l" >>"$OUT_DIR/jobs-bench-loads.txt"
    log "$1; load average $l"
}
rm -f "$OUT_DIR/jobs-bench-loads.txt"
start_upstream

# The disk's flush time, the floor of every durable commit: pg_test_fsync's fdatasync of one
# 8 kB write (PostgreSQL's default wal_sync_method on Linux), 1 s, in load/out/ — the same
# disk as the database's on a one-disk machine. FSYNC=0 skips it.
rm -f "$OUT_DIR/jobs-bench-fsync.txt"
if [ "${FSYNC:-1}" = 1 ] && bindir=$(pg_bindir) && [ -x "$bindir/pg_test_fsync" ]; then
    timeout 60 "$bindir/pg_test_fsync" -s 1 -f "$OUT_DIR/jobs-bench-fsync.tmp" 2>/dev/null |
        awk '$1 == "fdatasync" && /usecs\/op/ {print $(NF-1); exit}' >"$OUT_DIR/jobs-bench-fsync.txt" || true
    rm -f "$OUT_DIR/jobs-bench-fsync.tmp"
    log "disk flush (fdatasync): $(cat "$OUT_DIR/jobs-bench-fsync.txt") µs"
fi

# ROUNDS > 1 interleaves: raw, base, new, raw, base, new, …; the table takes each figure's
# median over the rounds, so a drift in the machine's load hits both binaries alike.
for round in $(seq 1 "$ROUNDS"); do
    note_load "round $round raw"
    BASE_URL=
    scenario "raw.r$round" raw_1vu
    scenario "raw.r$round" raw
    for i in "${!BINS[@]}"; do
        label=${LABELS[i]}.r$round
        KM_BIN=${BINS[i]}
        note_load "round $round ${LABELS[i]} ($KM_BIN)"
        create_database
        start_server "jobs-bench-${LABELS[i]}" KEYMETER_TIERS="$TIERS_FILE" \
            KEYMETER_BREAKER_OPEN_SECS=3600 KEYMETER_BREAKER_MAX_OPEN_SECS=3600
        KEYS=$(new_accounts "$ACCOUNTS")
        [ "$(echo "$KEYS" | tr ',' '\n' | grep -c .)" = "$ACCOUNTS" ] || { log "could not create $ACCOUNTS accounts"; exit 1; }
        warm_up
        for s in "${SERVER_SCENARIOS[@]}"; do scenario "$label" "$s"; done
        check_ledger_invariant || K6_FAILED+=("$label: ledger invariant")
        stop_pid "$SERVER_PID" 20
        drop_database
    done
done
KM_BIN=$NEW_BUILD_BIN

# --- the table ------------------------------------------------------------------------------
ROUNDS=$ROUNDS BASE_NAME="${BASE_BIN:-$BASE_REV}" OUT_DIR=$OUT_DIR VUS=$VUS DURATION=$DURATION \
    python3 load/bench/jobs-table.py | tee "$OUT_DIR/jobs-bench-table.txt"

if [ "${#K6_FAILED[@]}" != 0 ]; then
    log "FAILED: ${K6_FAILED[*]}"
    exit 1
fi
