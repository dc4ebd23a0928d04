#!/usr/bin/env bash
# Drill: back up under load, restore into fresh servers, check nothing acknowledged is lost.
#   load/drills/restore.sh
#
# What docs/backup.md prescribes, end to end, on PostgreSQL servers of its own (initdb into a
# temporary directory, free ports on 127.0.0.1, as user postgres through runuser when run as
# root — the shared test server is not touched):
#
#  1. The source: a cluster with WAL archiving on (archive_command copies each finished WAL
#     segment into an archive directory), keymeter on it, ACCOUNTS accounts, and k6
#     (load/k6/drill-load.js: GET /v1/account and POST /v1/credits/charge, VUS virtual users;
#     ACKS=1 logs every acknowledged charge's ledger id and the time its 201 arrived).
#  2. After BEFORE_SECS of load: a base backup, `pg_basebackup -X stream -c fast`, while the
#     charges keep coming; `pg_verifybackup` checks it. The load runs AFTER_SECS more, then
#     stops, and `pg_switch_wal()` closes the last WAL segment so it is archived (what
#     `archive_timeout` does on its own in production).
#  3. Restore A — the base backup alone, started as a new server: PostgreSQL replays the WAL
#     streamed into the backup up to its end point. RPO: the backup's end.
#  4. Restore B — point-in-time recovery: the same base backup plus `restore_command` reading
#     the WAL archive, replayed to its end. RPO: the last archived segment.
#
# On each restored server it starts keymeter (which verifies the migrations) and checks:
#   - the ledger invariant, balance = sum of ledger deltas, for every account (SQL);
#   - every API key created before the backup still verifies: GET /v1/account with it is 200
#     and names its account;
#   - no acknowledged charge is missing: every ledger id k6 got a 201 for before the backup
#     STARTED is in restore A; every one acknowledged at all (the load ended before the last
#     WAL switch) is in restore B. Charges acknowledged after the backup started are counted
#     in restore A for the record (present or not, both are correct there);
#   - the restored service takes a new charge (201) and the invariant still holds after it.
# RTO figures: the time from starting the restore to keymeter answering /health/ready.
# Prints one line  VERDICT restore: PASS|FAIL — …  ; exit code 0 on PASS. Bounded: every wait
# has a limit; everything it started is stopped and removed at exit.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh

BEFORE_SECS=${BEFORE_SECS:-5}
AFTER_SECS=${AFTER_SECS:-5}
ACCOUNTS=${ACCOUNTS:-4}
export VUS=${VUS:-8} PACE_MS=${PACE_MS:-10} MIX=account,charge REQ_TIMEOUT=30s ACKS=1

load_init
ensure_k6
load_build
ensure_postgres_installed

pg_bin=$(pg_bindir)
work=$(mktemp -d /tmp/keymeter-drill-restore.XXXXXX)
archive=$work/wal-archive
backup=$work/base-backup
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
clusters=() # data directories of the servers started here
# shellcheck disable=SC2317 # called from the EXIT trap
pg_remove_all() {
    local d
    for d in "${clusters[@]}"; do
        if [ -f "$d/postmaster.pid" ]; then
            as_pg "$pg_bin/pg_ctl" -D "$d" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
        fi
    done
    for d in "${clusters[@]}"; do cp "$d.log" "$OUT_DIR/drill-restore-$(basename "$d").log" 2>/dev/null || true; done
    rm -rf "$work"
}
LOAD_FINAL_HOOKS+=(pg_remove_all)
if [ "$(id -u)" = 0 ]; then chown postgres: "$work"; fi
as_pg mkdir -p "$archive"

# pg_start DATA_DIR PORT [postgres -c options…]
pg_start() {
    local data=$1 port=$2
    shift 2
    clusters+=("$data")
    as_pg "$pg_bin/pg_ctl" -D "$data" -l "$data.log" -w -t 120 \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' $*" start >/dev/null
}
pg_stop() { as_pg "$pg_bin/pg_ctl" -D "$1" -m fast -w -t 60 stop >/dev/null; }

# --- 1. the source, under load --------------------------------------------------------------
src_data=$work/source
src_port=$(free_port)
log "initdb the source cluster in $src_data (PostgreSQL from $pg_bin)"
as_pg "$pg_bin/initdb" -D "$src_data" -U postgres -A trust -E UTF8 --no-sync >/dev/null
pg_start "$src_data" "$src_port" -c wal_level=replica -c archive_mode=on \
    -c "archive_command='test ! -f $archive/%f && cp %p $archive/%f'"
