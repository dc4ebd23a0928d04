#!/usr/bin/env bash
# Runs a k6 script against a fresh local keymeter:  load/run.sh auth.js [extra k6 args]
# (the scripts are in load/k6/; a name alone is looked up there, a path is taken as given)
#
# 1. makes sure k6 is there (see "k6" in load/README.md for where it comes from);
# 2. builds target/release/keymeter and the upstream example (LOAD_SKIP_BUILD=1 skips this;
#    LOAD_PROFILE=debug uses the debug builds instead);
# 3. creates a database keymeter_load_<random> on the PostgreSQL server from
#    $TEST_DATABASE_URL / $DATABASE_URL / 127.0.0.1:5432 (scripts/lib.sh);
# 4. starts the local upstream (examples/upstream.rs) and `keymeter serve` on 127.0.0.1, on
#    ports the OS picks, the server logging warnings only, allowed to scrape the upstream;
# 5. creates an internal-tier account (no rate limits) and runs
#    `k6 run [extra args] SCRIPT` with BASE_URL, API_KEY, UPSTREAM_URL, … in its environment;
# 6. checks the ledger invariant in SQL for every account of the run (balance = sum of its
#    ledger deltas): a broken invariant fails the run even when k6 passed;
# 7. always stops the server and the upstream and drops the database, whatever happened.
#
# Traffic goes to 127.0.0.1 only. Every wait below is bounded in time, and the k6 scripts
# stop by themselves (fixed durations). Logs: load/out/server.log, load/out/upstream.log.
# Exit code: k6's (99 when a threshold failed), else 1 when the ledger check failed.
set -euo pipefail

usage() { echo "usage: load/run.sh SCRIPT.js [extra k6 args]   (e.g. load/run.sh auth.js: load/k6/auth.js)" >&2; exit 2; }
[ $# -ge 1 ] || usage
script_arg=$1
shift

invoked_from=$PWD
cd "$(dirname "$0")/.."
root=$PWD
. scripts/lib.sh
. load/lib.sh

# The script: as given (absolute, or relative to where we were called from, or to the
# repository root), else under load/k6/, where they all are.
if [ "${script_arg#/}" != "$script_arg" ] && [ -f "$script_arg" ]; then
    script=$script_arg
elif [ -f "$invoked_from/$script_arg" ]; then
    script=$(cd "$(dirname "$invoked_from/$script_arg")" && pwd)/$(basename "$script_arg")
elif [ -f "$script_arg" ]; then
    script=$root/$script_arg
elif [ -f "load/k6/$script_arg" ]; then
    script=$root/load/k6/$script_arg
else
    log "no such k6 script: $script_arg"
    usage
fi

load_init
ensure_k6
load_build

# Server settings a script needs to measure what it is about (the caller's values win).
case $(basename "$script") in
    jobs.js)
        # Every upstream page is on host 127.0.0.1, and a fifth of jobs.js's targets fail
        # on purpose: with the default (5 consecutive failures) the host's breaker would
        # open within a second and the run would measure 503s instead of refunds.
        export KEYMETER_BREAKER_FAILURES=${KEYMETER_BREAKER_FAILURES:-1000000} ;;
    jobs-bench.js)
        # The breaker this benchmark opens must stay open while it is measured: no half-open
        # probe (after 10 s by default) may close it mid-run.
        export KEYMETER_BREAKER_OPEN_SECS=${KEYMETER_BREAKER_OPEN_SECS:-3600}
        export KEYMETER_BREAKER_MAX_OPEN_SECS=${KEYMETER_BREAKER_MAX_OPEN_SECS:-3600} ;;
    timing.js)
        # Failed authentications from one IP are throttled after 20 a minute; the timing
        # drill makes thousands on purpose.
        export KEYMETER_AUTH_FAILURES_PER_MINUTE=${KEYMETER_AUTH_FAILURES_PER_MINUTE:-1000000000} ;;
esac

create_database
start_upstream
start_server server
create_account internal 1000000

set +e
run_k6 "$script" "$@"
k6_rc=$?
set -e
ledger_rc=0
check_ledger_invariant || ledger_rc=1
[ "$k6_rc" = 0 ] || exit "$k6_rc"
exit "$ledger_rc"
