#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian's `prometheus` package) for tests/tests/prometheus.rs.
# Idempotent: when both binaries are already present it only says so and exits.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus already installed: $(command -v prometheus), $(command -v promtool)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive

# The package's maintainer scripts try to start the service. There is no init system to start
# it with here, and the tests run their own Prometheus, so forbid service starts during the
# install with a policy-rc.d that is removed afterwards (unless one was already in place).
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi

# Refresh the package lists only when apt does not know the package yet.
if ! apt-cache show prometheus >/dev/null 2>&1; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends prometheus

# A service the package managed to start anyway would hold port 9090; the tests do not use it,
# but do not leave a stray daemon behind.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

command -v prometheus >/dev/null
command -v promtool >/dev/null
echo "installed $(prometheus --version 2>&1 | head -n 1)"
