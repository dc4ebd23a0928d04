#!/usr/bin/env bash
# Deduction throughput, HTTP vs the bare database, measured in one run:
#   1. k6 (load/deduct.js through load/run.sh): POST /v1/credits/charge over 1000 accounts,
#      then one hot account with group commit on and off (KEYMETER_CHARGE_COALESCING);
#   2. pgbench: the bare single-statement UPDATE … WHERE credit_balance >= 1 with the same
#      client count and duration, over 1000 accounts and over one.
# Prints each rate and the ratios. Loopback only; every step has a fixed duration.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
DURATION=${DURATION:-15s}
VUS=${VUS:-32}
secs=${DURATION%s}
export KEYMETER_ADMIN_TOKEN=${KEYMETER_ADMIN_TOKEN:-load-admin-token-0123456789abcdef0123}
out=load/out; mkdir -p "$out"

cargo build --release --locked --bin keymeter --example upstream
run_k6() { # $1 accounts, $2 coalescing
    KEYMETER_CHARGE_COALESCING=$2 ACCOUNTS=$1 DURATION=$DURATION VUS=$VUS LOAD_SKIP_BUILD=1 \
        load/run.sh deduct.js --quiet | grep '^deduct.js' | sed -E 's/.*rate=([0-9.]+).*/\1/'
}
http_many=$(run_k6 1000 true)
http_hot_coalesced=$(run_k6 1 true)
http_hot_plain=$(run_k6 1 false)

server_url=$(ensure_test_database_url)
db=keymeter_pgbench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
admin=${server_url%/*}
trap 'psql "$server_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
psql "$server_url" -qc "CREATE DATABASE $db" >/dev/null
db_url=$admin/$db
DATABASE_URL=$db_url KEYMETER_LOG=warn target/release/keymeter migrate >/dev/null
psql "$db_url" -q >/dev/null <<SQL
INSERT INTO accounts (id, email, tier, credit_balance)
SELECT gen_random_uuid(), 'b' || g || '@example.com', 'internal', 1000000000 FROM generate_series(1, 1000) g;
CREATE TABLE bench_ids (n int PRIMARY KEY, id uuid NOT NULL);
INSERT INTO bench_ids SELECT row_number() OVER (), id FROM accounts;
SQL
pgb=$(pg_bindir)/pgbench
bare() { # $1 = number of accounts to spread over
    printf '\\set n random(1, %s)\nUPDATE accounts SET credit_balance = credit_balance - 1 WHERE id = (SELECT id FROM bench_ids WHERE n = :n) AND credit_balance >= 1;\n' "$1" >"$out/bare.sql"
    "$pgb" -n -c "$VUS" -j 2 -T "$secs" -f "$out/bare.sql" "$db_url" 2>/dev/null | sed -nE 's/^tps = ([0-9.]+).*/\1/p'
}
bare_many=$(bare 1000)
bare_hot=$(bare 1)
ratio() { python3 -c "print(f'{float($1)/float($2):.2f}')"; }
cat <<REPORT
deductions/s, ${VUS} clients, ${DURATION} each, same run:
  1000 accounts: HTTP ${http_many}   bare UPDATE ${bare_many}   ratio $(ratio "$http_many" "$bare_many") (target >= 0.8)
  one account:   HTTP coalesced ${http_hot_coalesced}   HTTP one commit each ${http_hot_plain}   bare UPDATE ${bare_hot}
                 coalesced / one-commit-each = $(ratio "$http_hot_coalesced" "$http_hot_plain") (target >= 3)
REPORT
