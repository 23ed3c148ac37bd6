#!/usr/bin/env bash
# Installs the local EVM tooling from npm into a cache outside the repository: anvil (the
# `@foundry-rs/anvil` package ships the binary) and the `solc` compiler (solcjs, works offline
# once installed). Prints the line to export on its last line:
#
#   eval "$(bash scripts/setup-chain.sh | tail -n 1)"
#
# Idempotent: a second run reuses the installed packages. Installs node and npm from Debian's
# packages first if they are missing (run as root on Debian then). Everything but the final
# `export` line goes to stderr.
set -euo pipefail

CACHE_DIR=${TESSERA_CHAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera-chain}
ANVIL_VERSION=${TESSERA_ANVIL_VERSION:-latest}
SOLC_VERSION=${TESSERA_SOLC_VERSION:-0.8.26}

log() { echo "setup-chain: $*" >&2; }

if ! command -v npm >/dev/null 2>&1; then
    log "installing node and npm from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends nodejs npm >&2
fi

mkdir -p "$CACHE_DIR"
cd "$CACHE_DIR"
[ -f package.json ] || echo '{"name":"tessera-chain-tools","private":true}' >package.json

if [ ! -f node_modules/solc/index.js ]; then
    log "installing solc@$SOLC_VERSION from npm into $CACHE_DIR"
    npm install --no-audit --no-fund --loglevel=error "solc@$SOLC_VERSION" >&2
fi

find_anvil() {
    find "$CACHE_DIR/node_modules" -type f -name anvil -perm -u+x 2>/dev/null | grep -v '/\.bin/' | head -n 1
}
if [ -z "$(find_anvil)" ]; then
    log "installing @foundry-rs/anvil@$ANVIL_VERSION from npm into $CACHE_DIR"
    npm install --no-audit --no-fund --loglevel=error "@foundry-rs/anvil@$ANVIL_VERSION" >&2
fi
ANVIL=$(find_anvil)
if [ -z "$ANVIL" ]; then
    log "the @foundry-rs/anvil package installed no anvil binary for this platform"
    exit 1
fi
"$ANVIL" --version >&2

echo "export TESSERA_ANVIL=$ANVIL TESSERA_SOLCJS=$CACHE_DIR/node_modules/solc"
