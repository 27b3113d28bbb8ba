#!/usr/bin/env bash
# Build the local base image `localhost/dockyard/base-python:bookworm` without any registry:
# debootstrap a minimal Debian with python3 (as root, once per host, cached as a tarball),
# import it into the invoking user's Podman (or Docker) storage, and tag it
# `localhost/python:3.11-slim` too, so real-world Dockerfiles build with --pull=never.
# Idempotent: does nothing when the image exists.
#   contrib/base-image/build.sh [--engine podman|docker] [--tarball-only]
set -euo pipefail
engine=podman
tarball_only=
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) engine=${2:?engine name}; shift 2 ;;
    --tarball-only) tarball_only=1; shift ;;
    *) echo "usage: $0 [--engine podman|docker] [--tarball-only]" >&2; exit 2 ;;
  esac
done
image=localhost/dockyard/base-python:bookworm
cache=${DOCKYARD_BASE_CACHE:-/var/cache/dockyard}
tarball="$cache/base-python-bookworm.tar"

if [ -z "$tarball_only" ] && "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"
  exit 0
fi
if [ ! -s "$tarball" ]; then
  if [ "$(id -u)" != 0 ]; then
    sudo bash "$0" --tarball-only
  else
    command -v debootstrap >/dev/null || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    mkdir -p "$cache"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    echo "== debootstrap bookworm + python3 (about a minute, once per host)"
    debootstrap --variant=minbase --include=python3 bookworm "$root" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    chmod 0644 "$tarball"
  fi
fi
[ -n "$tarball_only" ] && exit 0
echo "== importing $image"
"$engine" import --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null 2>&1 ||
  "$engine" import --change 'CMD ["python3"]' "$tarball" "$image"
"$engine" tag "$image" localhost/python:3.11-slim
echo "$image ready"
