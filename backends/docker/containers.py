"""Docker's dialect for containers: the create body that applies dockyard's hardening
(``POST /containers/create``), the agent network interfaces, and the references the
runtime lets into an API path."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from dockyard.backends.engine.base import MIB, process_settings
from dockyard.core.errors import NotFound
from dockyard.core.runtime import LABEL_MANAGED, ContainerSpec

AGENT_IFACE = "dyad"
# A container reference: a name or an id, nothing that could change the API path.
_CONTAINER_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# An image reference: [registry[:port]/]path[:tag][@digest], or an id.
_IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]*$")


def agent_iface(daemon_id: str, digest: str | None = None) -> str:
    """The host interface of an agent network: ``dyad<daemon>`` (egress ``none``) or
    ``dyad<daemon>g<gateway>`` (at most 15 characters). Not Podman's ``dya0``, and one
    per daemon: two dockerds on one host given the same bridge name share one interface
    (the second one silently re-addresses it, seen with 20.10), breaking the first."""
    tag = hashlib.sha256(daemon_id.encode()).hexdigest()[:4]
    return f"{AGENT_IFACE}{tag}" if digest is None else f"{AGENT_IFACE}{tag}g{digest[:6]}"


def _container_ref(ref: str) -> str:
    if not _CONTAINER_REF.match(ref):
        raise NotFound(f"no container {ref!r}: not a container name or id")
    return ref


def _image_ref(ref: str) -> str:
    if not _IMAGE_REF.match(ref) or ".." in ref or "//" in ref:
        raise NotFound(f"no image {ref!r}: not an image reference")
    return ref


def _size(value: int) -> str:
    """A byte count as Docker's log options spell it (``10m``, ``16k``, ``1000``)."""
    value = int(value)
    for suffix, unit in (("m", MIB), ("k", 1024)):
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def _host_config(spec: ContainerSpec, network: str) -> dict[str, Any]:
    limits = spec.limits
    memory = int(limits.memory_mb) * MIB
    port = f"{int(spec.container_port)}/tcp"
    host_port = "" if spec.host_port is None else str(int(spec.host_port))
    scratch = "rw,nosuid,nodev,noexec,size={}m,mode=1777"
    return {
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "ReadonlyRootfs": bool(spec.read_only),
        "Tmpfs": {
            "/tmp": f"rw,nosuid,nodev,size={int(limits.tmpfs_mb)}m,mode=1777",
            **{target: scratch.format(int(size)) for target, size in spec.tmpfs.items()},
        },
        "Init": True,
        "Ulimits": [
            {"Name": "nofile", "Soft": limits.nofile, "Hard": limits.nofile},
            {"Name": "nproc", "Soft": limits.nproc, "Hard": limits.nproc},
        ],
        "Memory": memory,
        "MemorySwap": memory,
        "NanoCpus": max(1_000_000, int(limits.cpus * 1_000_000_000)),
        "PidsLimit": int(limits.pids),
        "LogConfig": {
            "Type": "json-file",
            "Config": {
                "max-size": _size(limits.log_max_bytes),
                "max-file": str(max(1, int(limits.log_max_files))),
            },
        },
        "PortBindings": {port: [{"HostIp": spec.host_ip, "HostPort": host_port}]},
        "Mounts": [
            {"Type": "bind", "Source": source, "Target": target, "ReadOnly": True}
            for source, target in spec.mounts
        ],
        "RestartPolicy": {"Name": "no"},
        # IPv6 off inside: the agent networks are IPv4 only (the firewall covers both anyway).
        "Sysctls": {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
        },
        "NetworkMode": network,
    }


def create_config(spec: ContainerSpec, network: str, env: dict[str, str]) -> dict[str, Any]:
    """The body of ``POST /containers/create`` for ``spec`` on ``network``, hardened (see
    the runtime's module docstring), with ``env`` added to the spec's."""
    config: dict[str, Any] = {
        "Image": spec.image,
        "Labels": {**spec.labels, LABEL_MANAGED: "true"},
        "Env": [f"{key}={value}" for key, value in {**dict(spec.env), **env}.items()],
        "ExposedPorts": {f"{int(spec.container_port)}/tcp": {}},
        "HostConfig": _host_config(spec, network),
    }
    config.update(process_settings(spec, "Cmd", "User", "WorkingDir"))
    return config


__all__ = ["agent_iface", "create_config"]
