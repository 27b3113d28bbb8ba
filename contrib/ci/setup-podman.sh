#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu host for dockyard's Podman backend and its contract tests.
#
# Run as root. Idempotent: every step checks before it changes anything, so running it
# again is cheap and harmless. It
#   1. installs podman, runc, uidmap, slirp4netns, fuse-overlayfs, catatonit, busybox-static
#      nftables (the agent firewall, backends/engine/firewall.py) and squid (the build
#      proxy, backends/engine/build_proxy.py: dockyard runs its own instances, so the
#      Debian service is stopped and kept from starting), plus what only the tests
#      run: git (their git servers), iproute2 and mount (apt is skipped when they are all
#      installed already; tests/test_host_packages.py fails when the code runs an
#      executable no setup script installs);
#   2. configures the engine for hosts where crun and systemd are unusable (runc, the
#      cgroupfs manager, file events, ulimits below the host's hard limits);
#   3. opens /dev/net/tun to everyone, which slirp4netns needs for rootless networking;
#   4. unless --host-only, creates the unprivileged user dockyard-test (subuid/subgid ranges, its own
#      containers.conf, native overlay storage, /run/user/<uid> as XDG_RUNTIME_DIR) that
#      the rootless tests run Podman as.
#
# Environment overrides: DOCKYARD_TEST_USER (default dockyard-test).
set -euo pipefail

TEST_USER="${DOCKYARD_TEST_USER:-dockyard-test}"
HOST_ONLY=0
case "${1:-}" in
    --host-only) HOST_ONLY=1 ;;  # what `dockyard serve` needs; skip the rootless test user
    "") ;;
    *) echo "usage: $0 [--host-only]" >&2; exit 2 ;;
esac
PACKAGES=(podman runc uidmap slirp4netns fuse-overlayfs catatonit busybox-static nftables squid)
TEST_PACKAGES=(git iproute2 mount)  # tests only: git daemon/http-backend, ip netns, umount
TEST_PACKAGES+=(systemd)  # tests only: systemd-analyze verify of the units dockyard install writes
MARKER="# managed by dockyard contrib/ci/setup-podman.sh"

SETUP_NAME=setup-podman
# shellcheck source=contrib/ci/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
require_root

# ------------------------------------------------------------------ 1. packages
if [[ $HOST_ONLY == 0 ]]; then
    PACKAGES+=("${TEST_PACKAGES[@]}")
fi
install_missing "${PACKAGES[@]}"
if [[ " ${missing[*]} " == *" squid "* ]]; then
    # dockyard starts one squid per build on a port of its own; the host-wide
    # service (port 3128, every client on the host) is not wanted.
    service squid stop >/dev/null 2>&1 || true
    update-rc.d squid disable >/dev/null 2>&1 || true
    systemctl disable --now squid >/dev/null 2>&1 || true
fi

# ------------------------------------------------------------------ 2. engine config
# crun fails on cgroup v1 hybrid hosts and there is no systemd: runc + cgroupfs + file
# events. The host's hard nofile limit can be below podman's default (1048576), which
# makes every `podman run` fail with "error setting rlimit type 7": default to values
# below it. dockyard's runtime passes its own ulimits anyway.
ENGINE_CONF="$MARKER
[containers]
default_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
"

write_if_changed() { # path mode owner content
    local path=$1 mode=$2 owner=$3 content=$4
    # $(...) strips trailing newlines on both sides, so the comparison ignores them.
    if [[ -f $path ]] && [[ "$(cat "$path")" == "$(printf '%s' "$content")" ]]; then
        return 0
    fi
    install -d -m 755 "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp.$$"
    chmod "$mode" "$path.tmp.$$"
    chown "$owner" "$path.tmp.$$"
    mv -f "$path.tmp.$$" "$path"
    log "wrote $path"
}

SYSTEM_CONF=/etc/containers/containers.conf
if [[ ! -e $SYSTEM_CONF ]] || grep -qF "$MARKER" "$SYSTEM_CONF"; then
    write_if_changed "$SYSTEM_CONF" 644 root:root "$ENGINE_CONF"
else
    # The operator has their own containers.conf: leave it alone, add a drop-in that is
    # read after it (supported since Podman 4).
    write_if_changed /etc/containers/containers.conf.d/50-dockyard.conf 644 root:root \
        "$ENGINE_CONF"
fi

# ------------------------------------------------------------------ 3. /dev/net/tun
if [[ -c /dev/net/tun ]]; then
    if [[ $(stat -c %a /dev/net/tun) != 666 ]]; then
        chmod 666 /dev/net/tun
        log "chmod 666 /dev/net/tun (slirp4netns for rootless networking)"
    fi
