# shellcheck shell=bash
# Sourced by load/bench/gateway.sh and load/bench/authz-profile.sh (after load/lib.sh and
# load_init), so both measure the authorizer with the same routes, tier and accounts.
# Writes the routes file ($ROUTES) and the tiers file ($TIERS) into OUT_DIR and defines
# gateway_accounts.

ROUTES=$OUT_DIR/gateway-routes.toml
cat >"$ROUTES" <<'TOML'
[[routes]]
method = "GET"
path = "/free/*"
cost = 0
scope = "read"

[[routes]]
method = "GET"
path = "/priced/*"
cost = 1
scope = "read"

[[routes]]
method = "GET"
path = "/page"
cost = 0
scope = "read"
TOML

# A tier whose limit is checked on every request (GCRA, as for any paying tier) but never
# reached: the `internal` tier skips the limiter, which would flatter the authorizer.
TIERS=$OUT_DIR/gateway-tiers.toml
cat >"$TIERS" <<'TOML'
[tiers.bench]
requests_per_minute = 100000000
burst = 10000000
max_concurrent_jobs = 10
max_queued_jobs = 10
TOML

# gateway_accounts N CREDITS FILE: N accounts on the bench tier, CREDITS each; keys in FILE.
gateway_accounts() { admin_accounts "$1" bench "$2" "$3"; }
