"""Podman's dialect for containers: the create arguments that apply dockyard's hardening
(podman-py's ``containers.create`` keywords), and the k8s-file log read from disk when
Podman cannot read a log that conmon truncated mid-line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dockyard.backends.engine.base import CPU_PERIOD_US, MIB, process_settings
from dockyard.core.runtime import LABEL_MANAGED, ContainerSpec

#: One line of Podman's k8s-file log driver: time, stream, (P)artial or (F)ull, text.
_K8S_LOG_LINE = re.compile(r"^\S+ (?:stdout|stderr) ([PF]) ?(.*)$")


def _tmpfs(target: str, size_mb: int) -> dict[str, Any]:
    return {
        "type": "tmpfs",
        "source": "tmpfs",
        "target": target,
        "size": f"{int(size_mb)}m",
        "mode": "1777",
    }


def create_kwargs(spec: ContainerSpec, *, limits_enforced: bool) -> dict[str, Any]:
    """podman-py ``containers.create`` keywords for ``spec``, hardened (see the runtime's
    module docstring); cgroup limits only where they hold."""
    limits = spec.limits
    mounts = [_tmpfs("/tmp", limits.tmpfs_mb)]
    mounts += [_tmpfs(target, size_mb) for target, size_mb in spec.tmpfs.items()]
    for source, target in spec.mounts:
        mounts.append({"type": "bind", "source": source, "target": target, "read_only": True})
    binding: tuple[str, int] | dict[str, str]
    if spec.host_port is not None:
        binding = (spec.host_ip, int(spec.host_port))
    else:
        binding = {"ip": spec.host_ip}
    kwargs: dict[str, Any] = {
        "name": spec.name,
        "labels": {**spec.labels, LABEL_MANAGED: "true"},
        "environment": dict(spec.env),
        "cap_drop": ["ALL"],
        "no_new_privileges": True,
        "read_only": spec.read_only,
        "read_write_tmpfs": False,  # no unsized tmpfs on /run, /var/tmp
        "shm_size": f"{int(limits.tmpfs_mb)}m",  # /dev/shm: no bigger than /tmp
        "mounts": mounts,
        "init": True,
        "ulimits": [
            {"Name": "nofile", "Soft": limits.nofile, "Hard": limits.nofile},
            {"Name": "nproc", "Soft": limits.nproc, "Hard": limits.nproc},
        ],
        "log_config": {"Type": "k8s-file", "Config": {"size": int(limits.log_max_bytes)}},
        "ports": {f"{spec.container_port}/tcp": binding},
        # IPv6 off inside: the private network is IPv4 only (the firewall covers both anyway).
        "sysctls": {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
        },
    }
    kwargs.update(process_settings(spec, "command", "user", "working_dir"))
    if limits_enforced:
        memory = int(limits.memory_mb) * MIB
        kwargs.update(
            pids_limit=int(limits.pids),
            mem_limit=memory,
            memswap_limit=memory,
            cpu_period=CPU_PERIOD_US,
            cpu_quota=max(1000, int(limits.cpus * CPU_PERIOD_US)),
        )
    return kwargs


def patch_scratch_tmpfs(payload: dict[str, Any], spec: ContainerSpec) -> None:
    """podman-py's ``containers.create`` drops a mount's ``options``: give the rendered
    payload's scratch tmpfs mounts theirs (``nosuid``, ``nodev``, ``noexec``)."""
    for mount in payload.get("mounts") or []:
        if mount.get("type") == "tmpfs" and mount.get("destination") in spec.tmpfs:
            mount["options"] = [*mount.get("options", []), "nosuid", "nodev", "noexec"]


def read_k8s_log(path: str | None) -> list[str] | None:
    """A container's k8s-file log read from disk, skipping a torn first line; None when the
    file cannot be read."""
    try:
        data = Path(str(path)).read_bytes() if path else None
    except OSError:
        data = None
    if data is None:
        return None
    lines: list[str] = []
    partial = ""
    for raw in data.decode("utf-8", "replace").splitlines():
        match = _K8S_LOG_LINE.match(raw)
        if match is None:
            continue  # the torn line where conmon truncated the file
        partial += match.group(2)
        if match.group(1) == "F":
            lines.append(partial)
            partial = ""
    if partial:
        lines.append(partial)
    return lines


__all__ = ["create_kwargs", "patch_scratch_tmpfs", "read_k8s_log"]
