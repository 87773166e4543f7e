#!/usr/bin/env bash
# Runs the standard knsq-bench figures against a fresh release broker on loopback:
# publish with MPUB batches of 200, publish one message at a time, consume with RDY 2500;
# 200-byte messages, RUNFOR each (default 10s). MODE picks the broker's storage:
#   memory (default, --mem-queue-size=1000000 as in nsq's published figures),
#   disk (--mem-queue-size=0: every message through disk), or
#   sync (--sync-publish: every publish fsynced before OK; 4 publishers to show group commit).
# WIRE picks what every bench connection negotiates in IDENTIFY:
#   plain (default), tls (a throwaway CA and server certificate made with openssl),
#   snappy, or deflate.
# Extra arguments go to knsq-broker. Prints one line per workload and the broker's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-memory}
WIRE=${WIRE:-plain}
RUNFOR=${RUNFOR:-10s}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p broker -p tests --bin knsq-broker --bin knsq-bench
DATA=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
case "$MODE" in
  memory) FLAGS=(--mem-queue-size=1000000); WRITERS=1 ;;
  disk) FLAGS=(--mem-queue-size=0); WRITERS=1 ;;
  sync) FLAGS=(--sync-publish); WRITERS=4 ;;
  *) echo "MODE must be memory, disk or sync" >&2; exit 2 ;;
esac
case "$WIRE" in
  plain) WIRE_FLAGS=() ;;
  tls)
    # P-256 keys: quick to make, and the handshake is not what is measured.
    EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${EC[@]}" -keyout "$DATA/ca-key.pem" -out "$DATA/ca.pem" -days 1 \
      -subj "/CN=knsq bench CA" -addext basicConstraints=critical,CA:TRUE \
      -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req "${EC[@]}" -keyout "$DATA/server-key.pem" -out "$DATA/server.csr" \
      -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$DATA/ext"
    openssl x509 -req -in "$DATA/server.csr" -CA "$DATA/ca.pem" -CAkey "$DATA/ca-key.pem" \
      -CAcreateserial -days 1 -extfile "$DATA/ext" -out "$DATA/server.pem" 2>/dev/null
    FLAGS+=(--tls-cert="$DATA/server.pem" --tls-key="$DATA/server-key.pem")
    WIRE_FLAGS=(--tls --tls-root-ca-file "$DATA/ca.pem") ;;
  snappy) WIRE_FLAGS=(--snappy) ;;
  deflate) WIRE_FLAGS=(--deflate) ;;
  *) echo "WIRE must be plain, tls, snappy or deflate" >&2; exit 2 ;;
esac
"$TARGET/release/knsq-broker" --tcp-address=127.0.0.1:0 --http-address=127.0.0.1:0 \
  --data-path="$DATA" --log-level=warn "${FLAGS[@]}" "$@" 2>"$DATA/log" &
PID=$!
# --log-level=warn hides the listening lines; find the port from the socket table instead.
for _ in $(seq 50); do
  ADDR=$(ss -Hltnp 2>/dev/null | awk -v pid="pid=$PID," '$0 ~ pid {print $4}' | head -n 2 | sort | head -n 1)
  [ -n "$ADDR" ] && break
  sleep 0.1
done
ADDRS=$(ss -Hltnp | awk -v pid="pid=$PID," '$0 ~ pid {print $4}')
BENCH="$TARGET/release/knsq-bench"
for a in $ADDRS; do
  # The TCP port answers the NSQ magic; the HTTP one does not take "  V2".
  if "$BENCH" writer --address "$a" --topic probe --batch-size 1 --count 1 --runfor 2s >/dev/null 2>&1; then TCP=$a; fi
done
echo "mode=$MODE wire=$WIRE broker=$TCP runfor=$RUNFOR"
# PUB first, on an empty broker: the 10M messages MPUB leaves queued would slow it down.
"$BENCH" writer --address "$TCP" --topic pub --size 200 --batch-size 1 --runfor "$RUNFOR" -c "$WRITERS" ${WIRE_FLAGS[@]+"${WIRE_FLAGS[@]}"}
"$BENCH" writer --address "$TCP" --topic mpub --size 200 --batch-size 200 --runfor "$RUNFOR" -c "$WRITERS" ${WIRE_FLAGS[@]+"${WIRE_FLAGS[@]}"}
"$BENCH" reader --address "$TCP" --topic mpub --size 200 --rdy 2500 --runfor "$RUNFOR" ${WIRE_FLAGS[@]+"${WIRE_FLAGS[@]}"}
echo "broker peak RSS: $(awk '/VmHWM/ {print $2, $3}' /proc/$PID/status)"
