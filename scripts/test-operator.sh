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
APT_PACKAGES=(golang-go etcd-server rsync dpkg-dev openssl curl
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
apt_ready() {
  local installed
  installed=$(dpkg-query -W -f='${Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null | grep -c 'install ok installed')
  [ "$installed" = "${#APT_PACKAGES[@]}" ]
}
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

# --- kube-apiserver and kube-controller-manager v1.20.2 from Debian's source package ------------
KUBE_VERSION=1.20.2
APISERVER="$CACHE/kube-apiserver-$KUBE_VERSION"
CONTROLLER_MANAGER="$CACHE/kube-controller-manager-$KUBE_VERSION"
# Builds whichever of the two is not cached yet, from one unpacked source tree.
build_kube() {
  local missing=() bin
  for bin in kube-apiserver kube-controller-manager; do
    [ -x "$CACHE/$bin-$KUBE_VERSION" ] || missing+=("$bin")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  enable_deb_src || return 1
  local work="$CACHE/kubernetes-build"
  rm -rf "$work"
  mkdir -p "$work/src"
  log "building ${missing[*]} v$KUBE_VERSION once into $CACHE (several minutes each)"
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
    for bin in "${missing[@]}"; do
      go build -o "$CACHE/$bin-$KUBE_VERSION.tmp" "./cmd/$bin" >"$work/build-$bin.log" 2>&1
    done
  ) || { log "kubernetes build failed, see $work/*.log"; return 1; }
  for bin in "${missing[@]}"; do
    mv "$CACHE/$bin-$KUBE_VERSION.tmp" "$CACHE/$bin-$KUBE_VERSION"
  done
  rm -rf "$work"
}

# --- Python: the chart through the real Helm engine --------------------------------------------
VENV="$CACHE/venv"
PY_PACKAGES=(pytest helm-python-sdk kubernetes-validate jsonschema pyyaml)
python_ready() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || return 1
  "$VENV/bin/python" -c 'import pytest, helm_python, jsonschema, kubernetes_validate, yaml' 2>/dev/null && return 0
  "$VENV/bin/pip" install -q "${PY_PACKAGES[@]}"
}

# --- etcd + kube-apiserver on loopback ----------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "${RUN_DIR:-}" ] && rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap "exit 143" INT TERM

# Starts etcd and kube-apiserver with token authentication (an admin in system:masters, and users
# with no rights but those the tests bind: the operator watching every namespace, the operator
# watching one, and the chart's CRD-upgrade hook) and RBAC, and writes a kubeconfig with a
# context for each (`admin`, `operator`, `operator-ns`, `crd-upgrade`) to $RUN_DIR/kubeconfig.
start_apiserver() {
  RUN_DIR=$(mktemp -d)
  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  etcd --name knsq-test --data-dir "$RUN_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "knsq-test=http://127.0.0.1:$peer_port" >"$RUN_DIR/etcd.log" 2>&1 &
  PIDS+=($!)
  openssl genrsa -out "$RUN_DIR/sa.key" 2048 2>/dev/null
  openssl rsa -in "$RUN_DIR/sa.key" -pubout -out "$RUN_DIR/sa.pub" 2>/dev/null
  local admin_token operator_token operator_ns_token upgrade_token
  admin_token=$(openssl rand -hex 16); operator_token=$(openssl rand -hex 16)
  operator_ns_token=$(openssl rand -hex 16); upgrade_token=$(openssl rand -hex 16)
  printf '%s,knsq-admin,1,"system:masters"\n%s,knsq-operator,2\n%s,knsq-operator-ns,3\n%s,knsq-crd-upgrade,4\n' \
    "$admin_token" "$operator_token" "$operator_ns_token" "$upgrade_token" >"$RUN_DIR/tokens.csv"
  "$APISERVER" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --insecure-port 0 \
    --cert-dir "$RUN_DIR/certs" --token-auth-file "$RUN_DIR/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$RUN_DIR/sa.pub" --service-account-signing-key-file "$RUN_DIR/sa.key" \
    --service-cluster-ip-range 10.96.0.0/24 --disable-admission-plugins ServiceAccount \
    --enable-priority-and-fairness=false >"$RUN_DIR/apiserver.log" 2>&1 &
  PIDS+=($!)
  cat >"$RUN_DIR/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$api_port
    insecure-skip-tls-verify: true
users:
- name: admin
  user: {token: $admin_token}
- name: operator
  user: {token: $operator_token}
- name: operator-ns
  user: {token: $operator_ns_token}
- name: crd-upgrade
  user: {token: $upgrade_token}
contexts:
- name: admin
  context: {cluster: test, user: admin}
- name: operator
  context: {cluster: test, user: operator}
- name: operator-ns
  context: {cluster: test, user: operator-ns}
- name: crd-upgrade
  context: {cluster: test, user: crd-upgrade}
current-context: admin
KUBECONFIG
  local i
  for i in $(seq 1 120); do
    if curl -skf -H "Authorization: Bearer $admin_token" "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      log "kube-apiserver ready on 127.0.0.1:$api_port"
      return 0
    fi
    sleep 0.5
  done
  log "kube-apiserver did not become ready; its log ends with:"
  tail -n 30 "$RUN_DIR/apiserver.log" >&2
  return 1
}

# --- main ---------------------------------------------------------------------------------------
case "${1:-}" in
  --build-only)
    # Only prepare the cached tools.
    install_apt && build_kube && python_ready
    exit $?
    ;;
  --serve)
    # Start etcd and kube-apiserver for hand testing; stops on Ctrl-C.
    install_apt && build_kube && start_apiserver
    log "KNSQ_TEST_KUBECONFIG=$RUN_DIR/kubeconfig"
    wait
    exit 0
    ;;
esac

status=0
if python_ready; then
  log "chart tests (helm-python-sdk, kubernetes-validate)"
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider operator/tests/chart || status=1
else
  unavailable "chart tests: could not install ${PY_PACKAGES[*]} into $VENV"
fi

if install_apt && build_kube; then
  start_apiserver || exit 1
  log "operator tests against kube-apiserver v1.20.2"
  # One at a time: they share the API server, and one of them replaces the CRD.
  if ! KNSQ_TEST_KUBECONFIG="$RUN_DIR/kubeconfig" \
    cargo nextest run -p operator --locked --no-fail-fast --test apiserver --run-ignored only --test-threads 1; then
    status=1
    log "the API server's log ends with:"
    tail -n 40 "$RUN_DIR/apiserver.log" >&2
  fi
else
  unavailable "API server tests: could not install ${APT_PACKAGES[*]} or build kube-apiserver"
fi
exit $status