log "source PostgreSQL on 127.0.0.1:$src_port, archiving WAL to $archive"

create_database "postgres://postgres@127.0.0.1:$src_port/postgres"
SRC_DB_URL=$DB_URL
start_server restore-source
SRC_BASE_URL=$BASE_URL
keys=()
accounts=()
for _ in $(seq 1 "$ACCOUNTS"); do
    create_account internal 1000000
    keys+=("$API_KEY")
    accounts+=("$ACCOUNT_ID")
done
KEYS=$(IFS=,; echo "${keys[*]}")
export KEYS

requests=$OUT_DIR/drill-restore-requests.log
rm -f "$requests"
DURATION=$((BEFORE_SECS + AFTER_SECS + 60))s LOAD_K6_EXEC=1 run_k6 load/k6/drill-load.js --quiet --console-output="$requests" &
k6_pid=$!
LOAD_PIDS+=("$k6_pid")
sleep "$BEFORE_SECS"

# --- 2. the backup, while charges commit ----------------------------------------------------
log "pg_basebackup under load"
t_backup_start=$(now_ms)
as_pg "$pg_bin/pg_basebackup" -h 127.0.0.1 -p "$src_port" -U postgres -D "$backup" \
    -X stream -c fast --no-sync
t_backup_end=$(now_ms)
log "base backup took $((t_backup_end - t_backup_start)) ms; verifying it"
as_pg "$pg_bin/pg_verifybackup" -q "$backup"
sleep "$AFTER_SECS"
log "stopping the load"
stop_pid "$k6_pid" 10
sleep 1 # a charge answered as k6 stopped is logged before k6 exits; nothing is in flight now
t_load_end=$(now_ms)
last_wal=$(PGCONNECT_TIMEOUT=5 psql "$SRC_DB_URL" -qAtX -c "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 300); do # up to 30 s for the archiver
    [ -f "$archive/$last_wal" ] && break
    sleep 0.1
done
[ -f "$archive/$last_wal" ] || { log "WAL segment $last_wal was not archived within 30 s"; exit 1; }
log "WAL switched and archived up to $last_wal"
source_charges=$(PGCONNECT_TIMEOUT=5 psql "$SRC_DB_URL" -qAtX -c "SELECT count(*) FROM credit_ledger WHERE kind = 'charge'")

# The acknowledged charges, from k6's log: <t0> <t1> <ledger id> <account id>.
acks=$OUT_DIR/drill-restore-acks.txt
sed -n 's/.*msg="ACK \([0-9]*\) \([0-9]*\) \([^ ]*\) \([^ "]*\)".*/\1 \2 \3 \4/p' "$requests" >"$acks"
acked=$(wc -l <"$acks")
[ "$acked" -gt 0 ] || { log "k6 acknowledged no charge: nothing to check"; exit 1; }

# --- 3 and 4. restores ----------------------------------------------------------------------
# restore NAME MODE: a copy of the base backup started as a new server (MODE=base: as it is;
# MODE=pitr: with the WAL archive), keymeter on it, and the checks. Appends to $results.
results=$OUT_DIR/drill-restore-results.txt
: >"$results"
restore() {
    local name=$1 mode=$2
    local data=$work/$name port
    port=$(free_port)
    log "restore $name ($mode) into $data on 127.0.0.1:$port"
    local t0
    t0=$(now_ms)
    as_pg cp -a "$backup" "$data"
    local extra=()
    if [ "$mode" = pitr ]; then
        as_pg touch "$data/recovery.signal"
        extra=(-c "restore_command='cp $archive/%f %p'" -c recovery_target_action=promote)
    fi
    pg_start "$data" "$port" "${extra[@]}"
    DB_URL="postgres://postgres@127.0.0.1:$port/$DB_NAME"
    # Recovery ends with a promotion: wait until the server takes writes.
    local i
    for i in $(seq 1 600); do
        [ "$(PGCONNECT_TIMEOUT=5 psql "$DB_URL" -qAtX -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && break
        sleep 0.1
    done
    start_server "restore-$name"
    for i in $(seq 1 100); do
        curl -fsS --max-time 2 "$BASE_URL/health/ready" >/dev/null 2>&1 && break
        sleep 0.1
    done
    local t_ready
    t_ready=$(now_ms)
    local invariant=PASS
    check_ledger_invariant || invariant=FAIL
    # Keys: each one still opens its own account.
    local keys_ok=0 k a body
    for i in "${!keys[@]}"; do
        k=${keys[i]}
        a=${accounts[i]}
        body=$(curl -sS --max-time 5 -H "Authorization: Bearer $k" "$BASE_URL/v1/account" || true)
        case $body in *"\"id\":\"$a\""* | *"\"id\": \"$a\""*) keys_ok=$((keys_ok + 1)) ;; esac
    done
    # The ledger ids present, to compare with the acknowledgements.
    db_psql -c "SELECT id FROM credit_ledger WHERE kind = 'charge'" >"$work/$name-ids.txt"
    local restored_charges
    restored_charges=$(wc -l <"$work/$name-ids.txt")
    # The restored service works: one more charge, then the invariant again.
    local new_charge invariant_after=PASS
    new_charge=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X POST \
        -H "Authorization: Bearer ${keys[0]}" -H 'Content-Type: application/json' \
        -d '{"amount":1}' "$BASE_URL/v1/credits/charge" || true)
    check_ledger_invariant || invariant_after=FAIL
    echo "$name $mode $((t_ready - t0)) $invariant $keys_ok ${#keys[@]} $restored_charges $new_charge $invariant_after" >>"$results"
    stop_pid "$SERVER_PID" 10
    pg_stop "$data"
}
restore base base
restore pitr pitr
DB_URL=$SRC_DB_URL # the run's database for load_cleanup's DROP: the source server's

