#!/usr/bin/env bash
# Operator tests that need more than cargo: the Helm chart (real Helm engine through
# helm-python-sdk, strict schema validation through kubernetes-validate) and the reconciler
# against a real kube-apiserver + etcd on loopback, with RBAC and the chart's ClusterRole.
#
# Installs what it needs (Debian packages, a Python virtualenv) and builds kube-apiserver v1.20.2
# from Debian's `kubernetes` source package once, caching it under $KNSQ_CACHE (default
# ~/.cache/knsq), outside the clone. Outside CI, a tool that cannot be had skips its tests with a
# message; with CI=true it fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${KNSQ_CACHE:-$HOME/.cache/knsq}
mkdir -p "$CACHE"

log() { printf '[test-operator] %s\n' "$*" >&2; }
unavailable() {
  if [ "${CI:-}" = "true" ]; then
    log "FAILED: $*"
    exit 1
  fi
  log "SKIPPED: $*"
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

# --- Debian packages ---------------------------------------------------------------------------
APT_PACKAGES=(golang-go etcd-server rsync dpkg-dev openssl
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
apt_ready() { dpkg-query -W -f='${Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null | grep -vc 'install ok installed' | grep -qx 0; }
install_apt() {
  apt_ready && return 0
  command -v apt-get >/dev/null || return 1
  as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
}

# A deb-src entry for every deb entry the machine already has, so `apt-get source` works
# without naming any mirror here.
enable_deb_src() {
  local dir=/etc/apt/sources.list.d changed=0 f
  for f in "$dir"/*.sources; do
    [ -e "$f" ] || continue
    case "$f" in *knsq-src*) continue ;; esac
    grep -q '^Types:.*deb-src' "$f" && continue
    local out="$dir/knsq-src-$(basename "$f")"
    [ -e "$out" ] && continue
    sed -e 's/^Types:.*/Types: deb-src/' "$f" | as_root tee "$out" >/dev/null
    changed=1
  done
  if [ -f /etc/apt/sources.list ] && ! grep -q '^deb-src' /etc/apt/sources.list; then
    local out="$dir/knsq-src-sources.list"
    if [ ! -e "$out" ]; then
      sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list | as_root tee "$out" >/dev/null
      changed=1
    fi
  fi
  if [ "$changed" = 1 ]; then as_root apt-get update -qq; fi
}

# --- kube-apiserver v1.20.2 from Debian's source package ----------------------------------------
APISERVER="$CACHE/kube-apiserver-1.20.2"
build_apiserver() {
  [ -x "$APISERVER" ] && return 0
  enable_deb_src || return 1
  local work="$CACHE/kubernetes-build"
  rm -rf "$work"
  mkdir -p "$work/src"
  log "building kube-apiserver v1.20.2 once into $APISERVER (about 5 minutes)"
  (cd "$work/src" && apt-get source -qq kubernetes >/dev/null) || return 1
  local tree
  tree=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  [ -n "$tree" ] || return 1
  mkdir -p "$work/gopath/src/k8s.io"
  mv "$tree" "$work/gopath/src/k8s.io/kubernetes"
  local k8s="$work/gopath/src/k8s.io/kubernetes"
  # The vendored reflect2 and json-iterator crash under Go 1.19 once a custom resource is
  # created; Debian ships fixed copies.
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "$k8s/vendor/$pkg"
    cp -r "/usr/share/gocode/src/$pkg" "$k8s/vendor/$pkg"
  done
  (
    cd "$k8s"
    export GOPATH="$work/gopath" GO111MODULE=off GOFLAGS= GOCACHE="$work/gocache" CGO_ENABLED=0
    make gen_openapi >"$work/gen_openapi.log" 2>&1
    go build -o "$APISERVER.tmp" ./cmd/kube-apiserver >"$work/build.log" 2>&1
  ) || { log "kube-apiserver build failed, see $work/*.log"; return 1; }
  mv "$APISERVER.tmp" "$APISERVER"
  rm -rf "$work"
}

if [ "${1:-}" = "--build-only" ]; then
  install_apt && build_apiserver
  exit $?
fi
