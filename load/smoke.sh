#!/usr/bin/env bash
# A short smoke of the load suite, thresholds enforced: what .ci/run runs after the tests.
#   load/smoke.sh
# Each script for a few seconds against its own fresh database, server and upstream, with the
# debug builds the tests already made (LOAD_PROFILE=debug; LOAD_PROFILE=release for the
# optimised ones). It proves the scripts, their end checks (ledger, refunds, exactly-once
# webhooks, drained balance) and the runner work; the figures of a smoke mean nothing.
# Exit code: the first failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export LOAD_PROFILE=${LOAD_PROFILE:-debug}
# Generous latency limits: a debug build on a CI machine shared with other jobs.
export P95_MS=${P95_MS:-1000}
profile_flag=
[ "$LOAD_PROFILE" = release ] && profile_flag=--release
log "building keymeter and the upstream example ($LOAD_PROFILE)"
# shellcheck disable=SC2086 # empty or one word
cargo build --locked $profile_flag --bin keymeter --example upstream
export LOAD_SKIP_BUILD=1

started=$(date +%s)
step() {
    local t0
    t0=$(date +%s)
    log "smoke: $*"
    env "$@"
    log "smoke: passed in $(($(date +%s) - t0)) s: $*"
}
step DURATION=3s VUS=4 load/run.sh auth.js --quiet
step DURATION=3s VUS=4 load/run.sh jobs.js --quiet
step BALANCE=200 EXTRA=100 VUS=8 load/run.sh credits.js --quiet
step EVENTS=20 DUPLICATES=3 VUS=4 load/run.sh webhooks.js --quiet
step ACCOUNTS=20 DURATION=2s VUS=4 load/run.sh deduct.js --quiet
step KEYS_SMALL=1000 KEYS_BIG=10000 COLD_KEYS=100 DURATION=2s VUS=4 load/bench/keys.sh --quiet
step DURATION=1s VUS=4 ONLY=new PAUSE_S=1 load/bench/jobs-bench.sh
log "smoke: all passed in $(($(date +%s) - started)) s"