python3 - "$acks" "$results" "$work" "$t_backup_start" "$t_backup_end" "$t_load_end" "$source_charges" <<'PY'
import sys
acks_path, results_path, work, t_bs, t_be, t_end, source_charges = sys.argv[1:]
t_bs, t_be, t_end = int(t_bs), int(t_be), int(t_end)
acks = [l.split() for l in open(acks_path) if l.strip()]
unreadable = [a for a in acks if a[2] == '-']
acks = [(int(a[0]), int(a[1]), int(a[2])) for a in acks if a[2] != '-']
before = {i for (_, t1, i) in acks if t1 < t_bs}
during = {i for (t0, t1, i) in acks if t1 >= t_bs and t0 <= t_be}
after = {i for (t0, t1, i) in acks if t0 > t_be}
everything = {i for (_, _, i) in acks}
print()
print(f"restore drill — base backup {t_be - t_bs} ms under load; load ended {t_end - t_be} ms after the backup")
print(f"  acknowledged charges: {len(acks)} ({len(before)} before the backup started, {len(during)} while it ran, "
      f"{len(after)} after it ended); the source's ledger holds {source_charges} charges")
problems = []
if unreadable: problems.append(f"{len(unreadable)} acknowledgements without a ledger id")
if not before: problems.append("no charge acknowledged before the backup: the drill proved nothing")
summary = []
for line in open(results_path):
    name, mode, rto_ms, inv, keys_ok, keys_n, restored_n, new_charge, inv_after = line.split()
    ids = {int(x) for x in open(f"{work}/{name}-ids.txt").read().split()}
    must = before if mode == "base" else everything
    missing = must - ids
    got_during = len(during & ids)
    got_after = len(after & ids)
    label = "base backup only" if mode == "base" else "base backup + WAL archive (PITR)"
    print(f"  restore {name} ({label}): ready in {rto_ms} ms; ledger invariant {inv}; keys verifying {keys_ok}/{keys_n}; "
          f"{restored_n} charges restored; acknowledged charges required {len(must)}, missing {len(missing)}; "
          f"of those acknowledged during / after the backup: {got_during}/{len(during)}, {got_after}/{len(after)} present; "
          f"new charge {new_charge}, invariant after it {inv_after}")
    if inv != "PASS" or inv_after != "PASS": problems.append(f"{name}: ledger invariant broken")
    if keys_ok != keys_n: problems.append(f"{name}: {int(keys_n) - int(keys_ok)} keys do not verify")
    if missing: problems.append(f"{name}: {len(missing)} acknowledged charges missing (e.g. {sorted(missing)[:5]})")
    if new_charge != "201": problems.append(f"{name}: a new charge answered {new_charge}")
    summary.append(f"{name}: {len(must) - len(missing)}/{len(must)} required charges, keys {keys_ok}/{keys_n}, invariant {inv}, ready in {rto_ms} ms")
verdict = "PASS" if not problems else "FAIL"
print(f"VERDICT restore: {verdict} — backup under load of {len(acks)} acknowledged charges; "
      + "; ".join(summary) + (f"; problems: {'; '.join(problems)}" if problems else ""))
sys.exit(0 if not problems else 1)
PY
