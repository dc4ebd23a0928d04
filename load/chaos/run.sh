#!/usr/bin/env bash
# The randomized fault run (issue #19):   load/chaos/run.sh
#   SEED=<n>        replay a fault schedule (printed at the start of every run)
#   DURATION=<s>    length of the workload in seconds (default 60; 600 for the record)
#   CLIENTS, ACCOUNTS  concurrent clients (12) and accounts (10)
#   LOAD_PROFILE=debug|release  which build to run (default debug: what the tests built)
#   LOAD_SKIP_BUILD=1           use the binaries as they are
#
# Builds keymeter and examples/chaos, initdb's a PostgreSQL cluster of its own in a temporary
# directory (a free port on 127.0.0.1; as user postgres through runuser when run as root —
# the shared server on 5432 is never touched), and runs target/<profile>/examples/chaos,
# which starts its own redis-server, three `keymeter serve` instances, the local upstream
# and receivers, drives the clients and the seeded faults, and checks the invariants.
# Output: load/out/chaos-<seed>/ (report.json, ops.jsonl, the instances' and servers' logs).
# Exit code: 0 when no invariant was violated, 1 on any violation, 2 when the run failed.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root
. scripts/lib.sh

profile=${LOAD_PROFILE:-debug}
flag=
case $profile in
    release) flag=--release ;;
    debug) ;;
    *) log "LOAD_PROFILE must be release or debug, not $profile"; exit 2 ;;
esac
if [ "${LOAD_SKIP_BUILD:-0}" != 1 ]; then
    log "building keymeter and the chaos run ($profile)"
    # shellcheck disable=SC2086 # $flag is empty or one word
    cargo build --locked $flag --bin keymeter --example chaos
fi
km_bin=$PWD/target/$profile/keymeter
chaos_bin=$PWD/target/$profile/examples/chaos
[ -x "$km_bin" ] && [ -x "$chaos_bin" ] || { log "$km_bin or $chaos_bin is missing"; exit 2; }
ensure_postgres_installed
if ! command -v redis-server >/dev/null; then
    log "redis-server not found; installing it with apt-get"
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >&2
fi

# The seed is chosen here when not given, so the output directory can carry it.
SEED=${SEED:-$(( $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % 1000000000 ))}
export SEED
out=$PWD/load/out/chaos-$SEED
rm -rf "$out"
mkdir -p "$out"

pg_bin=$(pg_bindir)
work=$(mktemp -d /tmp/keymeter-chaos.XXXXXX)
runas=
if [ "$(id -u)" = 0 ]; then runas=postgres; chown postgres: "$work"; fi
as_pg() { if [ -n "$runas" ]; then runuser -u "$runas" -- "$@"; else "$@"; fi; }

# Whatever happens, nothing the run started outlives it.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -f "$out/pids" ]; then
        while read -r pid; do
            kill -CONT "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
        done <"$out/pids"
    fi
    if [ -f "$work/data/postmaster.pid" ]; then
        as_pg "$pg_bin/pg_ctl" -D "$work/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
    cp "$work/postgres.log" "$out/postgres.log" 2>/dev/null || true
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "initdb in $work (PostgreSQL from $pg_bin)"
as_pg "$pg_bin/initdb" -D "$work/data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

set +e
CHAOS_KEYMETER_BIN=$km_bin CHAOS_PG_CTL=$pg_bin/pg_ctl CHAOS_PG_DATA=$work/data \
    CHAOS_PG_PORT=$pg_port CHAOS_PG_LOG=$work/postgres.log CHAOS_PG_RUNAS=$runas \
    CHAOS_OUT_DIR=$out "$chaos_bin" 2>&1 | tee "$out/chaos.log"
rc=${PIPESTATUS[0]}
set -e
log "chaos run finished with exit code $rc; output in load/out/chaos-$SEED/"
exit "$rc"
