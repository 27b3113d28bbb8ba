#!/usr/bin/env bash
# Build dockyard's controller image `localhost/dockyard/controller:latest` without the build
# touching a network, like the agent sandbox image (plugins/evaluation/sandbox_image.py):
#   1. the base is the local offline image localhost/dockyard/base-python:bookworm
#      (contrib/base-image/build.sh makes it; run first when missing);
#   2. on the host, pip builds dockyard's wheel from this checkout and downloads binary
#      wheels of its dependencies (extras routers + docker) for the base's CPython and
#      glibc, and apt downloads the Debian packages of nftables (the agent firewall) and
#      ca-certificates (https fetches), with what they need that the base lacks
#      (the host must run Debian bookworm, like the base);
#   3. the engine builds contrib/controller/Containerfile from that context with no network
#      and never pulls.
#   contrib/controller/build.sh [--engine podman|docker] [--tag TAG] [--python PYTHON]
# PYTHON (default: this checkout's .venv/bin/python, else python3) must have pip.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
checkout=$(cd "$here/../.." && pwd)
engine=podman
tag=localhost/dockyard/controller:latest
base=localhost/dockyard/base-python:bookworm
python=
packages="nftables ca-certificates"
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine=${2:?engine name}; shift 2 ;;
    --tag) tag=${2:?image tag}; shift 2 ;;
    --python) python=${2:?python}; shift 2 ;;
    *) echo "usage: $0 [--engine podman|docker] [--tag TAG] [--python PYTHON]" >&2; exit 2 ;;
  esac
done
if [ -z "$python" ]; then
  python=python3
  [ -x "$checkout/.venv/bin/python" ] && python="$checkout/.venv/bin/python"
fi
log() { printf 'controller-image: %s\n' "$*"; }
die() { printf 'controller-image: error: %s\n' "$*" >&2; exit 1; }

. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] ||
  die "this host runs ${PRETTY_NAME:-an unknown system}; the nftables packages come from its apt and must fit the base image (Debian bookworm)"
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (apt-get install python3-pip)"

if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
  log "building the base image first"
  bash "$checkout/contrib/base-image/build.sh" --engine "$engine"
fi

context=$(mktemp -d "${TMPDIR:-/tmp}/dockyard-controller-XXXXXX")
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels" "$context/debs"
cp "$here/Containerfile" "$context/Containerfile"

# What the base has: its Python (for the wheels) and its Debian packages (for the debs).
probe=$("$engine" run --rm --network none "$base" sh -c \
  'python3 -c "import platform; print(platform.python_version(), platform.machine(), platform.libc_ver()[1])"; dpkg-query -W -f="\${Package}\n"')
read -r py_version machine glibc <<<"$(head -n1 <<<"$probe")"
installed=$(tail -n +2 <<<"$probe")
log "base: CPython $py_version on $machine, glibc $glibc"

log "building dockyard's wheel from $checkout"
isolation=--no-build-isolation
"$python" -c 'import setuptools, wheel' 2>/dev/null || isolation=
"$python" -m pip wheel --quiet --no-deps $isolation --wheel-dir "$context/wheels" "$checkout"
own=$(cd "$context/wheels" && ls dockyard-*.whl)

log "downloading the dependencies' wheels for the base's Python"
abi="cp$(cut -d. -f1 <<<"$py_version")$(cut -d. -f2 <<<"$py_version")"
platforms=()
glibc_minor=$(cut -d. -f2 <<<"$glibc")
for ((minor = glibc_minor; minor >= 17; minor--)); do
  platforms+=(--platform "manylinux_2_${minor}_${machine}")
done
platforms+=(--platform "manylinux2014_${machine}")
"$python" -m pip download --quiet --no-input --progress-bar off --dest "$context/wheels" \
  --only-binary=:all: --python-version "$py_version" --implementation cp --abi "$abi" \
  "${platforms[@]}" "dockyard[routers,docker] @ file://$context/wheels/$own" pip
pip_wheel=$(cd "$context/wheels" && ls pip-*-py3-none-any.whl | head -n1)
[ -n "$pip_wheel" ] || die "pip download fetched no pip wheel"

# nftables: the agent firewall; ca-certificates: https fetches (pygit2 will not even import
# without a CA store).
log "downloading the Debian packages of $packages and what they need that the base lacks"
needed=()
for pkg in $(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances $packages | grep -E '^[a-z0-9]' | sort -u); do
  grep -qx "$pkg" <<<"$installed" || needed+=("$pkg")
done
if ((${#needed[@]})); then
  (cd "$context/debs" && apt-get download -q "${needed[@]}" >/dev/null 2>&1) ||
    (cd "$context/debs" && apt-get download "${needed[@]}") ||
    die "apt-get download ${needed[*]} failed (run apt-get update?)"
fi

log "building $tag with no network ($(ls "$context/wheels" | wc -l) wheels, ${#needed[@]} packages)"
args=(build --network none --build-arg "BASE=$base" --build-arg "PIP_WHEEL=$pip_wheel"
  --tag "$tag" --file "$context/Containerfile")
[ "$engine" = podman ] && args+=(--pull=never --layers=false)
"$engine" "${args[@]}" "$context"
log "$tag ready"
