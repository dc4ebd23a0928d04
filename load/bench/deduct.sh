#!/usr/bin/env bash
# Deduction throughput, HTTP vs the bare database, measured in one run:
#   1. wrk (load/bench/deduct.lua): POST /v1/credits/charge {"amount":1} with CLIENTS connections
#      for DURATION, over 1000 accounts, then on one hot account — group commit on
#      (KEYMETER_CHARGE_COALESCING=true, the default) and off;
#   2. pgbench: the bare single-statement UPDATE … WHERE credit_balance >= 1 with the same
#      client count and duration, over 1000 accounts and over one.
# Prints each rate (successful charges per second) and the ratios; fails if any charge was
# refused or errored, or the ledger invariant is broken. Loopback only; every step has a
# fixed duration.
#
# Why wrk and not k6 here: both sides of the ratio should be driven by clients of the same
# weight. pgbench is a small C program; k6 spends about 0.6 of a core on 5,000 requests/s,
# which on a 2-core machine shared with the server and PostgreSQL makes k6 itself the
# ceiling. load/k6/deduct.js is the same scenario for k6 (load/run.sh deduct.js).
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh
DURATION=${DURATION:-15s}
CLIENTS=${CLIENTS:-${VUS:-32}}
ACCOUNTS=${ACCOUNTS:-1000}
secs=${DURATION%s}

ensure_tools wrk

load_init
load_build
create_database

# new_accounts N FILE: N internal-tier accounts; their keys in FILE.
new_accounts() { admin_accounts "$1" internal 1000000000 "$2"; }

# charge_rate NAME KEYS_FILE: wrk against the server; prints successful charges per second.
charge_rate() {
    local out=$OUT_DIR/deduct-$1.txt
    KEYS_FILE=$2 wrk -t2 -c"$CLIENTS" -d"$DURATION" --latency -s load/bench/deduct.lua \
        "$BASE_URL/v1/credits/charge" >"$out"
    local total bad
    total=$(sed -nE 's/^ *([0-9]+) requests in .*/\1/p' "$out")
    bad=$(sed -nE 's/^ *Non-2xx or 3xx responses: ([0-9]+)/\1/p' "$out")
    bad=${bad:-0}
    local errors
    errors=$(grep -c '^ *Socket errors' "$out" || true)
    log "$1: $total requests, $bad not 201, p50 $(awk '$1=="50%"{print $2}' "$out"), p99 $(awk '$1=="99%"{print $2}' "$out")"
    if [ "$bad" != 0 ] || [ "$errors" != 0 ]; then
        log "$1: charges failed (see $out)"
        return 1
    fi
    python3 -c "print(f'{$total / $secs:.0f}')"
}

start_server server
new_accounts "$ACCOUNTS" "$OUT_DIR/deduct-keys-many.txt"
new_accounts 1 "$OUT_DIR/deduct-keys-hot.txt"
http_many=$(charge_rate many "$OUT_DIR/deduct-keys-many.txt")
http_hot_coalesced=$(charge_rate hot-coalesced "$OUT_DIR/deduct-keys-hot.txt")
stop_pid "$SERVER_PID"
start_server server-plain KEYMETER_CHARGE_COALESCING=false
http_hot_plain=$(charge_rate hot-plain "$OUT_DIR/deduct-keys-hot.txt")
stop_pid "$SERVER_PID"
check_ledger_invariant

# The bare UPDATE, on the same schema in the same database server (its own database).
db_psql >/dev/null <<SQL
CREATE TABLE bench_ids (n int PRIMARY KEY, id uuid NOT NULL);
INSERT INTO accounts (id, email, tier, credit_balance)
SELECT gen_random_uuid(), 'bare' || g || '@example.com', 'internal', 1000000000
  FROM generate_series(1, $ACCOUNTS) g;
INSERT INTO bench_ids SELECT row_number() OVER (ORDER BY id), id FROM accounts WHERE email LIKE 'bare%';
VACUUM ANALYZE;
SQL
pgb=$(pg_bindir)/pgbench
bare() { # $1 = number of accounts to spread over
    printf '\\set n random(1, %s)\nUPDATE accounts SET credit_balance = credit_balance - 1 WHERE id = (SELECT id FROM bench_ids WHERE n = :n) AND credit_balance >= 1;\n' "$1" >"$OUT_DIR/bare.sql"
    "$pgb" -n -c "$CLIENTS" -j 2 -T "$secs" -f "$OUT_DIR/bare.sql" "$DB_URL" 2>/dev/null |
        sed -nE 's/^tps = ([0-9.]+).*/\1/p' | cut -d. -f1
}
bare_many=$(bare "$ACCOUNTS")
bare_hot=$(bare 1)
ratio() { python3 -c "print(f'{float($1)/float($2):.2f}')"; }
cat <<REPORT
deductions/s, ${CLIENTS} clients, ${DURATION} each, same run:
  ${ACCOUNTS} accounts: HTTP ${http_many}   bare UPDATE ${bare_many}   ratio $(ratio "$http_many" "$bare_many") (target >= 0.8)
  one account:   HTTP coalesced ${http_hot_coalesced}   HTTP one commit each ${http_hot_plain}   bare UPDATE ${bare_hot}
                 coalesced / one-commit-each = $(ratio "$http_hot_coalesced" "$http_hot_plain") (target >= 3)
REPORT