else
    log "warning: /dev/net/tun is missing; rootless containers will have no network"
fi

# Every agent container start applies the nftables rules first; without nft none starts.
command -v nft >/dev/null || { echo "setup-podman: nft is missing (nftables)" >&2; exit 1; }

if [[ $HOST_ONLY == 1 ]]; then
    podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null
    log "host ready (--host-only: no test user)"
    exit 0
fi

# ------------------------------------------------------------------ 4. test user
if ! id -u "$TEST_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --user-group "$TEST_USER"
    log "created user $TEST_USER"
fi
TEST_UID=$(id -u "$TEST_USER")
TEST_GID=$(id -g "$TEST_USER")
TEST_HOME=$(getent passwd "$TEST_USER" | cut -d: -f6)

# useradd normally allocates ranges (SUB_UID_COUNT in login.defs); older tools do not.
next_free_range() { # file: first start above every existing range, min 100000
    awk -F: 'BEGIN { m = 100000 } NF >= 3 { e = $2 + $3; if (e > m) m = e } END { print m }' "$1"
}
for kind in uid gid; do
    file=/etc/sub$kind
    touch "$file"
    if ! grep -q "^$TEST_USER:" "$file"; then
        start=$(next_free_range "$file")
        usermod "--add-sub${kind}s" "$start-$((start + 65535))" "$TEST_USER"
        log "gave $TEST_USER sub${kind}s $start-$((start + 65535))"
    fi
done

write_if_changed "$TEST_HOME/.config/containers/containers.conf" 644 "$TEST_UID:$TEST_GID" \
    "$ENGINE_CONF"
chown "$TEST_UID:$TEST_GID" "$TEST_HOME/.config" "$TEST_HOME/.config/containers"

# No systemd, so no logind to create /run/user/<uid>: do it the way pam_systemd would.
RUNTIME_DIR="/run/user/$TEST_UID"
install -d -m 755 /run/user
install -d -m 700 -o "$TEST_UID" -g "$TEST_GID" "$RUNTIME_DIR"

# The rootless check starts Podman's pause process (it holds the user namespace); stop it
# again when this script started it and nothing else of the user runs.
pause_pid() {
    local file="$RUNTIME_DIR/libpod/tmp/pause.pid" pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -r /proc/$pid/cmdline ]] && grep -q catatonit "/proc/$pid/cmdline"; then
        echo "$pid"
    fi
}
pause_before=$(pause_pid)

as_test_user() {
    runuser -u "$TEST_USER" -- env -i HOME="$TEST_HOME" XDG_RUNTIME_DIR="$RUNTIME_DIR" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        sh -c 'cd "$HOME" && exec "$@"' sh "$@"
}

# Native rootless overlay (kernel >= 5.13) instead of vfs, which copies every layer for
# every container. The test user's storage is disposable: when it was created with another
# driver, it is reset.
kernel=$(uname -r | cut -d- -f1)
if printf '5.13\n%s\n' "$kernel" | sort -V -C; then
    write_if_changed "$TEST_HOME/.config/containers/storage.conf" 644 "$TEST_UID:$TEST_GID" \
        "$MARKER
[storage]
driver = \"overlay\""
    driver=$(as_test_user podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null || true)
    if [[ $driver != overlay ]]; then
        # Podman keeps the driver its storage was created with; switching needs a reset.
        if [[ -z $(as_test_user podman ps --all --quiet 2>/dev/null) ]]; then
            log "resetting $TEST_USER's container storage ($driver -> overlay)"
            as_test_user podman system reset --force >/dev/null 2>&1 || true
        else
            log "warning: $TEST_USER's storage stays on $driver: it still has containers"
        fi
    fi
fi


# ------------------------------------------------------------------ check
podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null
as_test_user podman info --format '{{.Host.Security.Rootless}} {{.Store.GraphDriverName}}' \
    2>/dev/null | grep -q '^true '

pause_after=$(pause_pid)
if [[ -n $pause_after && $pause_after != "$pause_before" ]]; then
    others=0
    for proc in /proc/[0-9]*; do
        [[ ${proc#/proc/} != "$pause_after" ]] || continue
        [[ $(stat -c %u "$proc" 2>/dev/null) == "$TEST_UID" ]] || continue
        # Field 3 of stat, after the command name in parentheses; zombies do not count.
        state=$(sed 's/.*) //' "$proc/stat" 2>/dev/null | cut -d' ' -f1)
        [[ -n $state && $state != Z ]] && others=$((others + 1))
    done
    if ((others == 0)); then
        kill "$pause_after" 2>/dev/null || true
    fi
fi
log "ok: rootful and rootless ($TEST_USER, XDG_RUNTIME_DIR=$RUNTIME_DIR) podman answer"
