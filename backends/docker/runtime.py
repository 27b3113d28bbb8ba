"""The Docker runtime: Docker Engine through its REST API, with aiodocker (asyncio, aiohttp).

:class:`DockerRuntime` implements :class:`dockyard.core.runtime.Runtime`. It is optional:
install it with ``pip install 'dockyard[docker]'`` and select it with ``runtime = "docker"``
(or ``dockyard serve --runtime docker``). aiodocker is imported only when the runtime is
built, so dockyard loads without it; selecting the runtime without it is a clear error.

Where the daemon lives. ``open()`` uses, in order: ``[plugins.docker] socket`` (when it does
not answer that is an error, never a silent switch to another daemon), ``DOCKER_HOST``, the
rootless user socket ``$XDG_RUNTIME_DIR/docker.sock`` (non-root), ``/var/run/docker.sock``.
Unlike Podman, dockyard never starts a Docker daemon: dockerd is a system service that owns
the host's networking, and it runs as root (see the README's "Docker runtime").

What holds, as verified with dockerd 20.10.24 (Debian 12, runc, cgroupfs, cgroup v1 hybrid):

* Containers: ``CapDrop=ALL``, ``no-new-privileges``, a read-only root, a size-capped tmpfs
  at ``/tmp`` (Docker adds no other writable tmpfs), nofile/nproc ulimits, an init
  (``docker-init``, i.e. tini) as PID 1, ports published on ``host_ip`` (127.0.0.1) only,
  memory with swap equal to memory, ``NanoCpus`` and a pids limit, IPv6 off inside.
* Network policy (``ContainerSpec.egress``), rootful dockerd on this host: containers join
  ``dockyard-agents-docker`` (egress ``none``, interface ``dyad<daemon>``) or
  ``dockyard-agents-docker-gw-<hash>`` (one per gateway, ``dyad<daemon>g<hash>``):
  user-defined bridges made once and kept, not internal (Docker publishes no ports there),
  without masquerade, bound on 127.0.0.1. ``backends/engine/firewall.py``'s nftables tables are
  applied for every agent network before each start; no firewall, no container
  (``network_policy_failed``). The gateway is given as ``OPENAI_BASE_URL`` at the bridge
  address. A named network (``spec.network``) is refused; ``[plugins.docker] network`` is
  only the network of builds that may use one. Verified with the tests' dockerd
  (``--iptables=false``, ports through ``docker-proxy``), not with Docker's iptables mode.
  Rootless: see ``ROOTLESS_EGRESS_NOTE`` (not verified here).
* Logs: the ``json-file`` driver with ``max-size`` = ``limits.log_max_bytes`` and
  ``max-file`` = ``limits.log_max_files``: unlike Podman 4.3, Docker keeps rotated files.
* Resource limits: ``info()`` reads what the daemon says it can enforce (memory, swap, CFS
  quota, pids). When one is missing (rootless Docker on cgroup v1, no swap accounting),
  ``limits_enforced`` is False with a note naming it, and ``inspect()`` reports no memory,
  CPU or pids limit at all rather than one that may not hold. Limits are always requested:
  Docker drops the ones the kernel cannot apply.
* Builds use the legacy builder (``version=1`` on the build endpoint): BuildKit ignores the
  build memory and CPU limits, the legacy builder applies them to every ``RUN`` container
  (verified: a 64 MiB allocation under a 16 MiB cap is OOM-killed, ``cpu.cfs_quota_us`` set)
  along with ``networkmode=none`` (only ``lo`` inside ``RUN``) and nofile/nproc ulimits.
  There is no pids limit for ``RUN`` steps (the build API has none), as with Podman.
* Docker's legacy builder *pulls* a missing base image and has no "never pull" option, so
  the runtime reads the Dockerfile first (``core/dockerfile.py``, as every engine does):
  every ``FROM`` and ``COPY --from`` image that is not ``scratch`` or an earlier stage
  (global ``ARG`` values substituted) must exist locally, or the build is refused before it
  starts. ``ADD <url>`` is fetched by the daemon itself.
* No layer cache by default (``nocache``), so the layers a build commits are its own: when a
  build fails, times out or is cancelled, the runtime deletes them (only untagged images
  that nothing else uses; Docker refuses the rest), so nothing dangles. Intermediate
  containers are always removed (``forcerm``).
* Build timeouts: the daemon cancels a build when its client disconnects: it kills the
  running ``RUN`` container and removes it (verified: gone within ~0.2 s). On timeout the
  runtime closes the connection, waits (bounded) for that container to vanish, removes it
  itself if it did not, and reports ``stopped``. Builds are tagged with a private temporary
  name and only re-tagged on success, so a build that ends past its deadline never produces
  the requested tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from dockyard.backends.docker.build import DockerBuilds
from dockyard.backends.docker.containers import (
    _container_ref,
    _image_ref,
    agent_iface,
    create_config,
)
from dockyard.backends.docker.daemon import (
    ROOTLESS_V1_NOTE,
    cgroup_version,
    is_rootless,
    limits_status,
)
from dockyard.backends.engine.base import EngineRuntime, socket_candidates
from dockyard.backends.engine.build_egress import BuildEgressConfig
from dockyard.backends.engine.network import LABEL_NETWORK, AgentNetworkPlan, EngineNetwork
from dockyard.backends.engine.options import EngineOptions
from dockyard.core.errors import (
    Conflict,
    NotFound,
    RuntimeOperationError,
    RuntimeUnavailable,
)
from dockyard.core.hookspecs import hookimpl
from dockyard.core.runtime import ContainerSpec

if TYPE_CHECKING:
    import aiodocker
    import aiohttp

    from dockyard.core.config import Settings
    from dockyard.core.plugins import Registrar

log = logging.getLogger(__name__)

T = TypeVar("T")

EXTRA_HINT = "the Docker runtime needs aiodocker: pip install 'dockyard[docker]'"
DAEMON_HINT = (
    "start the Docker daemon (systemctl start docker; install it with apt-get install "
    "docker.io or contrib/ci/setup-docker.sh), or point [plugins.docker] socket (or "
    "DOCKER_HOST) at a running one"
)
ROOTLESS_EGRESS_NOTE = (
    "The network policy is not enforced by rootless Docker: its bridges live in rootless "
    "Docker's own network namespace, out of reach of dockyard's agent firewall. Run Docker "
    "rootful (on the same host as dockyard, which must run as root) to hold agents to their "
    "published port and the gateway."
)
#: The agent network of egress ``none`` (gateway networks add ``-gw-<hash>``).
AGENT_NETWORK = "dockyard-agents-docker"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


@functools.cache
def _aiodocker() -> Any:
    """The aiodocker module, imported on first use; RuntimeUnavailable when not installed."""
    try:
        return importlib.import_module("aiodocker")
    except ImportError as exc:
        raise RuntimeUnavailable(EXTRA_HINT) from exc


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(text).strip()


def _engine_network(network: Mapping[str, Any]) -> EngineNetwork:
    """An agent network from Docker's network JSON."""
    config = ((network.get("IPAM") or {}).get("Config") or [{}])[0]
    return EngineNetwork(
        name=str(network.get("Name") or ""),
        iface=str((network.get("Options") or {}).get(BRIDGE_NAME_OPTION) or ""),
        subnet=str(config.get("Subnet") or ""),
        bridge_ip=str(config.get("Gateway") or ""),
        labels=dict(network.get("Labels") or {}),
    )


