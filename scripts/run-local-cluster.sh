#!/usr/bin/env bash
# Starts a local knsq cluster: one knsq-lookupd (gRPC 127.0.0.1:4160, HTTP 127.0.0.1:4161) and
# one knsq-broker (NSQ TCP 127.0.0.1:4150, HTTP 127.0.0.1:4151) registered with it, data under
# ./.knsq-data/broker. Consumers find the broker through http://127.0.0.1:4161 as through
# nsqlookupd. Ctrl-C (or SIGTERM) stops both; if either exits, the other is stopped too.
# Extra arguments are passed to knsq-broker. KNSQ_PROFILE=debug uses a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${KNSQ_PROFILE:-release}"
if [[ "$profile" == release ]]; then
  cargo build --release -p broker -p lookupd --bins
else
  cargo build -p broker -p lookupd --bins
fi
bin="target/$profile"
mkdir -p .knsq-data/broker

"$bin/knsq-lookupd" \
  --grpc-address=127.0.0.1:4160 \
  --http-address=127.0.0.1:4161 \
  --broadcast-address=127.0.0.1 &
lookupd=$!
"$bin/knsq-broker" \
  --tcp-address=127.0.0.1:4150 \
  --http-address=127.0.0.1:4151 \
  --broadcast-address=127.0.0.1 \
  --lookupd-grpc-address=127.0.0.1:4160 \
  --data-path=.knsq-data/broker \
  --node-id=1 \
  "$@" &
broker=$!

stop() {
  trap - INT TERM
  kill -TERM "$broker" "$lookupd" 2>/dev/null || true
  wait "$broker" "$lookupd" 2>/dev/null || true
}
trap 'stop; exit 0' INT TERM
status=0
wait -n "$broker" "$lookupd" || status=$?
stop
exit "$status"
