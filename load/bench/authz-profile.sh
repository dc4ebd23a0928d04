#!/usr/bin/env bash
# CPU per request of /v1/authz (free route) and of /health/live, in instructions, under
# callgrind: the machine is shared, so wall-clock ratios (load/bench/gateway.sh) move with the
# neighbours' load; instruction counts do not.
#
# One server under callgrind, warmed up (key cache filled, limiter state made); then for each
# endpoint: zero the counters, drive it with wrk for SECONDS, dump. Instructions per request
# = the dump's total / wrk's request count (the background tasks' few instructions in the
# window are included, the server's start-up is not). The dumps stay in load/out/ for
# `callgrind_annotate`.
#
# Needs valgrind and wrk (installed with apt-get when missing). LOAD_SKIP_BUILD=1 uses the
# release binary as it is.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root
. scripts/lib.sh
. load/lib.sh
SECONDS_EACH=${SECONDS_EACH:-20}
CLIENTS=${CLIENTS:-4}
ACCOUNTS=${ACCOUNTS:-100}

ensure_tools wrk valgrind
load_init
load_build
create_database

# The routes, tier and accounts of gateway.sh (/free/* is its first route).
. load/bench/gateway-setup.sh

# Accounts are made by a plain server (fast), which also runs the migrations.
start_server profile-setup KEYMETER_GATEWAY_ROUTES="$ROUTES" KEYMETER_TIERS="$TIERS"
KEYS=$OUT_DIR/profile-keys.txt
gateway_accounts "$ACCOUNTS" 1000 "$KEYS"
stop_pid "$SERVER_PID"

# The same binary under callgrind, through a wrapper start_server can run as "$KM_BIN serve".
rm -f "$OUT_DIR"/callgrind.authz.*
REAL_BIN=$KM_BIN
KM_BIN=$OUT_DIR/keymeter-under-callgrind
cat >"$KM_BIN" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file=$OUT_DIR/callgrind.authz.%p "$REAL_BIN" "\$@"
SH
chmod +x "$KM_BIN"
start_server profile KEYMETER_GATEWAY_ROUTES="$ROUTES" KEYMETER_TIERS="$TIERS"
CG_PID=$SERVER_PID

drive() { # NAME URL [lua env...]: wrk for SECONDS_EACH; prints the request count
    local name=$1 url=$2
    shift 2
    local script=()
    [ $# -gt 0 ] && script=(-s load/bench/authz.lua)
    env "$@" wrk -t1 -c"$CLIENTS" -d"${SECONDS_EACH}s" "${script[@]}" "$url" >"$OUT_DIR/profile-$name.txt"
    if grep -q 'Non-2xx\|Socket errors' "$OUT_DIR/profile-$name.txt"; then
        log "$name: refusals or errors (see $OUT_DIR/profile-$name.txt)"
        return 1
    fi
    sed -nE 's/^ *([0-9]+) requests in .*/\1/p' "$OUT_DIR/profile-$name.txt"
}

measure() { # NAME URL [lua env...]: warm-up, zero, drive, dump; prints instructions/request
    local name=$1
    SECONDS_EACH=3 drive "$@" >/dev/null
    callgrind_control -z "$CG_PID" >/dev/null 2>&1
    local n
    n=$(drive "$@")
    callgrind_control --dump="$name" "$CG_PID" >/dev/null 2>&1
    local dump
    dump=$(ls -t "$OUT_DIR"/callgrind.authz.* | head -n1)
    local ir
    ir=$(sed -nE 's/^(summary|totals): *([0-9]+).*/\2/p' "$dump" | head -n1)
    mv "$dump" "$OUT_DIR/callgrind.$name.out"
    log "$name: $n requests, $ir instructions, $((ir / n)) per request (load/out/callgrind.$name.out)"
    echo "$name $n $ir $((ir / n))" >>"$OUT_DIR/profile-summary.txt"
}

: >"$OUT_DIR/profile-summary.txt"
measure health "$BASE_URL/health/live"
measure authz-free "$BASE_URL/v1/authz" KEYS_FILE="$KEYS" URI=/free/x
stop_pid "$CG_PID" 30
cat "$OUT_DIR/profile-summary.txt"
