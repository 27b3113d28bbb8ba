"""Docker-compatible inspect JSON (Podman's libpod answers in the same shape) read into a
:class:`ContainerInfo` and its :class:`Hardening`: one parser for every engine."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dockyard.core.runtime import ContainerInfo, Hardening

#: Capabilities Podman grants by default; ``CapDrop`` covering them all means "dropped ALL".
DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_AUDIT_WRITE",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_MKNOD",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT",
    }
)


def positive(value: Any) -> int | None:
    """``value`` as a positive int, or None (unset, zero, negative, not a number)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _limits(hc: Mapping[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(nano CPUs, memory, memory with swap, pids) as the host config says them."""
    nano_cpus = positive(hc.get("NanoCpus"))
    quota, period = positive(hc.get("CpuQuota")), positive(hc.get("CpuPeriod"))
    if nano_cpus is None and quota and period:
        nano_cpus = quota * 1_000_000_000 // period
    swap = hc.get("MemorySwap")
    swap_bytes = int(swap) if isinstance(swap, int) and swap != 0 else None
    return nano_cpus, positive(hc.get("Memory")), swap_bytes, positive(hc.get("PidsLimit"))


def _published(attrs: Mapping[str, Any], hc: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or hc.get("PortBindings") or {}
    published: list[tuple[str, int, int]] = []
    for key, bindings in sorted(ports.items()):
        container_port = int(str(key).split("/", 1)[0])
        for binding in bindings or []:
            host_port = positive(binding.get("HostPort"))
            if host_port is not None:
                published.append((str(binding.get("HostIp") or ""), host_port, container_port))
    return published


def parse_hardening(attrs: Mapping[str, Any], *, limits_enforced: bool = True) -> Hardening:
    """Security settings from a container's inspect JSON (libpod or Docker-compatible).

    With ``limits_enforced=False`` the cgroup limits are reported as absent: the engine may
    echo them, but they do not hold.
    """
    hc = attrs.get("HostConfig") or {}
    cap_add = [str(c) for c in hc.get("CapAdd") or []]
    cap_drop = {str(c).upper() for c in hc.get("CapDrop") or []}
    security_opt = [str(o).replace("=", ":") for o in hc.get("SecurityOpt") or []]
    nano_cpus, memory, swap_bytes, pids = _limits(hc)
    if not limits_enforced:
        nano_cpus = memory = swap_bytes = pids = None
    ulimits: dict[str, tuple[int, int]] = {}
    for item in hc.get("Ulimits") or []:
        name = str(item.get("Name", "")).lower().removeprefix("rlimit_")
        if name:
            ulimits[name] = (int(item.get("Soft", 0)), int(item.get("Hard", 0)))
    log_config = hc.get("LogConfig") or {}
    log_size = log_config.get("Size") or (log_config.get("Config") or {}).get("max-size")
    return Hardening(
        cap_drop_all=not cap_add and ("ALL" in cap_drop or cap_drop >= DEFAULT_CAPABILITIES),
        cap_add=cap_add,
        no_new_privileges=any(
            o in ("no-new-privileges", "no-new-privileges:true") for o in security_opt
        ),
        read_only=bool(hc.get("ReadonlyRootfs")),
        pids_limit=pids,
        memory_bytes=memory,
        memory_swap_bytes=swap_bytes,
        nano_cpus=nano_cpus,
        ulimits=ulimits,
        tmpfs={str(k): str(v) for k, v in (hc.get("Tmpfs") or {}).items()},
        published=_published(attrs, hc),
        log_max_size=str(log_size) if log_size else None,
    )


def timestamp(value: Any) -> float | None:
    """Epoch seconds of an engine timestamp (RFC 3339, nanoseconds); None when unset."""
    text = str(value or "")
    if not text or text.startswith("0001-"):
        return None
    head, _, frac = text.partition(".")
    zone = ""
    if frac:
        digits = len(frac) - len(frac.lstrip("0123456789"))
        frac, zone = frac[:digits][:6], frac[digits:]
    else:
        head, zone = head[:19], head[19:]
    zone = "+00:00" if zone in ("Z", "") else zone
    try:
        return datetime.fromisoformat(f"{head}.{frac or '0'}{zone}").timestamp()
    except ValueError:
        return None


def container_info(attrs: Mapping[str, Any], *, limits_enforced: bool = True) -> ContainerInfo:
    """A :class:`ContainerInfo` from a container's inspect JSON."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    hardening = parse_hardening(attrs, limits_enforced=limits_enforced)
    status = str(state.get("Status") or "unknown")
    running = bool(state.get("Running"))
    exited = status in ("exited", "stopped", "dead") or (not running and status != "created")
    return ContainerInfo(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(attrs.get("ImageName") or config.get("Image") or attrs.get("Image") or ""),
        status=status,
        running=running,
        labels=dict(config.get("Labels") or {}),
        host_port=hardening.published[0][1] if hardening.published else None,
        exit_code=int(state.get("ExitCode", 0)) if exited else None,
        oom_killed=bool(state.get("OOMKilled")),
        started_at=timestamp(state.get("StartedAt")),
        hardening=hardening,
    )


def has_labels(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    """Whether ``have`` carries every label of ``want``."""
    return all(have.get(key) == value for key, value in want.items())


__all__ = [
    "DEFAULT_CAPABILITIES",
    "container_info",
    "has_labels",
    "parse_hardening",
    "positive",
    "timestamp",
]
