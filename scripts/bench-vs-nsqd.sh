#!/usr/bin/env bash
# knsq side by side with the reference nsqd (nsq v1.3.0): every workload against each server
# in turn, ROUNDS rounds (alternating which goes first), one table of medians and ratios with
# the machine's load average; see docs/performance.md.
#
#   NSQ_BIN_DIR=/path/to/nsq/bin scripts/bench-vs-nsqd.sh           # the full table
#   NSQ_BIN_DIR=… SCALING=1 scripts/bench-vs-nsqd.sh                # and the scaling curves
#   scripts/bench-vs-nsqd.sh --smoke                                 # seconds; CI runs this
#
# NSQ_BIN_DIR names a directory with nsq's nsqd (and bench_writer, used when present), built
# outside this repository; without it only knsq is measured. ROUNDS
# (default 5) and RUNFOR (each run's length, default 5s) set the effort; ONLY=key,key picks
# workloads; OUT (default target/bench-vs-nsqd) receives table.md, results.json and, with
# SCALING=1, the plots scaling-*.png, drawn with matplotlib from a virtualenv made under
# ~/.cache/knsq. --smoke uses the debug binaries that `cargo build --workspace --bins` made,
# one short round and tiny counts, and checks only that every workload runs.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/bench-vs-nsqd}
args=(--out-dir "$OUT" --rounds "${ROUNDS:-5}" --runfor "${RUNFOR:-5s}" --only "${ONLY:-}")
if [[ ${1:-} == --smoke ]]; then
  BIN=$TARGET/debug
  [[ -x $BIN/knsq-broker && -x $BIN/knsq-bench ]] ||
    cargo build -q -p broker -p tests --bin knsq-broker --bin knsq-bench
  args+=(--smoke --scaling)
else
  BIN=$TARGET/release
  cargo build --release -q -p broker -p tests --bin knsq-broker --bin knsq-bench
  [[ ${SCALING:-0} == 1 ]] && args+=(--scaling)
fi
# Ten thousand connections need as many descriptors on each side, and knsq keeps three
# quarters of its limit (after a reserve) for NSQ connections: raise the limit well past that
# where allowed (root), else to the hard limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
python3 scripts/bench-vs-nsqd.py --bin-dir "$BIN" "${args[@]}"
if [[ ${1:-} != --smoke && ${SCALING:-0} == 1 ]]; then
  VENV=${KNSQ_BENCH_VENV:-$HOME/.cache/knsq/bench-venv}
  if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q matplotlib
  fi
  "$VENV/bin/python" scripts/bench-vs-nsqd.py --bin-dir "$BIN" --out-dir "$OUT" \
    --plot "$OUT/results.json"
fi
