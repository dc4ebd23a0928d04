#!/usr/bin/env bash
# Brings keymeter up for trying it out: `keymeter dev` with its own PostgreSQL under
# ./.keymeter (installed with apt-get when missing), or $DATABASE_URL when set.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

if [ -z "${DATABASE_URL:-}" ]; then ensure_postgres_installed; fi
exec cargo run --locked --bin keymeter -- dev "$@"
