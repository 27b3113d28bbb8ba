"""The engine base class: what a Docker-compatible engine runtime does the same way whatever
its client, as template methods over the engine's primitives.

* ``open()``: the configured socket (it must answer: never a silent switch to another
  engine with another security model), else the discovered ones in order, else the
  engine's fallback (Podman starts a private service; Docker says how to get a daemon).
* ``info()``: what the engine says, whether resource limits and the network policy hold.
* ``run()``: the network policy, then create, start, read back; a container that does not
  start is removed.
* ``inspect()``/``list()``: inspect JSON read by one parser (:mod:`.inspection`).
* ``build()``: :class:`dockyard.backends.engine.build.BuildLifecycle`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar

from dockyard.backends.engine.build import BuildLifecycle
from dockyard.backends.engine.firewall import AgentFirewall, local_nft
from dockyard.backends.engine.inspection import container_info, has_labels
from dockyard.backends.engine.network import AgentNetworkPlan, NetworkPolicy
from dockyard.backends.engine.options import EngineOptions, engine_options
from dockyard.core.errors import Conflict, DockyardError, RuntimeOperationError, RuntimeUnavailable
from dockyard.core.runtime import ContainerInfo, ContainerSpec, Runtime, RuntimeInfo

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CPU_PERIOD_US = 100_000


def socket_url(value: str) -> str:
    """``/path/engine.sock``, ``unix:///path``, ``tcp://h:p`` or ``ssh://...`` as a URL."""
    value = value.strip()
    if value.startswith("/"):
        return f"unix://{value}"
    return value


def socket_candidates(
    env: str, user_socket: str, system_socket: str, *, system_for_users: bool
) -> list[tuple[str, str]]:
    """Where an engine may answer, in order, as (URL, where it comes from): ``$<env>``, then
    ``$XDG_RUNTIME_DIR/<user_socket>`` for a non-root user, then ``system_socket`` (for a
    non-root user too when ``system_for_users``)."""
    found: list[tuple[str, str]] = []
    if os.environ.get(env):
        found.append((socket_url(os.environ[env]), env))
    root = os.geteuid() == 0
    if not root:
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
        found.append((f"unix://{runtime_dir}/{user_socket}", "rootless user socket"))
    if root or system_for_users:
        found.append((f"unix://{system_socket}", "system socket"))
    return found


def process_settings(spec: ContainerSpec, command: str, user: str, workdir: str) -> dict[str, Any]:
    """The spec's command, user and working directory under an engine's keys, where set."""
    found: dict[str, Any] = {command: list(spec.command), user: spec.user, workdir: spec.workdir}
    return {key: value for key, value in found.items() if value}


