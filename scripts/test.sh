#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests against a real PostgreSQL.
# Uses $TEST_DATABASE_URL or $DATABASE_URL when set, else the server on 127.0.0.1:5432,
# installing and starting PostgreSQL when it is missing; the same for Redis on 6379 (the
# shared rate-limit backend is tested against a real one). A local server without TLS gets
# ssl turned on (the TLS tests need it); chromium and chromedriver for the console's browser
# tests, installed when missing. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

TEST_DATABASE_URL=$(ensure_test_database_url)
export TEST_DATABASE_URL
ensure_test_postgres_ssl "$TEST_DATABASE_URL"
TEST_REDIS_URL=$(ensure_test_redis_url)
export TEST_REDIS_URL
ensure_test_browser
log "tests use PostgreSQL at $(printf %s "$TEST_DATABASE_URL" | sed -E "s#(//[^:/@]+):[^@]*@#\\1:***@#")"
exec cargo test --locked "$@"
