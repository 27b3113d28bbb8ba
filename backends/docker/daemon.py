"""What a Docker daemon says about itself and the host (``GET /info``): whether it runs
rootless, its cgroup version, and whether the resource limits it is asked for hold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: What the daemon must be able to enforce, as (name, key of ``GET /info``).
LIMIT_CAPABILITIES = (
    ("memory", "MemoryLimit"),
    ("swap", "SwapLimit"),
    ("CPU quota", "CpuCfsQuota"),
    ("pids", "PidsLimit"),
)
ROOTLESS_V1_NOTE = (
    "Resource limits are ignored by rootless Docker on cgroup v1: memory, CPU and pids limits "
    "do not hold (ulimits such as nofile and nproc still apply). Run Docker rootful or on a "
    "cgroup v2 host with controller delegation to enforce them."
)


def limits_status(info: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether resource limits hold, from ``GET /info``, with the reason when they do not."""
    rootless = is_rootless(info)
    cgroup = cgroup_version(info)
    missing = [name for name, key in LIMIT_CAPABILITIES if not info.get(key)]
    if rootless and cgroup == "v1":
        return False, ROOTLESS_V1_NOTE
    if not missing:
        return True, ""
    hint = " (enable swap accounting: swapaccount=1)" if missing == ["swap"] else ""
    return False, (
        f"The Docker daemon cannot enforce {', '.join(missing)} limits on this host"
        f"{hint}: they do not hold."
    )


def is_rootless(info: Mapping[str, Any]) -> bool:
    """Whether the daemon runs rootless (``name=rootless`` among its security options)."""
    return any("name=rootless" in str(opt) for opt in info.get("SecurityOptions") or [])


def cgroup_version(info: Mapping[str, Any]) -> str:
    """``v1`` or ``v2``; daemons before API 1.40 do not say, and only knew v1."""
    value = str(info.get("CgroupVersion") or "1")
    return value if value.startswith("v") else f"v{value}"


__all__ = ["ROOTLESS_V1_NOTE", "cgroup_version", "is_rootless", "limits_status"]
