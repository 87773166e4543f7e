#!/usr/bin/env bash
# Runs every knsq test on a fresh machine: installs what the tests need, then checks
# formatting and lints, then runs the Rust test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
bash scripts/test-operator.sh
