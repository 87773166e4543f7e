#!/usr/bin/env bash
# Starts knsq locally: one broker on 127.0.0.1 (NSQ TCP 4150, HTTP 4151), data under
# ./.knsq-data. Extra arguments are passed to knsq-broker (e.g. --mem-queue-size=100000).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p broker --bin knsq-broker
mkdir -p .knsq-data/broker
exec target/release/knsq-broker \
  --tcp-address=127.0.0.1:4150 \
  --http-address=127.0.0.1:4151 \
  --broadcast-address=127.0.0.1 \
  --data-path=.knsq-data/broker \
  --node-id=1 \
  "$@"
