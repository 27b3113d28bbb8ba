#!/usr/bin/env bash
# Install the headless browser the status-page tests drive (tests/test_ui_browser.py).
#
# Run as root. Idempotent: apt runs only when something is missing. Debian's own chromium
# package is used as is: the tests talk to it over the DevTools protocol (aiohttp), so no
# test tool downloads a browser build of its own.
set -euo pipefail

PACKAGES=(chromium fonts-dejavu-core)

SETUP_NAME=setup-browser
# shellcheck source=contrib/ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
require_root

install_missing "${PACKAGES[@]}"

command -v chromium >/dev/null || { echo "setup-browser: chromium is missing" >&2; exit 1; }
log "$(chromium --version 2>/dev/null || echo chromium)"
