#!/usr/bin/env bash
# Client-compatibility tests: drives the real pynsq and nsqjs client libraries against the real
# knsq-broker binary. Installs what they need on a fresh machine (openssl via apt-get, a Python
# virtualenv at .venv, compat/node/node_modules, debug builds of the broker and the lookupd); a
# second run reinstalls nothing.
# Runs both suites even if the first fails; exits non-zero if anything failed.
#
# KNSQ_BROKER_BIN=/path/to/knsq-broker (KNSQ_LOOKUPD_BIN=/path/to/knsq-lookupd) skips building
# that binary and tests the one given instead.
set -euo pipefail
cd "$(dirname "$0")/.."
exec </dev/null

export CI="${CI:-true}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

stamp_matches() { # stamp_matches <stamp-file> <input-file>...
  [[ -f "$1" ]] && [[ "$(cat "$1")" == "$(cat "${@:2}" | sha256sum)" ]]
}
write_stamp() { # write_stamp <stamp-file> <input-file>...
  cat "${@:2}" | sha256sum >"$1"
}

step() { printf '\n== %s\n' "$*"; }

step "openssl: the TLS tests make their CA and certificates with the openssl CLI"
if ! command -v openssl >/dev/null 2>&1; then
  as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl
else
  echo "up to date"
fi

step "python: .venv with compat/python/requirements.txt"
if ! .venv/bin/python -c 'import sys' 2>/dev/null; then
  rm -rf .venv
  python3 -m venv .venv
fi
if ! stamp_matches .venv/.compat-requirements.sha256 compat/python/requirements.txt; then
  .venv/bin/python -m pip install --quiet -r compat/python/requirements.txt
  write_stamp .venv/.compat-requirements.sha256 compat/python/requirements.txt
else
  echo "up to date"
fi

step "node: npm ci in compat/node"
if ! stamp_matches compat/node/node_modules/.compat-lock.sha256 compat/node/package-lock.json; then
  (cd compat/node && npm ci --no-audit --no-fund)
  write_stamp compat/node/node_modules/.compat-lock.sha256 compat/node/package-lock.json
else
  echo "up to date"
fi

packages=()
[[ -z "${KNSQ_BROKER_BIN:-}" ]] && packages+=(-p broker)
[[ -z "${KNSQ_LOOKUPD_BIN:-}" ]] && packages+=(-p lookupd)
if [[ ${#packages[@]} -gt 0 ]]; then
  step "binaries: cargo build ${packages[*]}"
  cargo build "${packages[@]}" --locked
fi

status=0
step "pynsq suite: pytest compat/python"
.venv/bin/python -m pytest compat/python || status=1

step "nsqjs suite: node --test compat/node/"
node --test compat/node/ || status=1

if [[ $status -ne 0 ]]; then
  echo "test-compat: FAILED" >&2
fi
exit $status
