#!/usr/bin/env bash
# The dependencies' licenses and banned crates, checked by cargo-deny against deny.toml:
# `cargo deny check licenses bans`, offline checks only (no advisory database is fetched;
# these two checks read only Cargo.lock and the crates' manifests).
#
# cargo-deny is installed from crates.io with `cargo install --locked` when it is missing. That
# is a long compile on 2 cores, done once: it lands in ~/.cargo/bin, where later runs on the
# same machine find it.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '==> %s\n' "$*" >&2; }

# The release this deny.toml was written for (its schema changes between releases).
CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q " $CARGO_DENY_VERSION\$"; then
    log "installing cargo-deny $CARGO_DENY_VERSION (cargo install --locked; once per machine)"
    cargo install --locked --version "$CARGO_DENY_VERSION" cargo-deny
fi
cargo deny --version >&2
# cargo metadata reads every locked crate's manifest, other platforms' too: fetch them first so
# the check itself can run offline.
cargo fetch --locked >/dev/null
cargo deny --offline check licenses bans
