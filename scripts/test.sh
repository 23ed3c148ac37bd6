#!/usr/bin/env bash
# The one command that runs every test, on a fresh machine with only the Rust toolchain and
# Python/pip: starts PostgreSQL for the ledger tests, fetches the real models into the cache
# ($TESSERA_HOME, default ~/.cache/tessera), then runs the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL (from Debian's packages) for the ledger's PostgreSQL tests.
if [ -z "${TESSERA_TEST_POSTGRES_URL:-}" ]; then
    eval "$(bash scripts/setup-postgres.sh | tail -n 1)"
fi
export TESSERA_TEST_POSTGRES_URL

# Chromium for the dashboard's browser test (Debian's package).
bash scripts/setup-browser.sh

# The real models (tests would also fetch them on first use; doing it once up front is clearer).
cargo build --quiet -p tessera
./target/debug/tessera model fetch all

# The tests run cheating nodes and lying verifiers: the `adversary` feature builds them in (a
# default build has none).
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --features tessera/adversary --no-fail-fast "$@"
else
    cargo test --workspace --features tessera/adversary --no-fail-fast "$@"
fi
