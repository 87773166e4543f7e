#!/usr/bin/env bash
# Operator tests that need more than cargo: the Helm chart (real Helm engine through
# helm-python-sdk, strict schema validation through kubernetes-validate), the reconciler
# against a real kube-apiserver + etcd on loopback, with RBAC and the chart's ClusterRole, and the
# end-to-end suite (`--e2e` runs only that): kube-controller-manager and a kubelet stand-in running
# the operator's pods with the real binaries, in network namespaces of its own.
#
# Installs what it needs (Debian packages, Python virtualenvs) and builds kube-apiserver and
# kube-controller-manager v1.20.2 from Debian's `kubernetes` source package once, caching them
# under $KNSQ_CACHE (default ~/.cache/knsq), outside the clone. Outside CI, a tool that cannot be
# had skips its tests with a message; with CI=true it fails the run.
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
  # An `if`: a failed test of a trap under `set -e` would become the script's exit status.
  if [ -n "${RUN_DIR:-}" ]; then rm -rf "$RUN_DIR"; fi
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

# --- the end-to-end suite ------------------------------------------------------------------------
# Runs in network, mount and UTS namespaces of its own (unshare): etcd, kube-apiserver and
# kube-controller-manager on that namespace's 127.0.0.1, the operator, and the kubelet stand-in,
# whose pods get network namespaces of their own on a bridge inside it, with loopback addresses
# (127.1.S.N): Linux routes 127/8 between interfaces with route_localnet on and each namespace's
# `lo` holding only 127.0.0.1/32. Nothing touches the machine's network, every address is a
# loopback one, and it all goes away with the last process.
E2E_TOOLS=(unshare nsenter ip chroot mount hostname)
e2e_ready() {
  local tool
  [ "$(id -u)" = 0 ] || return 1
  for tool in "${E2E_TOOLS[@]}"; do command -v "$tool" >/dev/null || return 1; done
  # pynsq, as the client compatibility suite installs it.
  if ! .venv/bin/python -c 'import nsq, pytest' 2>/dev/null; then
    rm -rf .venv
    python3 -m venv .venv && .venv/bin/python -m pip install --quiet -r compat/python/requirements.txt || return 1
  fi
}

# The controllers that make and follow pods: StatefulSets, Jobs, Services' endpoints, the
# garbage collector (a deleted Job's pods) and claim protection (a claim goes once no pod uses it).
start_controller_manager() {
  "$CONTROLLER_MANAGER" --kubeconfig "$RUN_DIR/kubeconfig" \
    --controllers statefulset,job,endpoint,garbagecollector,pvc-protection \
    --leader-elect=false --port 0 --secure-port 0 --use-service-account-credentials=false \
    >"$RUN_DIR/controller-manager.log" 2>&1 &
  PIDS+=($!)
}

# Inside the private namespaces: the servers, then the suite, one test at a time.
e2e_inside() {
  ip link set lo up
  ip addr del 127.0.0.1/8 dev lo
  ip addr add 127.0.0.1/32 dev lo
  echo 1 >/proc/sys/net/ipv4/conf/all/route_localnet
  mkdir -p /run/netns
  mount -t tmpfs knsq-netns /run/netns
  start_apiserver || return 1
  # Names resolve from one hosts file the stand-in appends to; no DNS server is reachable.
  printf '127.0.0.1\tlocalhost\n' >"$RUN_DIR/hosts"
  mount --bind "$RUN_DIR/hosts" /etc/hosts
  if [ -e /etc/resolv.conf ]; then
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$RUN_DIR/resolv.conf"
    mount --bind "$RUN_DIR/resolv.conf" /etc/resolv.conf
  fi
  start_controller_manager
  mkdir -p "$RUN_DIR/e2e"
  local started=$SECONDS
  if ! KNSQ_E2E_ISOLATED=1 KNSQ_E2E_HOSTS="$RUN_DIR/hosts" KNSQ_E2E_DIR="$RUN_DIR/e2e" \
    KNSQ_TEST_KUBECONFIG="$RUN_DIR/kubeconfig" CARGO_NET_OFFLINE=true \
    cargo nextest run -p tests --locked --no-fail-fast --test operator_e2e --run-ignored only \
    --test-threads 1 --no-capture ${KNSQ_E2E_TESTS:-}; then
    log "the controller manager's log ends with:"
    tail -n 30 "$RUN_DIR/controller-manager.log" >&2
    return 1
  fi
  log "end-to-end suite: $((SECONDS - started))s"
}

run_e2e() {
  if ! e2e_ready || ! install_apt || ! build_kube; then
    unavailable "end-to-end suite: needs root, ${E2E_TOOLS[*]}, pynsq in .venv and the kube binaries"
    return 0
  fi
  # Built out here, where the network is.
  cargo build --workspace --bins --locked && cargo nextest run -p tests --locked --test operator_e2e --no-run || return 1
  unshare --net --mount --uts --propagation private -- bash scripts/test-operator.sh --e2e-inside
}

# --- main ---------------------------------------------------------------------------------------
case "${1:-}" in
  --build-only)
    # Only prepare the cached tools.
    install_apt && build_kube && python_ready
    exit $?
    ;;
  --e2e)
    # Only the end-to-end suite (KNSQ_E2E_TESTS: a test name filter).
    run_e2e
    exit $?
    ;;
  --e2e-inside)
    e2e_inside
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

log "end-to-end suite: the operator, kube-controller-manager and the kubelet stand-in"
run_e2e || status=1
exit $status
