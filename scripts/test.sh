#!/usr/bin/env bash
# Runs every knsq test on a fresh machine: installs what the tests need (Debian's prometheus
# package; a Python virtualenv with pynsq and nsqjs from npm, via test-compat.sh; etcd, Go and
# a kube-apiserver built once and cached outside the clone, via test-operator.sh), checks
# formatting, lints and module layering (no cycles), runs the Rust suite, then the real client
# libraries against the real binaries. Every suite runs even when an earlier one fails; the
# exit status says whether all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec </dev/null

step() { printf '\n== %s\n' "$*"; }

step "install: prometheus and promtool"
bash scripts/install-prometheus.sh

step "format, lints and module layering"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
python3 scripts/module-graph.py

step "build the binaries the tests run"
cargo build --workspace --bins --locked

status=0
step "Rust tests (unit, protocol, HTTP, Prometheus, real binaries)"
cargo nextest run --workspace --locked --no-fail-fast || status=1

step "benchmark harness smoke (seconds, knsq alone, no thresholds)"
bash scripts/bench-vs-nsqd.sh --smoke || status=1

step "client compatibility: pynsq and nsqjs against knsq-broker"
bash scripts/test-compat.sh || status=1

step "operator: Helm chart (helm-python-sdk, kubernetes-validate) and a real kube-apiserver"
bash scripts/test-operator.sh || status=1

if [[ $status -ne 0 ]]; then
  echo "scripts/test.sh: FAILED" >&2
fi
exit $status