class EngineRuntime(NetworkPolicy, BuildLifecycle, Runtime):
    """A container engine with dockyard's hardening applied; engines supply the dialect."""

    name: ClassVar[str]
    options_type: ClassVar[type[EngineOptions]] = EngineOptions

    def __init__(self, socket: str | None = None, **options: Any) -> None:
        """Takes the engine's options (:attr:`options_type`) as keywords."""
        self.options = engine_options(self.name, self.options_type, {"socket": socket, **options})
        self._socket = socket_url(self.options.socket) if self.options.socket else None
        self.build_log_lines = max(1, self.options.build_log_lines)
        self._url: str | None = None
        self._info: dict[str, Any] | None = None
        self._firewall = AgentFirewall(local_nft(self.options.nft_path))
        self._network_lock = asyncio.Lock()

    @property
    def url(self) -> str | None:
        """The URL of the engine in use (None before ``open()``)."""
        return self._url

    # ---------------------------------------------------------------- primitives
    @abc.abstractmethod
    def _candidates(self) -> list[tuple[str, str]]:
        """Where the engine may answer, in order: (URL, where that URL comes from)."""

    @abc.abstractmethod
    async def _attach(self, url: str) -> str:
        """Connect to ``url``: "" when the engine answers there, else why not."""

    @abc.abstractmethod
    async def _fallback(self, tried: list[str]) -> str:
        """No socket answers: attach to an engine of our own (its URL), or raise."""

    @abc.abstractmethod
    async def _detach(self) -> None:
        """Disconnect (and stop what ``_fallback`` started); never raises."""

    @abc.abstractmethod
    async def _engine_info(self) -> dict[str, Any]:
        """The engine's own description of itself and the host."""

    @abc.abstractmethod
    def _describe(self, info: Mapping[str, Any]) -> dict[str, Any]:
        """``version``, ``cgroup_version`` and ``extra`` of a RuntimeInfo."""

    @abc.abstractmethod
    def _is_rootless(self, info: Mapping[str, Any]) -> bool:
        """Whether the engine runs rootless."""

    @abc.abstractmethod
    def _limits_status(self, info: Mapping[str, Any]) -> tuple[bool, str]:
        """Whether resource limits hold, with the reason when they do not."""

    @abc.abstractmethod
    async def _create(
        self, spec: ContainerSpec, plan: AgentNetworkPlan, env: dict[str, str]
    ) -> str:
        """Create the hardened container on the agent network; its id."""

    @abc.abstractmethod
    async def _start(self, container_id: str) -> None:
        """Start a created container."""

    @abc.abstractmethod
    async def _inspect_attrs(self, ref: str) -> dict[str, Any] | None:
        """A container's inspect JSON, or None when it does not exist."""

    @abc.abstractmethod
    async def _list_ids(self, labels: Mapping[str, str]) -> list[str]:
        """Ids of the containers, running or not, the engine finds by ``labels``."""

    async def _read_back(self, info: ContainerInfo) -> None:
        """Correct ``info`` from what the running processes say (engines that can)."""

    # ---------------------------------------------------------------- connection
    async def _discover(self) -> str:
        """Attach to the configured socket, else the first candidate that answers, else the
        engine's fallback; the URL attached to."""
        if self._socket is not None:
            why = await self._attach(self._socket)
            if why:
                raise RuntimeUnavailable(
                    f"no {self.title} engine answers at the configured socket {self._socket}: "
                    f"{why}",
                    socket=self._socket,
                )
            return self._socket
        tried = []
        for candidate, origin in self._candidates():
            why = await self._attach(candidate)
            if not why:
                log.info("using %s at %s (%s)", self.title, candidate, origin)
                return candidate
            tried.append(f"{candidate} ({why})")
        return await self._fallback(tried)

    async def open(self) -> None:
        """Connect to the configured or discovered engine (module docstring)."""
        if self._url is not None:
            return
        url = await self._discover()
        self._url = url
        try:
            self._info = await self._engine_info()
        except Exception as exc:
            await self.close()
            message = getattr(exc, "message", None) or str(exc)
            raise RuntimeUnavailable(f"{self.title} at {url} failed: {message}") from exc

    async def close(self) -> None:
        """Disconnect once the build cleanups under way are done; containers keep
        running (the engine owns them)."""
        await self._finish_build_cleanups()
        self._url = None
        await self._detach()

    # ---------------------------------------------------------------------- info
    @property
    def _limits_enforced(self) -> bool:
        return self._limits_status(self._info or {})[0]

    @property
    def _rootless(self) -> bool:
        return self._is_rootless(self._info or {})

    async def info(self) -> RuntimeInfo:
        """Version, rootless or not, cgroup version, and whether limits and the network
        policy hold (the agent firewall is applied on the way)."""
        info = await self._engine_info()
        self._info = info
        enforced, note = self._limits_status(info)
        egress_enforced, egress_note = await asyncio.to_thread(self._egress_status)
        return RuntimeInfo(
            name=self.name,
            limits_enforced=enforced,
            limits_note=note,
            egress_enforced=egress_enforced,
            egress_note=egress_note,
            socket=self._url,
            rootless=self._is_rootless(info),
            **self._describe(info),
        )

    # ---------------------------------------------------------------- containers
    async def _created(
        self, spec: ContainerSpec, plan: AgentNetworkPlan, env: dict[str, str]
    ) -> str:
        try:
            return await self._create(spec, plan, env)
        except Conflict as exc:
            raise Conflict(
                f"a container named {spec.name!r} exists already: {exc.message}", name=spec.name
            ) from exc
        except RuntimeUnavailable:
            raise
        except DockyardError as exc:
            raise RuntimeOperationError(
                f"creating container {spec.name!r} failed: {exc.message}", name=spec.name
            ) from exc

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a hardened container (see the engine's module docstring)."""
        if self._info is None:
            await self.info()
        plan, env = await self._agent_network(spec)
        container_id = await self._created(spec, plan, env)
        try:
            await self._start(container_id)
        except DockyardError as exc:
            with contextlib.suppress(DockyardError):
                await self.remove(container_id)
            raise RuntimeOperationError(
                f"starting container {spec.name!r} failed: {exc.message}",
                name=spec.name,
                # e.g. network_policy_failed: a rootless agent's policy did not load
                reason=exc.reason if isinstance(exc, RuntimeOperationError) else None,
            ) from exc
        await self._route_gateway(plan)
        info = await self.inspect(container_id)
        if info is None:
            raise RuntimeOperationError(f"container {spec.name!r} vanished right after start")
        return info

    async def inspect(self, ref: str) -> ContainerInfo | None:
        """State and hardening as the engine reports them, or None when missing."""
        if self._info is None:
            await self.info()
        attrs = await self._inspect_attrs(ref)
        if attrs is None:
            return None
        info = container_info(attrs, limits_enforced=self._limits_enforced)
        if info.running:
            await self._read_back(info)
        return info

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        """Containers, running or not, that carry all of ``labels``."""
        found = []
        for container_id in await self._list_ids(labels or {}):
            info = await self.inspect(container_id)
            if info is not None and has_labels(info.labels, labels or {}):
                found.append(info)
        return found


__all__ = [
    "CPU_PERIOD_US",
    "MIB",
    "EngineRuntime",
    "process_settings",
    "socket_candidates",
    "socket_url",
]
