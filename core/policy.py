"""Operator caps on what a deployment may ask for, and the network policy its agents get.

A deployment's ``resources`` and ``max_lifetime_s`` can only LOWER the operator's caps
(``Settings.max_memory_mb``, ``max_cpus``, ``max_pids``, ``max_tmpfs_mb``,
``max_container_lifetime_s``): a request above a cap is refused by :func:`check_spec` (called
from ``Controller._admit``, before anything is fetched) with an error naming the field, and
so is ``build_network`` unless the operator sets ``allow_build_network``; a value left at
its default that is above a cap is lowered to the cap by :func:`effective_limits` (a
default is indistinguishable from an explicit request of the same value, so both are
lowered).

The network policy is the operator's alone: agents reach nothing but their own answers
(egress ``none``), or, when ``Settings.agent_gateway`` is set, that one upstream too
(egress ``gateway``; the runtime hands the container its address as ``OPENAI_BASE_URL``).
Nothing in a deployment spec can widen it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import msgspec

from dockyard.core.errors import ConfigError, Unprocessable
from dockyard.core.models import DeploymentSpec, Resources
from dockyard.core.runtime import Limits

if TYPE_CHECKING:
    from dockyard.core.config import Settings

_DEFAULTS = Resources()
_SPEC_DEFAULTS = {f.name: f.default for f in msgspec.structs.fields(DeploymentSpec)}


def _caps(settings: Settings) -> dict[str, float]:
    return {
        "memory_mb": settings.max_memory_mb,
        "cpus": settings.max_cpus,
        "pids": settings.max_pids,
        "tmpfs_mb": settings.max_tmpfs_mb,
    }


def check_spec(spec: DeploymentSpec, settings: Settings) -> None:
    """Refuse a spec that asks for more than the operator allows.

    :raises Unprocessable: (HTTP 422) ``resources.<field>: <value> exceeds the operator's
        cap of <cap>``, ``logs_tmpfs_mb: ...``, ``max_lifetime_s: ...``, or
        ``build_network: ...`` when the operator does not set ``allow_build_network``.
    """
    for name, cap in _caps(settings).items():
        value = getattr(spec.resources, name)
        if value > cap and value != getattr(_DEFAULTS, name):
            raise Unprocessable(
                f"resources.{name}: {value:g} exceeds the operator's cap of {cap:g}",
                field=f"resources.{name}",
            )
    logs_mb, default_logs = spec.logs_tmpfs_mb, _SPEC_DEFAULTS["logs_tmpfs_mb"]
    if logs_mb > settings.max_tmpfs_mb and logs_mb != default_logs:
        raise Unprocessable(
            f"logs_tmpfs_mb: {logs_mb} exceeds the operator's cap of {settings.max_tmpfs_mb}",
            field="logs_tmpfs_mb",
        )
    if spec.build_network and not settings.allow_build_network:
        raise Unprocessable(
            "build_network: the operator does not allow network access during builds "
            "(allow_build_network)",
            field="build_network",
        )
    cap_s = settings.max_container_lifetime_s
    if spec.max_lifetime_s is not None and cap_s is not None and spec.max_lifetime_s > cap_s:
        raise Unprocessable(
            f"max_lifetime_s: {spec.max_lifetime_s:g} exceeds the operator's cap of {cap_s:g}",
            field="max_lifetime_s",
        )


def effective_limits(spec: DeploymentSpec, settings: Settings) -> Limits:
    """The limits a container of ``spec`` runs with: its resources, capped."""
    r, caps = spec.resources, _caps(settings)
    return Limits(
        memory_mb=int(min(r.memory_mb, caps["memory_mb"])),
        cpus=float(min(r.cpus, caps["cpus"])),
        pids=int(min(r.pids, caps["pids"])),
        tmpfs_mb=int(min(r.tmpfs_mb, caps["tmpfs_mb"])),
    )


def effective_scratch(sizes: dict[str, int], settings: Settings) -> dict[str, int]:
    """Scratch tmpfs mounts (path -> MiB), each lowered to ``max_tmpfs_mb``."""
    return {path: min(mb, settings.max_tmpfs_mb) for path, mb in sizes.items() if mb > 0}


def effective_lifetime(spec: DeploymentSpec, settings: Settings) -> float | None:
    """Seconds a container of ``spec`` may run, or None for no limit."""
    values = [v for v in (spec.max_lifetime_s, settings.max_container_lifetime_s) if v]
    return min(values) if values else None


def parse_gateway(value: str) -> tuple[str, int, str]:
    """``host:port`` or ``http://host:port[/path]`` as (IPv4 host, port, path).

    :raises ConfigError: anything else (a name, IPv6, another scheme, no port).
    """
    import ipaddress

    text = value.strip()
    raw = text if "://" in text else f"http://{text}"
    parts = urlsplit(raw)
    try:
        port = parts.port
        host = str(ipaddress.IPv4Address(parts.hostname or ""))
    except ValueError:
        port = host = None  # type: ignore[assignment]
    if (
        parts.scheme != "http"
        or host is None
        or not port
        or parts.username
        or parts.password
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"agent_gateway {value!r} must be 'IPv4:port' or 'http://IPv4:port[/path]'"
        )
    return host, port, parts.path.rstrip("/")


def network_policy(settings: Settings) -> tuple[Literal["none", "gateway"], str | None]:
    """The egress every agent container gets, and the gateway when there is one."""
    if settings.agent_gateway:
        parse_gateway(settings.agent_gateway)
        return "gateway", settings.agent_gateway.strip()
    return "none", None


__all__ = [
    "check_spec",
    "effective_lifetime",
    "effective_limits",
    "effective_scratch",
    "network_policy",
    "parse_gateway",
]
