"""Host processes, read from ``/proc``: the process group of a private Podman service, and
the ``RUN`` containers of a Podman build, which a timed-out build is stopped by killing.

Podman keeps building after the client disconnects, so on timeout the runtime kills the
build's ``RUN`` processes itself. Each build carries a marker in the ``no_proxy`` build
argument (a predefined argument: it reaches every ``RUN`` environment without an ``ARG``
line, and its value is not stored in the image); the runtime finds the
``buildah-oci-runtime`` processes whose OCI bundle (written by Podman, out of the build's
reach) holds the marker and SIGKILLs their containers, which fails the build and lets
buildah clean up. This needs the engine on the same host and permission to signal its
processes (root, or the user running rootless Podman).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def _proc_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid in _proc_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children[int(fields[1])].append(pid)
    return children


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for pid in _proc_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(pid)
    return members


def _descendants(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _bundle_has_marker(pid: int, marker: str, prefix: bool = False) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        if not argv0.endswith(b"buildah-oci-runtime"):
            return False
        spec = json.loads(Path(f"/proc/{pid}/cwd/config.json").read_text())
    except (OSError, ValueError):
        return False
    env = ((spec.get("process") or {}).get("env")) or []
    for item in env:
        name, _, value = str(item).partition("=")
        if name != "no_proxy":
            continue
        found = value.split(",")
        if marker in found or (prefix and any(v.startswith(marker) for v in found)):
            return True
    return False


def _environ_has_marker(pid: int, prefix: str) -> bool:
    """Whether the process's own ``no_proxy`` holds a marker starting with ``prefix``: a
    ``RUN`` step whose ``buildah-oci-runtime`` died with a killed engine service."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    for item in environ:
        name, _, value = item.decode(errors="replace").partition("=")
        if name == "no_proxy" and any(v.startswith(prefix) for v in value.split(",")):
            return True
    return False


def kill_marked_build_processes(marker: str, *, prefix: bool = False) -> int:
    """SIGKILL the ``RUN`` containers of the build whose ``no_proxy`` holds ``marker`` (with
    ``prefix``: of every build whose marker starts with it, including ``RUN`` processes whose
    runtime is gone, found by the marker in their own environment).

    Killing a RUN container's init ends its whole PID namespace; the build step fails and
    buildah removes the container. Returns how many processes were signalled.
    """
    owners = [pid for pid in _proc_pids() if _bundle_has_marker(pid, marker, prefix)]
    orphans = [pid for pid in _proc_pids() if prefix and _environ_has_marker(pid, marker)]
    if not owners and not orphans:
        return 0
    children = _children_map()
    killed = 0
    for owner in owners:
        for pid in _descendants(owner, children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    for orphan in orphans:  # a RUN step left by a killed engine service, and what it started
        for pid in [orphan, *_descendants(orphan, children)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def _shutdown_response(resp: Any) -> None:
    """Unblock a thread reading a streamed response by shutting its socket down."""
    raw = getattr(resp, "raw", None)
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()


__all__ = ["kill_marked_build_processes"]
