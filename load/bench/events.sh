#!/usr/bin/env bash
# The account-event pipeline under load, next to the deductions measured in the same run:
#   1. wrk charges (POST /v1/credits/charge {"amount":1}, CLIENTS connections, DURATION, over
#      ACCOUNTS accounts) with no events flowing: the deductions baseline;
#   2. the same charges while events are recorded at RATE per second (spread over the same
#      accounts, each with one webhook endpoint at the local upstream's /hook): deductions/s
#      with the pipeline busy, and events delivered per second to the receiver;
#   3. after the producer stops: how long until every queued delivery arrived (the backlog's
#      drain), and that each arrived exactly once.
# Events are inserted into `events` with psql (the fan-out trigger queues the deliveries as
# any recording transaction would): the charge path records none of its own yet, and the
# operator's grant API would make curl, not keymeter, the bottleneck. Loopback only; every
# step has a fixed duration or a bounded wait.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh
DURATION=${DURATION:-15s}
CLIENTS=${CLIENTS:-${VUS:-32}}
ACCOUNTS=${ACCOUNTS:-100}
RATE=${RATE:-500}
DRAIN_SECS=${DRAIN_SECS:-60}
secs=${DURATION%s}

if ! command -v wrk >/dev/null; then
    log "wrk not found; installing it with apt-get"
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq wrk >&2
fi

load_init
load_build
create_database
start_upstream
start_server server

# ACCOUNTS internal-tier accounts, each with one endpoint at the upstream's /hook.
keys=$OUT_DIR/events-keys.txt
seq 1 "$ACCOUNTS" | xargs -P 8 -I{} curl -fsS --max-time 10 \
    -H "Authorization: Bearer $LOAD_ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d "{\"email\":\"events{}-$(random_suffix)@example.com\",\"tier\":\"internal\",\"credits\":1000000000}" \
    "$BASE_URL/admin/accounts" | grep -o '"api_key":"[^"]*"' | cut -d'"' -f4 >"$keys"
[ "$(wc -l <"$keys")" = "$ACCOUNTS" ] || { log "created $(wc -l <"$keys") of $ACCOUNTS accounts"; exit 1; }
xargs -P 8 -I{} curl -fsS --max-time 10 -o /dev/null \
    -H "Authorization: Bearer {}" -H 'Content-Type: application/json' \
    -d "{\"url\":\"$UPSTREAM_URL/hook\",\"events\":[\"credits.granted\"]}" \
    "$BASE_URL/v1/webhook-endpoints" <"$keys"
endpoints=$(db_psql -c "SELECT count(*) FROM webhook_endpoints")
[ "$endpoints" = "$ACCOUNTS" ] || { log "$endpoints endpoints for $ACCOUNTS accounts"; exit 1; }

# charge_rate NAME: wrk against the server; prints successful charges per second.
charge_rate() {
    local out=$OUT_DIR/events-charges-$1.txt
    KEYS_FILE=$keys wrk -t2 -c"$CLIENTS" -d"$DURATION" --latency -s load/bench/deduct.lua \
        "$BASE_URL/v1/credits/charge" >"$out"
    local total bad
    total=$(sed -nE 's/^ *([0-9]+) requests in .*/\1/p' "$out")
    bad=$(sed -nE 's/^ *Non-2xx or 3xx responses: ([0-9]+)/\1/p' "$out")
    log "$1: $total requests, ${bad:-0} not 201, p50 $(awk '$1=="50%"{print $2}' "$out"), p99 $(awk '$1=="99%"{print $2}' "$out")"
    [ "${bad:-0}" = 0 ] || { log "$1: charges failed (see $out)"; return 1; }
    python3 -c "print(f'{$total / $secs:.0f}')"
}
delivered() { curl -fsS --max-time 5 "$UPSTREAM_URL/stats" | grep -o '"hook_deliveries":[0-9]*' | cut -d: -f2; }

quiet=$(charge_rate quiet)

# The producer: every 100 ms, RATE/10 events over the accounts, for DURATION + 2 s (so it
# covers the whole charge run), in one statement each (one transaction, like a group commit).
# Rows go in in account-id order: each row's foreign key share-locks its account, and the
# charge path locks accounts FOR UPDATE in id order, so any other order could deadlock with it.
per_tick=$((RATE / 10))
ticks=$(((secs + 2) * 10))
produce() {
    local i
    for i in $(seq 1 "$ticks"); do
        db_psql -c "INSERT INTO events (id, account_id, type, payload)
            SELECT 'evt_' || md5(random()::text || clock_timestamp()::text || g), a.id,
                   'credits.granted', jsonb_build_object('amount', 1, 'source', 'load')
              FROM generate_series(1, $per_tick) g
              JOIN LATERAL (SELECT id FROM accounts WHERE tier = 'internal'
                             ORDER BY id OFFSET (g * 7919 + $i) % $ACCOUNTS LIMIT 1) a ON true
             ORDER BY a.id" >/dev/null
        sleep 0.1
    done
}
before=$(delivered)
start=$(now_ms)
produce &
producer=$!
LOAD_PIDS+=("$producer")
sleep 1
busy_start_delivered=$(delivered)
busy_start=$(now_ms)
busy=$(charge_rate busy)
busy_end=$(now_ms)
busy_end_delivered=$(delivered)
wait "$producer"
produced=$(db_psql -c "SELECT count(*) FROM events WHERE payload->>'source' = 'load'")
produced_ms=$(($(now_ms) - start))
# Drain: every delivery arrives, within DRAIN_SECS.
deadline=$(($(date +%s) + DRAIN_SECS))
while :; do
    pending=$(db_psql -c "SELECT count(*) FROM event_deliveries WHERE delivered_at IS NULL")
    [ "$pending" = 0 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { log "$pending deliveries still pending after ${DRAIN_SECS}s"; exit 1; }
    sleep 0.2
done
drained_ms=$(($(now_ms) - start))
received=$(($(delivered) - before))
attempts=$(db_psql -c "SELECT coalesce(sum(attempts), 0) FROM event_deliveries")
lag=$(db_psql -F ', ' -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric),
                           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric)
                      FROM (SELECT extract(epoch FROM d.delivered_at - e.created_at) * 1000 AS ms
                              FROM event_deliveries d JOIN events e ON e.id = d.event_id) l")
stop_pid "$SERVER_PID"
check_ledger_invariant
[ "$received" = "$produced" ] || { log "received $received deliveries for $produced events"; exit 1; }
[ "$attempts" = "$produced" ] || { log "$attempts attempts for $produced deliveries (retries or duplicates)"; exit 1; }
rate() { python3 -c "print(f'{$1 * 1000 / max($2, 1):.0f}')"; }
cat <<REPORT
event pipeline, ${ACCOUNTS} accounts with one endpoint each, ${CLIENTS} charge clients, ${DURATION} each, same run:
  deductions/s: quiet ${quiet}   with events flowing ${busy}   ratio $(python3 -c "print(f'{$busy / $quiet:.2f}')")
  events: ${produced} recorded over $((produced_ms / 1000)) s ($(rate "$produced" "$produced_ms")/s; asked for ${RATE}/s); delivered during the charge run $(rate $((busy_end_delivered - busy_start_delivered)) $((busy_end - busy_start)))/s
  all ${received} delivered once each (${attempts} attempts) $((drained_ms - produced_ms)) ms after the producer stopped
  commit-to-delivery latency p50, p99 (ms): ${lag}
REPORT
