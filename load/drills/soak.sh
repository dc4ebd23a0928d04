#!/usr/bin/env bash
# Drill: soak — SOAK_SECS (600) of steady mixed load (load/k6/soak.js: cached-key reads,
# charges with and without Idempotency-Key, sync and async scrape jobs, unknown keys) while
# the server's resident memory is sampled every SAMPLE_SECS (10) with `ps -o rss=`.
#   load/drills/soak.sh                 (10 minutes)
#   SOAK_SECS=120 load/drills/soak.sh   (a quick check)
# Verdict: RSS growth from the 1-minute mark (the first sample at or after 60 s; for runs
# shorter than 2 minutes, the first at or after half the run) to the last sample is under
# GROWTH_LIMIT_PCT (10) %, and k6's thresholds (errors < 1 %, p95 per scenario) passed, and
# the ledger invariant holds. Samples: load/out/drill-soak-rss.txt.
# Prints one line  VERDICT soak: PASS|FAIL — …  ; exit code 0 on PASS.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
. scripts/lib.sh
. load/lib.sh

SOAK_SECS=${SOAK_SECS:-600}
SAMPLE_SECS=${SAMPLE_SECS:-10}
GROWTH_LIMIT_PCT=${GROWTH_LIMIT_PCT:-10}

load_init
ensure_k6
load_build
create_database
start_upstream
# The badkey scenario fails authentication on purpose, 5 times a second.
start_server server KEYMETER_AUTH_FAILURES_PER_MINUTE=1000000000
create_account internal 100000000

rss_file=$OUT_DIR/drill-soak-rss.txt
: >"$rss_file"
DURATION=${SOAK_SECS}s LOAD_K6_EXEC=1 run_k6 load/k6/soak.js --quiet &
k6_pid=$!
LOAD_PIDS+=("$k6_pid")
started=$(date +%s)
# Sample until k6 is done (it stops by itself after SOAK_SECS), at most SOAK_SECS + 120 s.
while kill -0 "$k6_pid" 2>/dev/null; do
    elapsed=$(($(date +%s) - started))
    [ "$elapsed" -gt $((SOAK_SECS + 120)) ] && { log "k6 overran; stopping it"; stop_pid "$k6_pid" 5; break; }
    rss=$(ps -o rss= -p "$SERVER_PID" | tr -d ' ' || true)
    [ -n "$rss" ] || { log "the server is gone"; break; }
    echo "$elapsed $rss" >>"$rss_file"
    sleep "$SAMPLE_SECS"
done
set +e
wait "$k6_pid"
k6_rc=$?
set -e
alive=yes
kill -0 "$SERVER_PID" 2>/dev/null || alive=no
ledger=PASS
check_ledger_invariant || ledger=FAIL

python3 - "$rss_file" "$SOAK_SECS" "$GROWTH_LIMIT_PCT" "$k6_rc" "$alive" "$ledger" <<'PY'
import sys
path, soak, limit, k6_rc, alive, ledger = sys.argv[1:]
soak, limit = int(soak), float(limit)
samples = [tuple(map(int, l.split())) for l in open(path) if l.strip()]
mark = 60 if soak >= 120 else soak // 2
base = next((s for s in samples if s[0] >= mark), None)
last = samples[-1] if samples else None
print()
print("soak drill — RSS of the server (KiB) every sample:")
print("  " + ", ".join(f"{t}s {r}" for t, r in samples))
problems = []
if base is None or last is None or last[0] <= base[0]:
    problems.append("not enough samples")
    growth = float("nan")
else:
    growth = (last[1] - base[1]) * 100.0 / base[1]
    peak = max(r for _, r in samples)
    print(f"  at {base[0]} s: {base[1]} KiB; at {last[0]} s: {last[1]} KiB; peak {peak} KiB; first sample {samples[0][1]} KiB")
    if growth >= limit:
        problems.append(f"RSS grew {growth:.1f} %")
if k6_rc != "0": problems.append(f"k6 thresholds failed (exit {k6_rc})")
if alive != "yes": problems.append("the server died")
if ledger != "PASS": problems.append("ledger invariant broken")
verdict = "PASS" if not problems else "FAIL"
print(f"VERDICT soak: {verdict} — {soak} s of mixed load; RSS {base[1] if base else '?'} KiB at {base[0] if base else '?'} s → "
      f"{last[1] if last else '?'} KiB at {last[0] if last else '?'} s: {growth:+.1f} % (limit {limit:.0f} %); "
      f"k6 thresholds {'passed' if k6_rc == '0' else 'FAILED'}; server alive: {alive}; ledger: {ledger}"
      + (f"; problems: {'; '.join(problems)}" if problems else ""))
sys.exit(0 if not problems else 1)
PY
