#!/usr/bin/env bash
# The job benchmark (issue 5): the overhead of a scrape job over the raw fetch of the same
# page, and the answer time while the target host's circuit breaker is open.
#   load/bench/jobs-bench.sh             (DURATION=10s per scenario, VUS=16 by default)
# Runs load/k6/jobs-bench.js through load/run.sh: fresh database, server and local upstream;
# the server keeps an opened breaker open for an hour (KEYMETER_BREAKER_OPEN_SECS) so the
# measurement sees no half-open probe. Ten scenarios one after the other (about
# 10 × (DURATION + 2 s)); prints the table and the two comparisons.
set -euo pipefail
cd "$(dirname "$0")/../.." # the repository root: every path below is relative to it
export DURATION=${DURATION:-10s} VUS=${VUS:-16}
exec load/run.sh jobs-bench.js --quiet "$@"
