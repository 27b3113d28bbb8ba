"""The Podman runtime: dockyard's default container engine, through Podman's REST API.

:class:`PodmanRuntime` implements :class:`dockyard.core.runtime.Runtime` with podman-py (the
``podman`` package). podman-py is synchronous, so every call runs in a worker thread
(``asyncio.to_thread``); a build's log stream is pumped by a thread of its own.

Where the engine lives. ``open()`` uses, in order: the socket named by the operator
(``settings.podman_socket`` / ``socket=``; when it does not answer that is an error, never a
silent switch to another engine with another security model), ``CONTAINER_HOST``, the
rootless user socket ``$XDG_RUNTIME_DIR/podman/podman.sock`` (non-root) or
``/run/podman/podman.sock`` (root). When none answers it starts a private
``podman system service --time=0`` on a socket in a fresh temp dir (:class:`PodmanService`,
``backends/podman/service.py``) and stops it in ``close()``; containers keep running.

What holds, as verified with Podman 4.3.1 (Debian 12, runc, cgroupfs, cgroup v1 hybrid):

* Containers: ``--cap-drop=ALL`` (read back from the engine: no bounding capabilities in any
  process), no-new-privileges, read-only root, a size-capped tmpfs at ``/tmp`` (and no other
  writable tmpfs), nofile/nproc ulimits (always set: the host's hard nofile limit is below
  Podman's default, so without them every start fails with "error setting rlimit type 7"),
  an init (catatonit) as PID 1 so SIGTERM reaches the app, ports published on ``host_ip``
  (127.0.0.1) only.
* Resource limits (memory with swap equal to memory, CPU quota, pids) hold rootful. Rootless
  Podman on cgroup v1 ignores them, so they are not even passed there, ``info()`` reports
  ``limits_enforced=False`` with a note, and ``inspect()`` reports them as absent instead of
  echoing a number that does not hold. Ulimits still apply rootless.
* Logs: the k8s-file driver with ``size`` = ``limits.log_max_bytes``. conmon truncates the
  file when it reaches that size, so the file never exceeds it; Podman 4.3 has no
  ``max-file``: rotated copies are not kept and ``log_max_files`` has no effect. Podman
  cannot read a log that was truncated mid-line ("not a valid container log line"); then
  ``logs()`` reads the file itself (same host only) and skips the torn line.
* ``/dev/shm`` is sized like ``/tmp`` (``limits.tmpfs_mb``), not Podman's 64 MiB.
* Network policy (``ContainerSpec.egress``), rootful: containers join ``dockyard-agents``
  (egress ``none``, host interface ``dya0``) or ``dockyard-agents-gw-<hash>`` (one per
  gateway, interface ``dya0g<hash>``), bridges made once and kept (Podman 4.3 with netavark
  loses other containers' port forwarding when networks come and go while containers
  start and stop: seen with a network per container). ``backends/engine/firewall.py``'s nftables
  tables, applied before every start, hold them to their published port (which works on
  these networks; an ``internal`` network gets none from netavark 1.4) and the gateway,
  reached at ``http://<bridge address>:<gateway port>`` given as ``OPENAI_BASE_URL``. No
  firewall, no container (``network_policy_failed``): dockyard must run as root on the
  engine's host. IPv6 is off inside. Rootless: each agent's own network namespace gets
  the policy before its process runs (``backends/podman/rootless_net.py``); a gateway on
  the host's loopback is refused there (slirp4netns does not reach it).
* Builds: no network unless asked (or through the build proxy: ``build_network.py``); the
  build endpoint gets a private network namespace through ``nsoptions`` (Podman 4.3 ignores
  ``networkmode=none``; verified: only ``lo`` inside ``RUN``). Base images are never pulled
  (``pullpolicy=never``), intermediate containers always removed, no layer cache by default
  (a failed build leaves no dangling layer). ``RUN`` steps get the request's memory (swap
  included) and CPU caps where limits hold, nofile/nproc ulimits everywhere. Images carry
  the request's labels plus ``io.dockyard.managed=true``.
* Build timeouts: the runtime kills the build's ``RUN`` processes itself (``processes.py``).
  A build outside a ``RUN`` step cannot be stopped so; it is abandoned, and (tagged with a
  private temporary name, re-tagged on success only) never produces the requested tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from podman import PodmanClient
from podman import api as podman_api
from podman.errors import APIError, PodmanError

from dockyard.backends.engine.base import EngineRuntime, socket_candidates
from dockyard.backends.engine.network import (
    LABEL_NETWORK,
    AgentNetworkPlan,
    EngineNetwork,
)
from dockyard.backends.engine.options import EngineOptions
from dockyard.backends.podman.build import PodmanBuilds, _response_text
from dockyard.backends.podman.containers import (
    create_kwargs,
    patch_scratch_tmpfs,
    read_k8s_log,
)
from dockyard.backends.podman.processes import kill_marked_build_processes
from dockyard.backends.podman.rootless_net import ROOTLESS_EGRESS_NOTE, RootlessNetPolicy
from dockyard.backends.podman.service import INSTALL_HINT, PodmanService, socket_answers
from dockyard.core.errors import Conflict, NotFound, RuntimeOperationError, RuntimeUnavailable
from dockyard.core.hookspecs import hookimpl
from dockyard.core.runtime import ContainerInfo, ContainerSpec

if TYPE_CHECKING:
    from dockyard.core.config import Settings
    from dockyard.core.plugins import Registrar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The note ``info()`` gives when rootless Podman runs on cgroup v1.
ROOTLESS_V1_NOTE = (
    "Resource limits are ignored by rootless Podman on cgroup v1: memory, CPU and pids limits "
    "do not hold (ulimits such as nofile and nproc still apply). Run Podman rootful or on a "
    "cgroup v2 host with controller delegation to enforce them."
)
#: The agent network of egress ``none`` and its interface (gateway networks add ``g<hash>``).
AGENT_NETWORK = "dockyard-agents"
AGENT_IFACE = "dya0"


@hookimpl
def dockyard_register_runtimes(register: Registrar) -> None:
    """Register the Podman runtime under the name ``podman``."""
    register("podman", PodmanRuntime.from_settings)


def _engine_message(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        text = exc.explanation or (exc.args[0] if exc.args else "") or str(exc)
        return str(text).strip()
    return str(exc).strip() or type(exc).__name__


def limits_status(info: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether resource limits hold, from ``podman info``, with the reason when they do not."""
    host = info.get("host") or {}
    rootless = bool((host.get("security") or {}).get("rootless"))
    cgroup = str(host.get("cgroupVersion") or "")
    if not rootless:
        return True, ""
    if cgroup == "v1":
        return False, ROOTLESS_V1_NOTE
    controllers = set(host.get("cgroupControllers") or [])
    missing = sorted({"memory", "pids", "cpu"} - controllers)
    if missing:
        return False, (
            "Rootless Podman on cgroup v2 without delegated controllers: "
            f"{', '.join(missing)} limits do not hold (delegate them to this user with systemd)"
        )
    return True, ""