class DockerOptions(EngineOptions):
    """``[plugins.docker]``."""

    network: str | None = None  # the network of builds that may use one (containers: never)
    connect_timeout_s: float = 5.0
    build_cache: bool = False  # keep Docker's layer cache (off: a build's layers are its own)


class DockerRuntime(DockerBuilds, EngineRuntime):
    """Docker Engine through its REST API (aiodocker), with dockyard's hardening applied;
    :class:`DockerOptions` as keywords (``DockerRuntime(socket=..., network=...)``)."""

    _docker: aiodocker.Docker | None = None
    name: ClassVar[str] = "docker"
    title, agent_network, rootless_egress_note = "Docker", AGENT_NETWORK, ROOTLESS_EGRESS_NOTE
    options_type = DockerOptions
    options: DockerOptions

    @property
    def _network(self) -> str | None:
        """The network of builds that may use one (containers never join it)."""
        return self.options.network or None

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRuntime:
        """Build from the ``[plugins.docker]`` table; RuntimeUnavailable without aiodocker."""
        _aiodocker()
        runtime = cls(**settings.plugin_options("docker"))
        # Base image aliases apply; the build proxy does not (its builds are refused).
        runtime.build_egress = BuildEgressConfig.from_settings(settings)
        return runtime

    @property
    def docker(self) -> aiodocker.Docker:
        """The aiodocker client; raises RuntimeUnavailable before ``open()``."""
        if self._docker is None:
            raise RuntimeUnavailable("the Docker runtime is not open")
        return self._docker

    def _error(self, exc: BaseException, what: str) -> Exception:
        """The dockyard error for an aiodocker/aiohttp failure while doing ``what``."""
        status = _status(exc)
        message = _message(exc)
        if status is None or status >= 900:
            return RuntimeUnavailable(f"Docker at {self._url} does not answer ({what}): {message}")
        if status == 404:
            return NotFound(f"{what}: {message}")
        if status == 409:
            return Conflict(f"{what}: {message}")
        return RuntimeOperationError(f"{what}: {message}", status=status)

    def _engine_errors(self) -> tuple[type[BaseException], ...]:
        import aiohttp

        return (_aiodocker().DockerError, aiohttp.ClientError, OSError, TimeoutError)

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        import aiohttp

        return aiohttp.ClientTimeout(total=seconds, connect=30.0)

    # -------------------------------------------------------------- connection
    def _candidates(self) -> list[tuple[str, str]]:
        return socket_candidates(
            "DOCKER_HOST", "docker.sock", "/var/run/docker.sock", system_for_users=True
        )

    async def _attach(self, url: str) -> str:
        aiodocker = _aiodocker()
        if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
            return "no such socket"
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.options.api_timeout_s, connect=30.0)
        try:
            client = aiodocker.Docker(url=url, timeout=timeout)
        except ValueError as exc:
            return str(exc)
        try:
            async with asyncio.timeout(self.options.connect_timeout_s):
                await client.version()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            await client.close()
            return _message(exc) or type(exc).__name__
        self._docker = client
        return ""

    async def _fallback(self, tried: list[str]) -> str:
        """dockyard never starts dockerd itself (see the module docstring)."""
        missing = "" if shutil.which("dockerd") else "Docker is not installed. "
        raise RuntimeUnavailable(
            f"{missing}No Docker daemon answers (tried {', '.join(tried)}): {DAEMON_HINT}",
            tried=tried,
        )

    async def _detach(self) -> None:
        client, self._docker = self._docker, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    # -------------------------------------------------------------------- info
    async def _engine_info(self) -> dict[str, Any]:
        try:
            return dict(await self.docker.system.info())
        except self._engine_errors() as exc:
            raise self._error(exc, "reading docker info") from exc

    def _describe(self, info: Mapping[str, Any]) -> dict[str, Any]:
        security = [str(o) for o in info.get("SecurityOptions") or []]
        return {
            "version": str(info.get("ServerVersion") or ""),
            "cgroup_version": cgroup_version(info),
            "extra": {
                "api_version": self.docker.api_version,
                "cgroup_driver": info.get("CgroupDriver"),
                "storage_driver": info.get("Driver"),
                "default_runtime": info.get("DefaultRuntime"),
                "init_binary": info.get("InitBinary"),
                "security_options": security,
                "userns_remap": any("name=userns" in o for o in security),
                "network": self._network,
                "warnings": list(info.get("Warnings") or []),
            },
        }

    def _is_rootless(self, info: Mapping[str, Any]) -> bool:
        return is_rootless(info)

    def _limits_status(self, info: Mapping[str, Any]) -> tuple[bool, str]:
        return limits_status(info)

    # ----------------------------------------------------------- agent networks
    def _agent_iface(self, digest: str | None) -> str:
        # Which daemon: dockerds on one host may share their ID (20.10 reads it from
        # /etc/docker/key.json), never their data root.
        info = self._info or {}
        return agent_iface(f"{info.get('ID') or ''}:{info.get('DockerRootDir') or ''}", digest)

    async def _show_network(self, name: str) -> dict[str, Any]:
        return await (await self.docker.networks.get(name)).show()

    async def _get_or_create_network(self, plan: AgentNetworkPlan) -> EngineNetwork:
        """Kept once made (as with Podman: networks are never removed while containers come
        and go)."""
        errors = self._engine_errors()
        try:
            return _engine_network(await self._show_network(plan.name))
        except errors as exc:
            if _status(exc) != 404:
                raise self._error(exc, f"preparing the agent network {plan.name}") from exc
        body = {
            "Name": plan.name,
            "Driver": "bridge",
            "CheckDuplicate": True,
            # Not "Internal": Docker publishes no ports of containers on internal networks.
            "Internal": False,
            "EnableIPv6": False,
            "Options": {
                BRIDGE_NAME_OPTION: plan.iface,
                "com.docker.network.bridge.enable_ip_masquerade": "false",
                "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
            },
            "Labels": plan.labels,
        }
        try:
            await self.docker.networks.create(body)
        except errors as exc:
            if _status(exc) != 409:  # 409: made meanwhile by another dockyard
                raise self._error(exc, f"creating the agent network {plan.name}") from exc
        try:
            return _engine_network(await self._show_network(plan.name))
        except errors as exc:
            raise self._error(exc, f"preparing the agent network {plan.name}") from exc

    async def _agent_networks(self) -> list[EngineNetwork]:
        try:
            found = await self.docker.networks.list(filters={"label": f"{LABEL_NETWORK}=agents"})
        except self._engine_errors() as exc:
            raise self._error(exc, "listing the agent networks") from exc
        return [_engine_network(network) for network in found or []]

    # -------------------------------------------------------------- containers
    async def _create(
        self, spec: ContainerSpec, plan: AgentNetworkPlan, env: dict[str, str]
    ) -> str:
        name = _container_ref(spec.name)
        config = create_config(spec, plan.name, env)
        try:
            container = await self.docker.containers.create(config, name=name)
        except self._engine_errors() as exc:
            raise self._error(exc, f"creating container {name!r}") from exc
        return str(container.id)

    async def _start(self, container_id: str) -> None:
        try:
            await self.docker.containers.container(container_id).start()
        except self._engine_errors() as exc:
            raise self._error(exc, f"starting container {container_id[:12]}") from exc

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        """Stop within ``timeout_s`` (SIGTERM via the init, then SIGKILL); missing is fine."""
        seconds = max(0, int(timeout_s + 0.999))
        await self._unless_missing(
            lambda: self.docker.containers.container(_container_ref(ref)).stop(
                t=seconds, timeout=self._timeout(seconds + 60.0)
            ),
            f"stopping container {ref}",
        )

    async def _unless_missing(self, request: Callable[[], Awaitable[T]], what: str) -> T | None:
        """What ``request`` answers, or None when the daemon has no such object."""
        try:
            return await request()
        except NotFound:
            return None
        except self._engine_errors() as exc:
            if _status(exc) == 404:
                return None
            raise self._error(exc, what) from exc

    async def remove(self, ref: str) -> None:
        """Force-remove a container (and its anonymous volumes); missing is fine."""
        try:
            container = self.docker.containers.container(_container_ref(ref))
        except NotFound:
            return
        try:
            timeout = self._timeout(self.options.api_timeout_s)
            await container.delete(force=True, v=True, timeout=timeout)
        except self._engine_errors() as exc:
            status = _status(exc)
            if status == 404:
                return
            in_progress = status == 409 and "in progress" in _message(exc)
            if in_progress and await self._wait_gone(ref, 30.0):
                return
            raise self._error(exc, f"removing container {ref}") from exc

    async def _wait_gone(self, container: str, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            try:
                await self.docker.containers.container(container).show()
            except self._engine_errors() as exc:
                if _status(exc) == 404:
                    return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.1)

    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of stdout and stderr (all when None)."""
        try:
            container = self.docker.containers.container(_container_ref(ref))
            frames = await container.log(
                stdout=True,
                stderr=True,
                tail="all" if tail is None else max(0, int(tail)),
                timeout=self._timeout(self.options.api_timeout_s),
            )
        except self._engine_errors() as exc:
            raise self._error(exc, f"reading the logs of container {ref}") from exc
        lines = "".join(frames).splitlines()
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    async def _inspect_attrs(self, ref: str) -> dict[str, Any] | None:
        attrs = await self._unless_missing(
            lambda: self.docker.containers.container(_container_ref(ref)).show(),
            f"inspecting container {ref}",
        )
        return None if attrs is None else dict(attrs)

    async def _list_ids(self, labels: Mapping[str, str]) -> list[str]:
        params: dict[str, Any] = {"all": True}
        if labels:
            params["filters"] = {"label": [f"{key}={value}" for key, value in labels.items()]}
        try:
            found = await self.docker.containers.list(**params)
        except self._engine_errors() as exc:
            raise self._error(exc, "listing containers") from exc
        return [str(container.id) for container in found]

    # ------------------------------------------------------------------ images
    async def image_exists(self, ref: str) -> bool:
        """Whether an image with this tag or id exists locally."""
        found = await self._unless_missing(
            lambda: self.docker.images.inspect(_image_ref(ref)), f"looking up image {ref}"
        )
        return found is not None

    async def image_id(self, ref: str) -> str | None:
        """The id of the local image ``ref`` names; None when there is none."""
        found = await self._unless_missing(
            lambda: self.docker.images.inspect(_image_ref(ref)), f"inspecting image {ref}"
        )
        return str((found or {}).get("Id") or "").removeprefix("sha256:") or None

    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Remove an image; a missing image is not an error, one in use is a Conflict."""
        await self._unless_missing(
            lambda: self.docker.images.delete(_image_ref(ref), force=force),
            f"removing image {ref}",
        )


@hookimpl
def dockyard_register_runtimes(register: Registrar) -> None:
    """Register the Docker runtime under the name ``docker`` (aiodocker loads on use)."""
    register("docker", DockerRuntime.from_settings)


__all__ = [
    "AGENT_NETWORK",
    "ROOTLESS_EGRESS_NOTE",
    "ROOTLESS_V1_NOTE",
    "DockerOptions",
    "DockerRuntime",
    "cgroup_version",
    "dockyard_register_runtimes",
    "is_rootless",
    "limits_status",
]
