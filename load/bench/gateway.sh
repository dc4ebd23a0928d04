#!/usr/bin/env bash
# Gateway mode (#18), measured in one run, with the reference of each figure next to it:
#   1. /v1/authz for a free route vs /health/live (wrk, CLIENTS connections): throughput ratio
#      (target >= 0.85) and the authorizer's p99 (target < 2 ms); ROUNDS (3) rounds in turn,
#      the median round reported with every round's figures; each round also sends
#      /health/live the authorizer's own requests (key and X-Original-* headers, authz.lua),
#      reported as a second reference: the share of the gap that is the request and the client;
#   2. /v1/authz for a priced route (1 credit) over 1000 accounts, each request with a fresh
#      X-Request-Id as nginx sends it, vs the bare single-statement UPDATE (pgbench, the same
#      reference as load/bench/deduct.sh): ratio (target >= 0.8); after an unmeasured
#      WARMUP (3 s) of it and VACUUM ANALYZE, so the plans are made on tables with a history;
#   3. through nginx with deploy/nginx/keymeter.conf, one connection: p50 of a free route with
#      the auth_request subrequest vs the same upstream page through nginx without it — the
#      added latency of the authorization.
# Prints the figures and the load average before and after (the machine may be shared);
# fails if any request was refused or errored, or the ledger invariant is broken.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root
. scripts/lib.sh
. load/lib.sh
DURATION=${DURATION:-15s}
CLIENTS=${CLIENTS:-32}
ACCOUNTS=${ACCOUNTS:-1000}
secs=${DURATION%s}

ensure_tools wrk nginx
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)

load_init
load_build
create_database
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

. load/bench/gateway-setup.sh

# run_wrk NAME URL CONNECTIONS [lua-env ...]: wrk; sets RATE (req/s), P50, P99 (ms) and fails
# on any non-2xx answer or socket error.
run_wrk() {
    local name=$1 url=$2 conns=$3
    shift 3
    local out=$OUT_DIR/gateway-$name.txt script=()
    [ $# -gt 0 ] && script=(-s load/bench/authz.lua)
    env "$@" wrk -t2 -c"$conns" -d"$DURATION" --latency "${script[@]}" "$url" >"$out"
    local total bad errors
    total=$(sed -nE 's/^ *([0-9]+) requests in .*/\1/p' "$out")
    bad=$(sed -nE 's/^ *Non-2xx or 3xx responses: ([0-9]+)/\1/p' "$out")
    errors=$(grep -c '^ *Socket errors' "$out" || true)
    if [ "${bad:-0}" != 0 ] || [ "$errors" != 0 ]; then log "$name: refusals or errors (see $out)"; return 1; fi
    RATE=$(python3 -c "print(f'{$total / $secs:.0f}')")
    ms() { awk -v p="$1" '$1==p {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.3f", v}' "$out"; }
    P50=$(ms 50%)
    P99=$(ms 99%)
    log "$name: $RATE req/s, p50 $P50 ms, p99 $P99 ms"
}

start_server gateway KEYMETER_GATEWAY_ROUTES="$ROUTES" KEYMETER_TIERS="$TIERS"
gateway_accounts "$ACCOUNTS" 1000000000 "$OUT_DIR/gateway-keys.txt"

# The free route against /health/live, ROUNDS (3) times in turn: this machine's speed drifts
# by 20-40 % within minutes, and one pair measured 0.70-0.94 from run to run. The report
# gives each round and the median round (by ratio).
ROUNDS=${ROUNDS:-3}
rounds=()
for r in $(seq 1 "$ROUNDS"); do
    run_wrk "live.r$r" "$BASE_URL/health/live" "$CLIENTS"
    l_rate=$RATE l_p99=$P99
    # The same requests as the authorizer's (the key and X-Original-* headers, wrk's script):
    # what the request itself and the client cost, apart from the authorization.
    run_wrk "live-same.r$r" "$BASE_URL/health/live" "$CLIENTS" KEYS_FILE="$OUT_DIR/gateway-keys.txt" URI=/free/x
    s_rate=$RATE
    run_wrk "authz-free.r$r" "$BASE_URL/v1/authz" "$CLIENTS" KEYS_FILE="$OUT_DIR/gateway-keys.txt" URI=/free/x
    rounds+=("$(python3 -c "print(f'{$RATE / $l_rate:.4f}')") $RATE $P50 $P99 $l_rate $l_p99 $s_rate")
done
read -r _ free_rate free_p50 free_p99 live_rate live_p99 same_rate \
    <<<"$(printf '%s\n' "${rounds[@]}" | sort -g -k1,1 | sed -n "$(((ROUNDS + 1) / 2))p")"
each_ratio=$(printf '%s\n' "${rounds[@]}" | awk '{printf "%s%.2f", (NR > 1 ? ", " : ""), $1}')
each_p99=$(printf '%s\n' "${rounds[@]}" | awk '{printf "%s%s", (NR > 1 ? ", " : ""), $4}')
# Before the priced run, as load/bench/jobs-bench.sh does: WARMUP (3 s; 0 skips) of it, not
# measured, then VACUUM ANALYZE. On the fresh database's empty ledger and gateway_charges
# PostgreSQL plans sequential scans, and each connection keeps its prepared statements' plans
# until autovacuum's first analyze — up to a minute later, past the whole run: the ratio then
# swung between 0.51 and 1.07 from one run to the next, by when each connection planned.
WARMUP=${WARMUP:-3s}
if [ "$WARMUP" != 0 ]; then
    KEYS_FILE="$OUT_DIR/gateway-keys.txt" URI=/priced/x REQUEST_IDS=1 \
        wrk -t2 -c"$CLIENTS" -d"$WARMUP" -s load/bench/authz.lua "$BASE_URL/v1/authz" >/dev/null
    db_psql -c "VACUUM ANALYZE" >/dev/null
fi
run_wrk authz-priced "$BASE_URL/v1/authz" "$CLIENTS" KEYS_FILE="$OUT_DIR/gateway-keys.txt" URI=/priced/x REQUEST_IDS=1
priced_rate=$RATE priced_p99=$P99

# nginx in front of the local upstream: the recipe (with auth_request) and, on a second port,
# the same proxying without it.
start_upstream
NGINX_DIR=$OUT_DIR/nginx
rm -rf "$NGINX_DIR" && mkdir -p "$NGINX_DIR"
authed_port=$(free_port) plain_port=$(free_port)
sed "s/^    listen 80;$/    listen 127.0.0.1:$authed_port;/" deploy/nginx/keymeter.conf >"$NGINX_DIR/keymeter.conf"
user=
[ "$(id -u)" = 0 ] && user="user root;"
cat >"$NGINX_DIR/nginx.conf" <<NGINX
$user
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NGINX_DIR/body; proxy_temp_path $NGINX_DIR/proxy;
    fastcgi_temp_path $NGINX_DIR/fastcgi; uwsgi_temp_path $NGINX_DIR/uwsgi; scgi_temp_path $NGINX_DIR/scgi;
    upstream keymeter { server 127.0.0.1:$SERVER_PORT; keepalive 32; }
    upstream api { server 127.0.0.1:$UPSTREAM_PORT; keepalive 32; }
    include $NGINX_DIR/keymeter.conf;
    server {
        listen 127.0.0.1:$plain_port;
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://api;
        }
    }
}
NGINX
"$NGINX_BIN" -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -g 'daemon off;' &
LOAD_PIDS+=("$!")
for _ in $(seq 1 50); do curl -fsS -o /dev/null "http://127.0.0.1:$plain_port/page" 2>/dev/null && break; sleep 0.1; done
KEY=$(head -n1 "$OUT_DIR/gateway-keys.txt")
curl -fsS -o /dev/null -H "X-API-Key: $KEY" "http://127.0.0.1:$authed_port/page" || { log "nginx with the recipe does not answer"; cat "$NGINX_DIR/error.log" >&2; exit 1; }
cat >"$OUT_DIR/nginx-key.lua" <<LUA
wrk.headers["X-API-Key"] = "$KEY"
LUA
nginx_p50() { # NAME PORT [lua]
    local out=$OUT_DIR/gateway-$1.txt
    wrk -t1 -c1 -d"$DURATION" --latency ${3:+-s "$3"} "http://127.0.0.1:$2/page" >"$out"
    if grep -q 'Non-2xx' "$out"; then log "$1: refusals (see $out)"; return 1; fi
    awk '$1=="50%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)}; printf "%.3f", v}' "$out"
}
plain_p50=$(nginx_p50 nginx-plain "$plain_port")
authed_p50=$(nginx_p50 nginx-authz "$authed_port" "$OUT_DIR/nginx-key.lua")
stop_pid "$SERVER_PID"
check_ledger_invariant

