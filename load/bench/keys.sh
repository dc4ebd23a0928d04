#!/usr/bin/env bash
# Key verification with 1,000 and with 1,000,000 keys in api_keys, in one run:
#   load/bench/keys.sh           (KEYS_SMALL=1000 KEYS_BIG=1000000 by default)
#
# One database and one server for both phases. Before each phase the table is topped up
# with filler keys by SQL (random base62 ids and random digests, one INSERT … SELECT FROM
# generate_series, as benches/verify.rs seeds them; then VACUUM ANALYZE) so that, once
# keys.js's setup has created its real keys through the admin API, api_keys holds the
# phase's size. keys.js then measures GET /v1/account with cached keys (hot) and with keys
# used for the first time (cold: one SELECT by key id in a table of that size).
#
# Environment: KEYS_SMALL, KEYS_BIG, COLD_KEYS (500), HOT_KEYS (10), VUS, DURATION, P95_MS
# (passed to keys.js), plus load/run.sh's LOAD_* settings. Extra arguments go to `k6 run`.
# Prints both phases side by side; exit code non-zero if either k6 run failed.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh

KEYS_SMALL=${KEYS_SMALL:-1000}
KEYS_BIG=${KEYS_BIG:-1000000}
export COLD_KEYS=${COLD_KEYS:-500}
export HOT_KEYS=${HOT_KEYS:-10}

load_init
ensure_k6
load_build
create_database
start_server server
create_account internal 0 # owns the filler keys

# Filler keys up to `$1` rows in api_keys once `COLD_KEYS + HOT_KEYS` real keys (and their
# account's first key) are added by keys.js. A colliding random id only skips that row, so
# it loops until the count is reached.
seed_to() {
    local target=$(($1 - COLD_KEYS - HOT_KEYS - 1)) have i
    for i in 1 2 3; do
        have=$(db_psql -c "SELECT count(*) FROM api_keys")
        [ "$have" -ge "$target" ] && break
        log "seeding $((target - have)) filler keys (api_keys has $have rows)"
        db_psql -c "
            INSERT INTO api_keys (id, account_id, name, digest, scopes)
            SELECT substr(translate(encode(decode(md5(random()::text || g::text)
                                                  || md5(g::text || random()::text), 'hex'), 'base64'),
                                    '+/=', ''), 1, 12),
                   '$ACCOUNT_ID', 'filler',
                   decode(md5(random()::text) || md5(random()::text), 'hex'),
                   ARRAY['read']
              FROM generate_series(1, $((target - have))) AS g
            ON CONFLICT (id) DO NOTHING" >/dev/null
    done
    db_psql -c "VACUUM ANALYZE api_keys" >/dev/null
}

rc=0
for phase in small big; do
    if [ "$phase" = small ]; then size=$KEYS_SMALL; else size=$KEYS_BIG; fi
    started=$(date +%s)
    seed_to "$size"
    log "seeded in $(($(date +%s) - started)) s"
    set +e
    PHASE=$phase TABLE_KEYS=$size run_k6 load/k6/keys.js "$@"
    k6_rc=$?
    set -e
    [ "$k6_rc" = 0 ] || rc=$k6_rc
    log "api_keys holds $(db_psql -c "SELECT count(*) FROM api_keys") rows after phase $phase"
done

python3 - "$OUT_DIR/keys-small.json" "$OUT_DIR/keys-big.json" <<'PY'
import json, sys
rows = [json.load(open(p)) for p in sys.argv[1:]]
f = lambda x: "n/a" if x is None else f"{x:.2f}"
print("\nkeys.sh — GET /v1/account, latency in ms (k6 over loopback)\n")
print(f"{'api_keys rows':>14} | {'hot p50':>8} {'hot p95':>8} {'hot req/s':>10} | {'cold p50':>8} {'cold p95':>8} | {'miss-hit p50':>12} {'miss-hit p95':>12}")
for r in rows:
    h, c = r["hot"], r["cold"]
    print(f"{r['table_keys']:>14} | {f(h['p50']):>8} {f(h['p95']):>8} {h['rps']:>10.0f} | {f(c['p50']):>8} {f(c['p95']):>8} | "
          f"{f(c['p50'] - h['p50']):>12} {f(c['p95'] - h['p95']):>12}")
print()
PY
exit "$rc"
