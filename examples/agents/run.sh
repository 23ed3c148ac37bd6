#!/usr/bin/env bash
# Runs the example agents against a local network: a `tessera hub --dev`, one `tessera node`
# serving SmolLM2-135M, then one round of the market (curator, writer, lazy writer), printing
# the money flowing. Needs the model in ~/.cache/tessera/models (`tessera model pull`).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p tessera
cargo build -q -p tessera-agent --example agents-market
tessera=target/debug/tessera
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$tessera" hub --dev --allow-unverified --verify-probability 0 --db "sqlite://$work/hub.db" \
  --listen 127.0.0.1:0 --addr-file "$work/addr" 2>"$work/hub.log" &
for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.1; done
hub="http://$(cat "$work/addr")"
node_key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
"$tessera" node --hub "$hub" --private-key "$node_key" --price 5 --dev-stake --threads 1 2>"$work/node.log" &
for _ in $(seq 300); do
  curl -fs "$hub/v1/models" | grep -q smollm2 && break; sleep 0.3
done
target/debug/examples/agents-market "$hub"
"$tessera" ledger audit --url "sqlite://$work/hub.db"