# The bare UPDATE (the reference of load/bench/deduct.sh), on the same PostgreSQL.
db_psql >/dev/null <<SQL
CREATE TABLE bench_ids (n int PRIMARY KEY, id uuid NOT NULL);
INSERT INTO accounts (id, email, tier, credit_balance)
SELECT gen_random_uuid(), 'bare' || g || '@example.com', 'internal', 1000000000
  FROM generate_series(1, $ACCOUNTS) g;
INSERT INTO bench_ids SELECT row_number() OVER (ORDER BY id), id FROM accounts WHERE email LIKE 'bare%';
VACUUM ANALYZE;
SQL
printf '\\set n random(1, %s)\nUPDATE accounts SET credit_balance = credit_balance - 1 WHERE id = (SELECT id FROM bench_ids WHERE n = :n) AND credit_balance >= 1;\n' "$ACCOUNTS" >"$OUT_DIR/bare.sql"
bare=$("$(pg_bindir)/pgbench" -n -c "$CLIENTS" -j 2 -T "$secs" -f "$OUT_DIR/bare.sql" "$DB_URL" 2>/dev/null |
    sed -nE 's/^tps = ([0-9.]+).*/\1/p' | cut -d. -f1)

ratio() { python3 -c "print(f'{float($1)/float($2):.2f}')"; }
cat <<REPORT
gateway mode, ${CLIENTS} connections, ${DURATION} each, one run (load average after: $(cut -d' ' -f1-3 /proc/loadavg)):
  /v1/authz free route   ${free_rate}/s (p50 ${free_p50} ms, p99 ${free_p99} ms)   /health/live ${live_rate}/s (p99 ${live_p99} ms)
                         ratio $(ratio "$free_rate" "$live_rate") (target >= 0.85), p99 ${free_p99} ms (target < 2)
                         (the median of ${ROUNDS} rounds in turn; each round's ratio: ${each_ratio}; p99: ${each_p99} ms)
                         /health/live sent the authorizer's requests: ${same_rate}/s, ratio $(ratio "$free_rate" "$same_rate")
  /v1/authz priced route ${priced_rate} charges/s (p99 ${priced_p99} ms), bare UPDATE ${bare}/s over ${ACCOUNTS} accounts
                         ratio $(ratio "$priced_rate" "$bare") (target >= 0.8)
  nginx, 1 connection    p50 with auth_request ${authed_p50} ms, without ${plain_p50} ms
                         added by the authorization subrequest: $(python3 -c "print(f'{$authed_p50 - $plain_p50:.3f}')") ms at p50
REPORT
