#!/usr/bin/env bash
# Drill: verification time for an unknown key id vs a wrong secret vs the right key.
#   load/drills/timing.sh                  (DURATION=20s VUS=2 by default)
# Runs load/k6/timing.js through load/run.sh (fresh database and server; failed-auth throttling
# raised for the run) and prints its table and one verdict line:
#   VERDICT timing: PASS|FAIL — unknown key id vs wrong secret, medians …, |difference| … µs
# PASS when the medians differ by at most TOLERANCE_US (default 50 µs). Exit code 0 on PASS.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
export DURATION=${DURATION:-20s} VUS=${VUS:-2}
rm -f load/out/timing-summary.json
set +e
load/run.sh timing.js --quiet "$@"
rc=$?
set -e
[ -f load/out/timing-summary.json ] || { echo "VERDICT timing: FAIL — no summary (run failed, exit $rc)"; exit 1; }
pass=$(python3 -c 'import json; print(json.load(open("load/out/timing-summary.json"))["pass"])')
[ "$pass" = True ] && [ "$rc" = 0 ] && exit 0
[ "$rc" = 0 ] || echo "timing drill: the run itself failed (exit $rc)" >&2
exit 1
