#!/usr/bin/env bash
# Install the headless browser the status-page tests drive (tests/test_ui_browser.py).
#
# Run as root. Idempotent: apt runs only when something is missing. Debian's own chromium
# package is used as is: the tests talk to it over the DevTools protocol (aiohttp), so no
# test tool downloads a browser build of its own.
set -euo pipefail

PACKAGES=(chromium fonts-dejavu-core)

log() { printf 'setup-browser: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup-browser: must run as root" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "packages already installed"
fi

command -v chromium >/dev/null || { echo "setup-browser: chromium is missing" >&2; exit 1; }
log "$(chromium --version 2>/dev/null || echo chromium)"
