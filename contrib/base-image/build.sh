#!/usr/bin/env bash
# Build the local base image `localhost/dockyard/base-python:bookworm` without any registry:
# debootstrap a minimal Debian with python3, import it into Podman, and tag it
# `localhost/python:3.11-slim` too, so real-world Dockerfiles build with --pull=never.
# Idempotent: does nothing when the image exists. Needs root (debootstrap).
#   contrib/base-image/build.sh [--engine podman|docker]
set -euo pipefail
engine=podman
[ "${1:-}" = "--engine" ] && engine=${2:?engine name}
image=localhost/dockyard/base-python:bookworm
if "$engine" image exists "$image" 2>/dev/null || "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"
  exit 0
fi
command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
cache=${DOCKYARD_BASE_CACHE:-/var/cache/dockyard}
mkdir -p "$cache"
tarball="$cache/base-python-bookworm.tar"
if [ ! -s "$tarball" ]; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "== debootstrap bookworm + python3 (about a minute, once per host)"
  debootstrap --variant=minbase --include=python3 bookworm "$root" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
echo "== importing $image"
"$engine" import --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
"$engine" tag "$image" localhost/python:3.11-slim
echo "$image ready"