def _engine_network(network: Mapping[str, Any]) -> EngineNetwork:
    """An agent network from libpod's network JSON."""
    subnet = (network.get("subnets") or [{}])[0]
    return EngineNetwork(
        name=str(network.get("name") or ""),
        iface=str(network.get("network_interface") or ""),
        subnet=str(subnet.get("subnet") or ""),
        bridge_ip=str(subnet.get("gateway") or ""),
        labels=dict(network.get("labels") or {}),
    )


class PodmanOptions(EngineOptions):
    """``[plugins.podman]`` (the socket may come from ``settings.podman_socket``)."""

    podman_path: str = "podman"  # the podman binary, for starting a private service
    start_service: bool = True  # start a private service when no socket answers
    service_user: str | None = None  # run that private service as this user (rootless)
    service_start_timeout_s: float = 20.0
    build_layers: bool = False  # keep Podman's layer cache between builds (off: none dangles)
    #: Where the private service's pid file lives (dockyard's data directory), so the next
    #: start stops a service a killed dockyard left.
    state_dir: str | None = None
    #: Garbage collection sees only its networks whose names start with this ("": all).
    gc_network_prefix: str = ""


class PodmanRuntime(RootlessNetPolicy, PodmanBuilds, EngineRuntime):
    """Podman through its REST API (podman-py), with dockyard's hardening always applied.

    Takes :class:`PodmanOptions` as keywords: ``PodmanRuntime(socket=..., podman_path=...)``.
    """

    name: ClassVar[str] = "podman"
    options_type = PodmanOptions
    options: PodmanOptions
    title, agent_network, rootless_egress_note = "Podman", AGENT_NETWORK, ROOTLESS_EGRESS_NOTE

    _client: PodmanClient | None = None
    _service: PodmanService | None = None  # the private service ``open()`` started

    @classmethod
    def from_settings(cls, settings: Settings) -> PodmanRuntime:
        """Build from ``settings.podman_socket`` and the ``[plugins.podman]`` table."""
        options = settings.plugin_options("podman")
        socket_option = options.pop("socket", None)
        options.setdefault("state_dir", str(settings.data_path))
        runtime = cls(socket=settings.podman_socket or socket_option, **options)
        return runtime.with_build_proxy(settings)

    async def open(self) -> None:
        """Stop a private service a killed dockyard left, then connect (engine floor)."""
        if self._url is None and (pid_path := PodmanService.pid_path_in(self.options.state_dir)):
            await asyncio.to_thread(PodmanService.reap, pid_path)
            # The RUN steps of builds a killed dockyard left (the engine's, not our children).
            marker = self.build_marker_prefix
            await asyncio.to_thread(kill_marked_build_processes, marker, prefix=True)
        await super().open()

    @property
    def client(self) -> PodmanClient:
        """The podman-py client; raises RuntimeUnavailable before ``open()``."""
        if self._client is None:
            raise RuntimeUnavailable("the Podman runtime is not open")
        return self._client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except APIError as exc:
            if exc.response is None:
                raise RuntimeUnavailable(
                    f"Podman at {self._url} does not answer: {_engine_message(exc)}"
                ) from exc
            raise

    def _check(self, resp: Any, what: str, *, ok_missing: bool = False) -> bool:
        """True when ``resp`` succeeded; False for a 404 when ``ok_missing``."""
        status = resp.status_code
        if status < 400:
            return True
        if status == 404 and ok_missing:
            return False
        message = _response_text(resp)
        if status == 404:
            raise NotFound(f"{what}: {message}")
        if status == 409:
            raise Conflict(f"{what}: {message}")
        raise RuntimeOperationError(f"{what}: {message}", status=status)

    # -------------------------------------------------------------- connection
    def _candidates(self) -> list[tuple[str, str]]:
        return socket_candidates(
            "CONTAINER_HOST",
            "podman/podman.sock",
            "/run/podman/podman.sock",
            system_for_users=False,
        )

    async def _attach(self, url: str) -> str:
        if not await asyncio.to_thread(socket_answers, url):
            return "no Podman service answers there"
        self._client = PodmanClient(base_url=url, timeout=self.options.api_timeout_s)
        return ""

    async def _fallback(self, tried: list[str]) -> str:
        options = self.options
        if not options.start_service:
            raise RuntimeUnavailable(
                f"no Podman service answers (tried {', '.join(tried)}) and starting one is "
                "disabled",
                tried=tried,
            )
        if shutil.which(options.podman_path) is None:
            raise RuntimeUnavailable(INSTALL_HINT, tried=tried)
        service = PodmanService(
            options.podman_path,
            user=options.service_user,
            start_timeout_s=options.service_start_timeout_s,
            pid_path=PodmanService.pid_path_in(options.state_dir),
        )
        url = await asyncio.to_thread(service.start)
        self._service = service
        log.info("started a private Podman service at %s", url)
        self._client = PodmanClient(base_url=url, timeout=options.api_timeout_s)
        return url

    async def _detach(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        service, self._service = self._service, None
        if service is not None:
            await asyncio.to_thread(service.stop)

    # -------------------------------------------------------------------- info
    async def _engine_info(self) -> dict[str, Any]:
        return dict(await self._call(self.client.info))

    def _describe(self, info: Mapping[str, Any]) -> dict[str, Any]:
        host = info.get("host") or {}
        return {
            "version": str((info.get("version") or {}).get("Version", "")),
            "cgroup_version": str(host.get("cgroupVersion") or ""),
            "extra": {
                "api_version": (info.get("version") or {}).get("APIVersion"),
                "oci_runtime": (host.get("ociRuntime") or {}).get("name"),
                "cgroup_manager": host.get("cgroupManager"),
                "cgroup_controllers": host.get("cgroupControllers") or [],
                "storage_driver": (info.get("store") or {}).get("graphDriverName"),
                "private_service": self._service is not None,
            },
        }

    def _is_rootless(self, info: Mapping[str, Any]) -> bool:
        return bool(((info.get("host") or {}).get("security") or {}).get("rootless"))

    def _limits_status(self, info: Mapping[str, Any]) -> tuple[bool, str]:
        return limits_status(info)

    # ----------------------------------------------------------- agent networks
    def _agent_iface(self, digest: str | None) -> str:
        return AGENT_IFACE if digest is None else f"{AGENT_IFACE}g{digest}"

    def _network_sync(self, plan: AgentNetworkPlan) -> EngineNetwork:
        """Kept once made: Podman 4.3 with netavark loses other containers' port forwarding
        when networks are created and removed while containers start and stop (seen here
        with a network per container), so dockyard never removes them itself."""
        # raw: podman-py's networks.get() and create() have no network_interface.
        resp = self.client.api.get(f"/networks/{plan.name}/json")
        if resp.status_code == 404:
            body = {
                "name": plan.name,
                "driver": "bridge",
                "network_interface": plan.iface,
                # Not "internal": netavark 1.4 publishes no ports on internal networks.
                "internal": False,
                "dns_enabled": False,
                "ipv6_enabled": False,
                "labels": plan.labels,
            }
            resp = self.client.api.post(
                "/networks/create",
                data=podman_api.prepare_body(body),
                headers={"Content-Type": "application/json"},
            )
            if resp.status_code == 409:  # made meanwhile by another dockyard
                resp = self.client.api.get(f"/networks/{plan.name}/json")
        self._check(resp, f"preparing the agent network {plan.name}")
        return _engine_network(resp.json())

    async def _get_or_create_network(self, plan: AgentNetworkPlan) -> EngineNetwork:
        return await self._call(self._network_sync, plan)

    async def _agent_networks(self) -> list[EngineNetwork]:
        try:
            found = await self._call(
                self.client.networks.list, filters={"label": f"{LABEL_NETWORK}=agents"}
            )
        except (APIError, PodmanError) as exc:
            raise RuntimeOperationError(
                f"listing the agent networks: {_engine_message(exc)}"
            ) from exc
        return [_engine_network(network.attrs) for network in found]

    # -------------------------------------------------------------- containers
    def _create_container(
        self, spec: ContainerSpec, plan: AgentNetworkPlan, env: dict[str, str]
    ) -> str:
        kwargs = create_kwargs(spec, limits_enforced=self._limits_enforced)
        kwargs["networks"] = {plan.name: {}}
        kwargs["network_mode"] = "bridge"  # rootless would default to slirp4netns
        kwargs["environment"] = {**kwargs["environment"], **env}
        manager = self.client.containers
        payload = manager._render_payload({"image": spec.image, **kwargs})
        patch_scratch_tmpfs(payload, spec)
        # raw: podman-py's containers.create() drops a mount's options (patched above).
        resp = self.client.api.post(
            "/containers/create",
            headers={"content-type": "application/json"},
            data=podman_api.prepare_body(payload),
        )
        if resp.status_code >= 400 and "already in use" in _response_text(resp):
            raise Conflict(_response_text(resp), name=spec.name)
        self._check(resp, f"creating container {spec.name!r}")
        return str(resp.json()["Id"])

    async def _create(
        self, spec: ContainerSpec, plan: AgentNetworkPlan, env: dict[str, str]
    ) -> str:
        try:
            return await self._call(self._create_container, spec, plan, env)
        except (PodmanError, ValueError, TypeError) as exc:
            raise RuntimeOperationError(_engine_message(exc), name=spec.name) from exc

    async def _start(self, container_id: str) -> None:
        await self._before_start(container_id)  # rootless: the agent's policy (rootless_net)
        container = self.client.containers.prepare_model({"Id": container_id})
        try:
            await self._call(container.start)
        except APIError as exc:
            self._check(exc.response, f"starting container {container_id[:12]}")
            raise

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        """Stop within ``timeout_s`` (SIGTERM via the init, then SIGKILL); missing is fine."""
        seconds = max(0, int(timeout_s + 0.999))
        # raw: podman-py's Container.stop() times the request out at 1.5 x the stop timeout.
        resp = await self._call(
            self.client.api.post,
            f"/containers/{ref}/stop",
            params={"timeout": seconds},
            timeout=seconds + 60.0,
        )
        if resp.status_code == 304:  # already stopped
            return
        self._check(resp, f"stopping container {ref}", ok_missing=True)

    async def remove(self, ref: str) -> None:
        """Force-remove a container (and its anonymous volumes); missing is fine."""
        # raw: podman-py's containers.remove() has no stop timeout (Podman's ``timeout``).
        resp = await self._call(
            self.client.api.delete,
            f"/containers/{ref}",
            params={"force": True, "v": True, "timeout": 5},
            timeout=self.options.api_timeout_s,
        )
        self._check(resp, f"removing container {ref}", ok_missing=True)

    def _fetch_logs(self, ref: str, tail: int | None) -> list[str]:
        container = self.client.containers.prepare_model({"Id": ref})
        try:
            frames = container.logs(stdout=True, stderr=True, tail="all" if tail is None else tail)
            data = b"".join(frames)
        except APIError as exc:
            if exc.response is not None:
                self._check(exc.response, f"reading the logs of container {ref}")
            raise
        return data.decode("utf-8", "replace").splitlines()

    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of stdout and stderr (all when None)."""
        try:
            lines = await self._call(self._fetch_logs, ref, tail)
        except RuntimeOperationError as exc:
            # Podman 4.3 cannot read a k8s-file log that conmon truncated at its size cap
            # mid-line ("... is not a valid container log line"); read the file itself.
            if "not a valid container log line" not in exc.message:
                raise
            attrs = await self._inspect_attrs(ref) or {}
            path = ((attrs.get("HostConfig") or {}).get("LogConfig") or {}).get("Path")
            read = await asyncio.to_thread(read_k8s_log, path)
            if read is None:
                raise
            lines = read
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    async def _inspect_attrs(self, ref: str) -> dict[str, Any] | None:
        try:
            container = await self._call(self.client.containers.get, ref)
        except APIError as exc:
            if not self._check(exc.response, f"inspecting container {ref}", ok_missing=True):
                return None
            raise
        return dict(container.attrs)

    async def _read_back(self, info: ContainerInfo) -> None:
        """The capability sets of the running processes, read back from the engine."""

        def bounding_sets() -> list[Any]:
            container = self.client.containers.prepare_model({"Id": info.id})
            try:
                return list(container.top(ps_args="capbnd").get("Processes") or [])
            except (APIError, ValueError):  # exited meanwhile: Podman answers an error or nothing
                return []

        processes = await self._call(bounding_sets)
        if processes:
            dropped = all(str(row[0]).strip() == "none" for row in processes if row)
            info.hardening.cap_drop_all = dropped and not info.hardening.cap_add

    async def _list_ids(self, labels: Mapping[str, str]) -> list[str]:
        # A list: podman-py formats a mapping's list value as one string.
        filters = [f"label={key}={value}" for key, value in labels.items()]
        try:
            found = await self._call(self.client.containers.list, all=True, filters=filters)
        except (APIError, PodmanError) as exc:
            raise RuntimeOperationError(f"listing containers: {_engine_message(exc)}") from exc
        return [str(container.id) for container in found]

    # ------------------------------------------------------------------ images
    async def image_exists(self, ref: str) -> bool:
        """Whether an image with this tag or id exists locally."""
        # raw: podman-py's images.exists() answers False for any error, not only a 404.
        resp = await self._call(self.client.api.get, f"/images/{ref}/exists")
        return bool(self._check(resp, f"looking up image {ref}", ok_missing=True))

    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Remove an image; a missing image is not an error, one in use is a Conflict."""
        try:
            await self._call(self.client.images.remove, ref, force=force)
        except APIError as exc:
            if self._check(exc.response, f"removing image {ref}", ok_missing=True):
                raise


__all__ = [
    "AGENT_IFACE",
    "AGENT_NETWORK",
    "ROOTLESS_EGRESS_NOTE",
    "ROOTLESS_V1_NOTE",
    "PodmanOptions",
    "PodmanRuntime",
    "dockyard_register_runtimes",
    "limits_status",
]
