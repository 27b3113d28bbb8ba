"""The container-runtime contract: what every runtime plugin (Podman, Docker, ...) provides.

Runtimes are async; a runtime built on a synchronous client runs it in worker threads. The
contract suite ``dockyard.testing.runtime_contract`` checks any implementation.
Nothing engine-specific belongs here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec

from dockyard.core.errors import RuntimeOperationError
from dockyard.core.models import Model

#: Label keys dockyard puts on everything it creates, so a restarted controller can adopt
#: what runs and reap what is orphaned.
LABEL_MANAGED = "io.dockyard.managed"
LABEL_DEPLOYMENT = "io.dockyard.deployment"
LABEL_COLOR = "io.dockyard.color"
LABEL_REVISION = "io.dockyard.revision"
#: Which dockyard (one per data directory) made it: a dockyard only ever reaps its own.
LABEL_INSTANCE = "io.dockyard.instance"

LogCallback = Callable[[str], None]
#: The variable through which a container with egress ``gateway`` learns its gateway's URL.
GATEWAY_ENV = "OPENAI_BASE_URL"
Egress = Literal["none", "gateway"]


class RuntimeInfo(Model):
    """What the runtime reports about itself and the host."""

    name: str
    version: str
    rootless: bool
    cgroup_version: str
    limits_enforced: bool
    limits_note: str = ""
    #: Whether the network policy (``ContainerSpec.egress``) holds on this host, and why not.
    egress_enforced: bool = False
    egress_note: str = "this runtime does not enforce a network policy"
    socket: str | None = None
    extra: dict[str, Any] = {}


class BuildRequest(Model):
    """Build an image from a context directory."""

    context: str
    tag: str
    dockerfile: str = "Dockerfile"
    build_args: dict[str, str] = {}
    labels: dict[str, str] = {}
    network: bool = False
    memory_mb: int = 2048
    cpus: float = 2.0
    timeout_s: float = 900.0


class BuiltImage(Model):
    """The result of a successful build."""

    id: str
    tag: str
    log: list[str] = []


class Limits(Model):
    """Hard limits applied to a running container."""

    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 256
    nofile: int = 1024
    nproc: int = 1024
    tmpfs_mb: int = 64
    log_max_bytes: int = 10 * 1024 * 1024
    log_max_files: int = 3


class ContainerSpec(Model):
    """A hardened container to run. Hardening is not optional: the runtime always applies
    cap-drop ALL, no-new-privileges, a read-only root with a size-capped tmpfs at /tmp, the
    limits, a non-root user when ``user`` is set, an init, and a port published on 127.0.0.1.

    Network policy. ``egress="none"``: the container answers on its published port and
    reaches nothing else: not the internet, not the host's services (on any of its
    addresses), not other containers. ``egress="gateway"``: the same, except that the one
    upstream ``gateway`` (``"IPv4:port"`` or ``"http://IPv4:port[/path]"``, e.g. an LLM
    gateway on the host's loopback) answers at an address the runtime puts in the
    container's ``gateway_env`` variables (by default ``GATEWAY_ENV``, ``OPENAI_BASE_URL``),
    each the gateway's URL plus that variable's suffix, overriding ``env``. A runtime that
    cannot enforce the policy says so in ``info().egress_enforced``/``egress_note``.

    ``tmpfs`` adds size-capped scratch mounts (path -> MiB; ``rw,nosuid,nodev,noexec``) next
    to ``/tmp``; ``workdir`` sets the working directory (the image's when None)."""

    name: str
    image: str
    container_port: int
    host_port: int | None = None
    host_ip: str = "127.0.0.1"
    command: list[str] = []
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    limits: Limits = msgspec.field(default_factory=Limits)
    user: str | None = None
    read_only: bool = True
    mounts: list[tuple[str, str]] = []
    #: A named engine network to join; runtimes that enforce ``egress`` refuse it.
    network: str | None = None
    egress: Egress = "none"
    gateway: str | None = None
    #: Variables that carry the gateway's address: name -> suffix appended to its URL.
    gateway_env: dict[str, str] = msgspec.field(default_factory=lambda: {GATEWAY_ENV: ""})
    #: Extra size-capped tmpfs mounts, path -> MiB (``rw,nosuid,nodev,noexec``).
    tmpfs: dict[str, int] = {}
    workdir: str | None = None


class Hardening(Model):
    """Security settings read back from the engine's own inspect output."""

    cap_drop_all: bool = False
    cap_add: list[str] = []
    no_new_privileges: bool = False
    read_only: bool = False
    pids_limit: int | None = None
    memory_bytes: int | None = None
    memory_swap_bytes: int | None = None
    nano_cpus: int | None = None
    ulimits: dict[str, tuple[int, int]] = {}
    tmpfs: dict[str, str] = {}
    published: list[tuple[str, int, int]] = []  # (host_ip, host_port, container_port)
    log_max_size: str | None = None


class ContainerInfo(Model):
    """A container as the runtime sees it."""

    id: str
    name: str
    image: str
    status: str  # created | running | exited | ...
    running: bool
    labels: dict[str, str] = {}
    host_port: int | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: float | None = None  # epoch seconds of the latest start
    hardening: Hardening = msgspec.field(default_factory=Hardening)


class ImageInfo(Model):
    """A local image as the runtime lists it (for garbage collection)."""

    id: str
    tags: list[str] = []
    created: float = 0.0  # epoch seconds
    size: int = 0  # bytes, shared layers counted in full
    labels: dict[str, str] = {}


class NetworkInfo(Model):
    """A network this runtime made that garbage collection may remove (an agent network
    for a gateway, a build network), as the runtime lists it."""

    name: str
    created: float = 0.0  # epoch seconds
    #: Containers (in any state) that joined it: a network with any is in use.
    containers: int = 0
    #: ``host:port`` of the gateway its containers reach (an agent network for a gateway).
    gateway: str | None = None
    labels: dict[str, str] = {}


class Runtime(abc.ABC):
    """A container engine. Instances are built by the factory a plugin registers through
    ``dockyard_register_runtimes`` and are used between ``open()`` and ``close()``."""

    name: ClassVar[str]

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (and start a private engine service when needed)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect and stop anything ``open()`` started."""

    @abc.abstractmethod
    async def info(self) -> RuntimeInfo:
        """Describe the engine: version, rootless or not, cgroup version, and whether
        resource limits are actually enforceable on this host."""

    @abc.abstractmethod
    async def build(self, request: BuildRequest, on_log: LogCallback | None = None) -> BuiltImage:
        """Build ``request.context`` into ``request.tag``; raise BuildFailed / BuildTimeout.
        No intermediate containers or dangling images are left behind on failure."""

    @abc.abstractmethod
    async def image_exists(self, ref: str) -> bool:
        """Whether an image with this tag or id exists locally."""

    async def image_id(self, ref: str) -> str | None:
        """The id of the local image ``ref`` names (None: no such image, or this engine
        cannot tell). Builds hash it for the base images ``base_image_aliases`` maps, so
        an alias pointed at another image never reuses what the old one built."""
        return None

    @abc.abstractmethod
    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Remove an image; a missing image is not an error."""

    @abc.abstractmethod
    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a hardened container; raise RuntimeOperationError on failure."""

    @abc.abstractmethod
    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        """Stop a container within ``timeout_s`` (then kill); a missing one is not an error."""

    @abc.abstractmethod
    async def remove(self, ref: str) -> None:
        """Force-remove a container; a missing one is not an error."""

    @abc.abstractmethod
    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of the container's stdout and stderr (all when None)."""

    @abc.abstractmethod
    async def inspect(self, ref: str) -> ContainerInfo | None:
        """The container's state and hardening as the engine reports them, or None."""

    @abc.abstractmethod
    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        """Containers (running or not) carrying all the given labels."""

    async def list_images(self, labels: Mapping[str, str] | None = None) -> list[ImageInfo]:
        """Local images carrying all the given labels. A runtime that cannot list images
        answers an empty list: garbage collection then keeps every image."""
        return []

    async def list_networks(self) -> list[NetworkInfo]:
        """The networks this runtime made that are not always needed (one per gateway, one
        per build: they pile up as gateways change and builds crash). A runtime that makes
        none, or cannot list them, answers an empty list: garbage collection keeps all."""
        return []

    async def remove_network(self, name: str) -> None:
        """Remove a network :meth:`list_networks` answered, unless a container joined it
        meanwhile (then RuntimeOperationError); a missing one is not an error."""
        raise RuntimeOperationError(f"the {self.name} runtime does not remove networks")


RuntimeFactory = Callable[..., Runtime]


def gateway_variables(spec: ContainerSpec, base_url: str) -> dict[str, str]:
    """The env that tells a container where its gateway answers: each of
    ``spec.gateway_env`` set to ``base_url`` (no trailing slash) plus its suffix."""
    base = base_url.rstrip("/")
    return {name: f"{base}{suffix}" for name, suffix in spec.gateway_env.items()}


def context_dir(path: str | Path) -> Path:
    """Resolve a build context, failing early when it is not a directory."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"build context {p} is not a directory")
    return p
