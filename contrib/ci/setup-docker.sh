#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host for dockyard's Docker runtime and its tests.
#
# Run as root. Idempotent: apt runs only when something is missing. It installs docker.io
# (dockerd 20.10 on Debian 12, with containerd, runc, docker-init and docker-proxy),
# busybox-static (the test images) and nftables (`nft`: dockyard's agent firewall), and
# checks the binaries are there. It does NOT start or enable a system Docker daemon, and it
# does not touch the host's firewall itself:
#   - the tests start their own dockerd on a private socket (tests/dockerd.py);
#   - to serve with `--runtime docker`, start the system daemon yourself
#     (systemctl start docker, or dockerd in the foreground where there is no systemd).
set -euo pipefail

PACKAGES=(docker.io busybox-static nftables)  # nftables: the agent firewall

SETUP_NAME=setup-docker
# shellcheck source=contrib/ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
require_root

install_missing "${PACKAGES[@]}"

for binary in dockerd containerd runc docker-init docker-proxy nft; do
    command -v "$binary" >/dev/null || { echo "setup-docker: $binary is missing" >&2; exit 1; }
done
log "ok: $(dockerd --version)"
