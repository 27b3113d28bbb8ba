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
  without masquerade, bound on 127.0.0.1. ``backends/firewall.py``'s nftables tables are
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
  the runtime reads the Dockerfile first: every ``FROM`` and ``COPY --from`` image that is not
  ``scratch`` or an earlier stage (global ``ARG`` values substituted) must exist locally, or
  the build is refused before it starts. ``ADD <url>`` is fetched by the daemon itself.
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
import collections
import contextlib
import fnmatch
import functools
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dockyard.backends.firewall import IFACE_PREFIX, AgentFirewall, AgentNetwork, local_nft
from dockyard.core.dockerfile import external_images
from dockyard.core.errors import (
    BuildFailed,
    BuildTimeout,
    ConfigError,
    Conflict,
    NotFound,
    RuntimeOperationError,
    RuntimeUnavailable,
)
from dockyard.core.hookspecs import hookimpl
from dockyard.core.policy import parse_gateway
from dockyard.core.runtime import (
    LABEL_MANAGED,
    BuildRequest,
    BuiltImage,
    ContainerInfo,
    ContainerSpec,
    Hardening,
    LogCallback,
    Runtime,
    RuntimeInfo,
    gateway_variables,
)

if TYPE_CHECKING:
    import aiodocker
    import aiohttp

    from dockyard.core.config import Settings
    from dockyard.core.plugins import Registrar

log = logging.getLogger(__name__)

MIB = 1024 * 1024
EXTRA_HINT = "the Docker runtime needs aiodocker: pip install 'dockyard[docker]'"
DAEMON_HINT = (
    "start the Docker daemon (systemctl start docker; install it with apt-get install "
    "docker.io or contrib/ci/setup-docker.sh), or point [plugins.docker] socket (or "
    "DOCKER_HOST) at a running one"
)
#: Temporary repository builds are tagged with until they succeed.
BUILD_REPO = "localhost/dockyard-build"
MAX_LOG_LINE = 8192
#: A single message of the build stream larger than this is a broken stream.
MAX_STREAM_MESSAGE = 4 * MIB
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
ROOTLESS_EGRESS_NOTE = (
    "The network policy is not enforced by rootless Docker: its bridges live in rootless "
    "Docker's own network namespace, out of reach of dockyard's agent firewall. Run Docker "
    "rootful (on the same host as dockyard, which must run as root) to hold agents to their "
    "published port and the gateway."
)
#: Labels of the agent networks, their names and interfaces (see backends/firewall.py).
LABEL_NETWORK = "io.dockyard.network"
LABEL_GATEWAY = "io.dockyard.gateway"
AGENT_NETWORK = "dockyard-agents-docker"
AGENT_IFACE = "dyad"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


def agent_iface(daemon_id: str, digest: str | None = None) -> str:
    """The host interface of an agent network: ``dyad<daemon>`` (egress ``none``) or
    ``dyad<daemon>g<gateway>`` (at most 15 characters). Not Podman's ``dya0``, and one
    per daemon: two dockerds on one host given the same bridge name share one interface
    (the second one silently re-addresses it, seen with 20.10), breaking the first."""
    tag = hashlib.sha256(daemon_id.encode()).hexdigest()[:4]
    return f"{AGENT_IFACE}{tag}" if digest is None else f"{AGENT_IFACE}{tag}g{digest[:6]}"


# A container reference: a name or an id, nothing that could change the API path.
_CONTAINER_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# An image reference: [registry[:port]/]path[:tag][@digest], or an id.
_IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]*$")
_STEP = re.compile(r"^Step \d+/\d+ : (\S+)", re.I)
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")
_COMMITTED = re.compile(r"^ ---> ([0-9a-f]{12,64})\s*$")


@hookimpl
def dockyard_register_runtimes(register: Registrar) -> None:
    """Register the Docker runtime under the name ``docker`` (aiodocker loads on use)."""
    register("docker", DockerRuntime.from_settings)


@functools.cache
def _aiodocker() -> Any:
    """The aiodocker module, imported on first use; RuntimeUnavailable when not installed."""
    try:
        return importlib.import_module("aiodocker")
    except ImportError as exc:
        raise RuntimeUnavailable(EXTRA_HINT) from exc


# ------------------------------------------------------------------------------ helpers
def socket_url(value: str) -> str:
    """``/path/docker.sock``, ``unix:///path`` or ``tcp://h:p`` as a URL."""
    value = value.strip()
    if value.startswith("/"):
        return f"unix://{value}"
    return value


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(text).strip()


def _split_ref(ref: str) -> tuple[str, str]:
    """``name[:tag]`` into (repository, tag); a port in the registry is not a tag."""
    if "@" in ref:
        raise BuildFailed(f"image tag {ref!r} must not be a digest", tag=ref)
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


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


def _positive(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def parse_hardening(attrs: Mapping[str, Any], *, limits_enforced: bool = True) -> Hardening:
    """Security settings from a container's ``GET /containers/{id}/json``.

    With ``limits_enforced=False`` the cgroup limits are reported as absent: the daemon
    echoes them, but they do not hold.
    """
    hc = attrs.get("HostConfig") or {}
    cap_add = [str(c) for c in hc.get("CapAdd") or []]
    cap_drop = {str(c).upper() for c in hc.get("CapDrop") or []}
    security_opt = [str(o).replace("=", ":") for o in hc.get("SecurityOpt") or []]
    nnp = any(o in ("no-new-privileges", "no-new-privileges:true") for o in security_opt)

    nano_cpus = _positive(hc.get("NanoCpus"))
    quota, period = _positive(hc.get("CpuQuota")), _positive(hc.get("CpuPeriod"))
    if nano_cpus is None and quota and period:
        nano_cpus = quota * 1_000_000_000 // period
    memory = _positive(hc.get("Memory"))
    swap = hc.get("MemorySwap")
    swap_bytes = int(swap) if isinstance(swap, int) and swap != 0 else None
    pids = _positive(hc.get("PidsLimit"))
    if not limits_enforced:
        nano_cpus = memory = swap_bytes = pids = None

    ulimits: dict[str, tuple[int, int]] = {}
    for item in hc.get("Ulimits") or []:
        name = str(item.get("Name", "")).lower().removeprefix("rlimit_")
        if name:
            ulimits[name] = (int(item.get("Soft", 0)), int(item.get("Hard", 0)))

    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or hc.get("PortBindings") or {}
    published: list[tuple[str, int, int]] = []
    for key, bindings in sorted(ports.items()):
        container_port = int(str(key).split("/", 1)[0])
        for binding in bindings or []:
            host_port = _positive(binding.get("HostPort"))
            if host_port is not None:
                published.append((str(binding.get("HostIp") or ""), host_port, container_port))

    log_options = (hc.get("LogConfig") or {}).get("Config") or {}
    return Hardening(
        cap_drop_all=not cap_add and "ALL" in cap_drop,
        cap_add=cap_add,
        no_new_privileges=nnp,
        read_only=bool(hc.get("ReadonlyRootfs")),
        pids_limit=pids,
        memory_bytes=memory,
        memory_swap_bytes=swap_bytes,
        nano_cpus=nano_cpus,
        ulimits=ulimits,
        tmpfs={str(k): str(v) for k, v in (hc.get("Tmpfs") or {}).items()},
        published=published,
        log_max_size=str(log_options["max-size"]) if log_options.get("max-size") else None,
    )


def started_at(value: Any) -> float | None:
    """Epoch seconds of a Docker timestamp (RFC 3339 with nanoseconds); None when unset."""
    text = str(value or "")
    if not text or text.startswith("0001-"):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if match is None:
        return None
    head, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    try:
        return datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]}{zone}").timestamp()
    except ValueError:
        return None


def container_info(attrs: Mapping[str, Any], *, limits_enforced: bool = True) -> ContainerInfo:
    """A :class:`ContainerInfo` from a container's inspect JSON."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    hardening = parse_hardening(attrs, limits_enforced=limits_enforced)
    status = str(state.get("Status") or "unknown")
    running = bool(state.get("Running"))
    exited = status in ("exited", "dead") or (not running and status not in ("created",))
    fields: dict[str, Any] = {
        "id": str(attrs.get("Id", "")),
        "name": str(attrs.get("Name", "")).lstrip("/"),
        "image": str(config.get("Image") or attrs.get("Image") or ""),
        "status": status,
        "running": running,
        "labels": dict(config.get("Labels") or {}),
        "host_port": hardening.published[0][1] if hardening.published else None,
        "exit_code": int(state.get("ExitCode", 0)) if exited else None,
        "oom_killed": bool(state.get("OOMKilled")),
        "hardening": hardening,
    }
    if "started_at" in ContainerInfo.__struct_fields__:  # the contract's newer field
        fields["started_at"] = started_at(state.get("StartedAt"))
    return ContainerInfo(**fields)


# ------------------------------------------------------------------ the build context
@dataclass
class _IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool


def _translate(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go ``filepath.Match`` plus ``**``) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(char)
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^"):
                    body = "!" + body[1:]
                out += fnmatch.translate(f"[{body}]").removeprefix("(?s:").removesuffix(")\\Z")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(f"^{out}$")


def read_dockerignore(context: Path) -> list[_IgnorePattern]:
    """The context's ``.dockerignore`` patterns, as the Docker CLI reads them."""
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    patterns = []
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        line = os.path.normpath(line).replace(os.sep, "/")
        if len(line) > 1 and line.startswith("/"):
            line = line.lstrip("/")
        if line == ".":
            continue
        patterns.append(_IgnorePattern(_translate(line), exclusion))
    return patterns


def is_ignored(path: str, patterns: list[_IgnorePattern]) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is excluded: the last pattern matching it
    or one of its parent directories wins, ``!`` patterns re-include."""
    parts = path.split("/")
    parents = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    matched = False
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue
        if any(pattern.regex.match(p) for p in parents):
            matched = not pattern.exclusion
    return matched


def _walk(context: Path, patterns: list[_IgnorePattern]) -> Iterator[tuple[Path, str]]:
    has_exceptions = any(p.exclusion for p in patterns)
    for root, dirs, files in os.walk(context):
        rel_root = Path(root).relative_to(context).as_posix()
        prefix = "" if rel_root == "." else f"{rel_root}/"
        kept = []
        for name in sorted(dirs):
            rel = prefix + name
            if (context / rel).is_symlink():
                files.append(name)  # archived as a link, never followed
                continue
            if is_ignored(rel, patterns) and not has_exceptions:
                continue
            kept.append(name)
            if not is_ignored(rel, patterns):
                yield context / rel, rel
        dirs[:] = kept
        for name in sorted(files):
            rel = prefix + name
            if rel in (".dockerignore",) or not is_ignored(rel, patterns):
                yield context / rel, rel


def context_tar(context: Path, dockerfile: str) -> io.BufferedRandom:
    """The build context as a tar in a temporary file, ``.dockerignore`` applied (the
    Dockerfile and ``.dockerignore`` are always sent, as the Docker CLI does); owners are
    root, special files are left out."""
    patterns = read_dockerignore(context)
    out = tempfile.TemporaryFile(prefix="dockyard-context-")  # noqa: SIM115 - returned open
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            sent: set[str] = set()
            for path, rel in _walk(context, patterns):
                info = tar.gettarinfo(str(path), arcname=rel)
                if not (info.isfile() or info.isdir() or info.issym()):
                    continue
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isfile():
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)
                sent.add(rel)
            if dockerfile not in sent:
                info = tar.gettarinfo(str(context / dockerfile), arcname=dockerfile)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(context / dockerfile, "rb") as handle:
                    tar.addfile(info, handle)
        out.seek(0)
        return out  # type: ignore[return-value]
    except BaseException:
        out.close()
        raise


# ------------------------------------------------------------------------ build stream
@dataclass
class _BuildProgress:
    """What a build's JSON stream said so far: log lines, the container of the running
    step, the layers it committed, and the error it ended with."""

    on_log: LogCallback | None
    max_lines: int
    lines: collections.deque[str] = field(init=False)
    running: str | None = None
    committed: list[str] = field(default_factory=list)
    image_id: str | None = None
    error: str | None = None
    _pending: str = ""
    _step: str = ""
    _cached: bool = False

    def __post_init__(self) -> None:
        self.lines = collections.deque(maxlen=self.max_lines)

    def feed(self, message: Mapping[str, Any]) -> None:
        error = message.get("error") or (message.get("errorDetail") or {}).get("message")
        if error:
            self.error = str(error).strip()
            self._text(f"ERROR: {self.error}\n")
            return
        aux = message.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            self.image_id = aux["ID"]
        stream = message.get("stream")
        if isinstance(stream, str):
            self._text(stream)

    def flush(self) -> None:
        if self._pending:
            self._text("\n")

    def _text(self, text: str) -> None:
        self._pending += text
        *complete, self._pending = self._pending.split("\n")
        if len(self._pending) > MAX_LOG_LINE:
            complete.append(self._pending)
            self._pending = ""
        for line in complete:
            self._line(line.rstrip("\r")[:MAX_LOG_LINE])

    def _line(self, line: str) -> None:
        step = _STEP.match(line)
        if step is not None:
            self._step = step.group(1).upper()
            self._cached = False
        elif line.strip() == "---> Using cache":
            self._cached = True
        elif (running := _RUNNING_IN.match(line)) is not None:
            self.running = running.group(1)
        elif (committed := _COMMITTED.match(line)) is not None:
            # After FROM the id is the base image's: never ours to remove.
            if self._step != "FROM" and not self._cached:
                self.committed.append(committed.group(1))
            self.running = None
        self.lines.append(line)
        if self.on_log is not None:
            try:
                self.on_log(line)
            except Exception:
                log.exception("build log callback failed")


# ------------------------------------------------------------------------------ runtime
_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "socket": str,
    "network": str,
    "api_timeout_s": (int, float),
    "connect_timeout_s": (int, float),
    "build_log_lines": int,
    "build_cache": bool,
    "build_nofile": int,
    "build_nproc": int,
    "build_kill_grace_s": (int, float),
    "nft_path": str,
}


class DockerRuntime(Runtime):
    """Docker Engine through its REST API (aiodocker), with dockyard's hardening applied.

    :param socket: the daemon to use (path or URL); when set, it must answer.
    :param network: the network of builds that may use one (default: Docker's default
        bridge). Containers never join it: they join the agent networks (module docstring).
    :param build_cache: keep Docker's layer cache between builds (off: a build's layers
        are its own and nothing dangles after a failure).
    :param build_nofile: nofile ulimit of ``RUN`` steps; ``build_nproc`` likewise.
    :param build_kill_grace_s: how long a cancelled build's container may take to go.
    :param nft_path: the ``nft`` binary of the agent firewall.
    """

    name: ClassVar[str] = "docker"

    def __init__(
        self,
        socket: str | None = None,
        *,
        network: str | None = None,
        api_timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        build_log_lines: int = 2000,
        build_cache: bool = False,
        build_nofile: int = 4096,
        build_nproc: int = 4096,
        build_kill_grace_s: float = 15.0,
        nft_path: str = "nft",
    ) -> None:
        self._socket = socket_url(socket) if socket else None
        self._network = network or None
        self._api_timeout_s = float(api_timeout_s)
        self._connect_timeout_s = float(connect_timeout_s)
        self._build_log_lines = max(1, int(build_log_lines))
        self._build_cache = build_cache
        self._build_nofile = int(build_nofile)
        self._build_nproc = int(build_nproc)
        self._build_kill_grace_s = float(build_kill_grace_s)
        self._docker: aiodocker.Docker | None = None
        self._url: str | None = None
        self._info: dict[str, Any] | None = None
        self._firewall = AgentFirewall(local_nft(nft_path))
        self._network_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRuntime:
        """Build from the ``[plugins.docker]`` table; RuntimeUnavailable without aiodocker."""
        _aiodocker()
        options = settings.plugin_options("docker")
        for key, value in options.items():
            expected = _OPTIONS.get(key)
            if expected is None:
                raise ConfigError(
                    f"unknown option plugins.docker.{key}; known: {', '.join(sorted(_OPTIONS))}"
                )
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"plugins.docker.{key} has the wrong type: {value!r}")
        return cls(**options)

    # -------------------------------------------------------------- connection
    @property
    def url(self) -> str | None:
        """The URL of the daemon in use (None before ``open()``)."""
        return self._url

    def _candidates(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if os.environ.get("DOCKER_HOST"):
            found.append((socket_url(os.environ["DOCKER_HOST"]), "DOCKER_HOST"))
        if os.geteuid() != 0:
            runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
            found.append((f"unix://{runtime_dir}/docker.sock", "rootless user socket"))
        found.append(("unix:///var/run/docker.sock", "system socket"))
        return found

    async def _try(self, url: str) -> tuple[aiodocker.Docker | None, str]:
        """A client for ``url`` when a daemon answers there, else (None, why not)."""
        aiodocker = _aiodocker()
        if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
            return None, "no such socket"
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self._api_timeout_s, connect=30.0)
        try:
            client = aiodocker.Docker(url=url, timeout=timeout)
        except ValueError as exc:
            return None, str(exc)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await client.version()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            await client.close()
            return None, _message(exc) or type(exc).__name__
        return client, ""

    async def open(self) -> None:
        """Connect to the configured or discovered daemon; RuntimeUnavailable when none
        answers (dockyard never starts dockerd itself)."""
        if self._docker is not None:
            return
        if self._socket is not None:
            client, why = await self._try(self._socket)
            if client is None:
                raise RuntimeUnavailable(
                    f"no Docker daemon answers at the configured socket {self._socket}: {why}",
                    socket=self._socket,
                )
            url = self._socket
        else:
            tried = []
            client = None
            url = ""
            for candidate, origin in self._candidates():
                client, why = await self._try(candidate)
                if client is not None:
                    log.info("using Docker at %s (%s)", candidate, origin)
                    url = candidate
                    break
                tried.append(f"{candidate} ({why})")
            if client is None:
                missing = "" if shutil.which("dockerd") else "Docker is not installed. "
                raise RuntimeUnavailable(
                    f"{missing}No Docker daemon answers (tried {', '.join(tried)}): {DAEMON_HINT}",
                    tried=tried,
                )
        self._docker, self._url = client, url
        try:
            self._info = dict(await client.system.info())
        except Exception as exc:
            await self.close()
            raise RuntimeUnavailable(f"Docker at {url} failed: {_message(exc)}") from exc

    async def close(self) -> None:
        """Close the HTTP session (containers keep running: the daemon owns them)."""
        client, self._docker = self._docker, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

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

    @property
    def _limits_enforced(self) -> bool:
        return limits_status(self._info or {})[0]

    def _egress_status(self) -> tuple[bool, str]:
        """Whether the agent firewall holds here (applying it), and why not."""
        if is_rootless(self._info or {}):
            return False, ROOTLESS_EGRESS_NOTE
        if self._url is None or not self._url.startswith("unix://"):
            return False, (
                f"the Docker daemon at {self._url} is not on this host: dockyard's agent "
                "firewall acts on this host's kernel only"
            )
        note = self._firewall.check()
        return not note, note

    # -------------------------------------------------------------------- info
    async def info(self) -> RuntimeInfo:
        """Version, rootless or not, cgroup version, and whether limits and the network
        policy hold (the agent firewall is applied on the way)."""
        try:
            info = dict(await self.docker.system.info())
        except self._engine_errors() as exc:
            raise self._error(exc, "reading docker info") from exc
        self._info = info
        enforced, note = limits_status(info)
        egress_enforced, egress_note = await asyncio.to_thread(self._egress_status)
        security = [str(o) for o in info.get("SecurityOptions") or []]
        return RuntimeInfo(
            name=self.name,
            version=str(info.get("ServerVersion") or ""),
            rootless=is_rootless(info),
            cgroup_version=cgroup_version(info),
            limits_enforced=enforced,
            limits_note=note,
            egress_enforced=egress_enforced,
            egress_note=egress_note,
            socket=self._url,
            extra={
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
        )

    # ------------------------------------------------------------------- build
    def _build_params(
        self, request: BuildRequest, dockerfile: str, temp_ref: str
    ) -> dict[str, Any]:
        memory = int(request.memory_mb) * MIB
        return {
            "t": temp_ref,
            "dockerfile": dockerfile,
            "buildargs": json.dumps(dict(request.build_args)),
            "labels": json.dumps({**request.labels, LABEL_MANAGED: "true"}),
            "version": "1",  # the legacy builder: BuildKit ignores memory/CPU limits
            "rm": "1",
            "forcerm": "1",
            "pull": "0",
            "nocache": "0" if self._build_cache else "1",
            "networkmode": (self._network or "default") if request.network else "none",
            "memory": str(memory),
            "memswap": str(memory),
            "cpuperiod": "100000",
            "cpuquota": str(max(1000, int(request.cpus * 100_000))),
            "ulimits": json.dumps(
                [
                    {"Name": "nofile", "Soft": self._build_nofile, "Hard": self._build_nofile},
                    {"Name": "nproc", "Soft": self._build_nproc, "Hard": self._build_nproc},
                ]
            ),
        }

    async def _check_base_images(self, dockerfile: Path, request: BuildRequest) -> None:
        text = dockerfile.read_bytes()[: 1024 * 1024].decode("utf-8", "replace")
        for ref in external_images(text, request.build_args):
            if not _IMAGE_REF.match(ref) or not await self.image_exists(ref):
                raise BuildFailed(
                    f"build of {request.tag}: image {ref!r} is not on this host, and "
                    "dockyard never pulls images (build or load it first)",
                    tag=request.tag,
                    log_tail=[f"missing image: {ref}"],
                )

    async def build(self, request: BuildRequest, on_log: LogCallback | None = None) -> BuiltImage:
        """Build ``request.context`` into ``request.tag`` with the legacy builder; see the
        module docstring for what holds (no network, no pulls, limits, timeouts)."""
        docker = self.docker
        _split_ref(request.tag)
        context = Path(request.context).resolve()
        if not context.is_dir():
            raise BuildFailed(f"build context {context} is not a directory", tag=request.tag)
        dockerfile = (context / request.dockerfile).resolve()
        if not dockerfile.is_relative_to(context) or not dockerfile.is_file():
            raise BuildFailed(
                f"Dockerfile {request.dockerfile!r} is not a file inside the build context",
                tag=request.tag,
            )
        await self._check_base_images(dockerfile, request)
        relative = dockerfile.relative_to(context).as_posix()
        temp_ref = f"{BUILD_REPO}:{uuid.uuid4().hex}"
        params = self._build_params(request, relative, temp_ref)
        progress = _BuildProgress(on_log=on_log, max_lines=self._build_log_lines)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_s
        body = await asyncio.to_thread(context_tar, context, relative)
        response = None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    # aiodocker's images.build() has no memory, CPU, network or ulimit
                    # parameters: the same request, through the client's own request path.
                    async with docker._query(
                        "build",
                        "POST",
                        params=params,
                        data=body,
                        headers={"Content-Type": "application/x-tar"},
                        timeout=self._timeout(request.timeout_s + 60.0),
                    ) as response:
                        await self._read_build_stream(response, progress)
            except TimeoutError:
                outcome = await self._abort_build(response, progress, temp_ref, "timed out")
                raise BuildTimeout(
                    f"build of {request.tag} ran past its {request.timeout_s:g}s timeout and "
                    + ("was stopped" if outcome["stopped"] else "was abandoned (it may still run)"),
                    tag=request.tag,
                    timeout_s=request.timeout_s,
                    log_tail=list(progress.lines),
                    **outcome,
                ) from None
            except asyncio.CancelledError:
                await asyncio.shield(
                    self._abort_build(response, progress, temp_ref, "was cancelled")
                )
                raise
            except BuildFailed:  # a broken stream: disconnecting cancels the build
                await self._abort_build(response, progress, temp_ref, "sent a broken stream")
                raise
            except self._engine_errors() as exc:
                progress.flush()
                await self._remove_build_layers(progress, temp_ref)
                error = self._error(exc, f"build of {request.tag}")
                if isinstance(error, RuntimeUnavailable):
                    raise error from exc
                raise BuildFailed(
                    f"build of {request.tag} failed: {_message(exc)}",
                    tag=request.tag,
                    log_tail=[*progress.lines, _message(exc)],
                ) from exc
        finally:
            body.close()
            if response is not None:
                response.close()
        progress.flush()
        if progress.error is not None:
            await self._remove_build_layers(progress, temp_ref)
            raise BuildFailed(
                f"build of {request.tag} failed: {progress.error}",
                tag=request.tag,
                log_tail=list(progress.lines),
            )
        try:
            image_id = await self._finish_build(temp_ref, request.tag)
        except (RuntimeOperationError, NotFound, Conflict, RuntimeUnavailable) as exc:
            await self._remove_build_layers(progress, temp_ref)
            raise BuildFailed(
                f"build of {request.tag} failed: {exc.message}",
                tag=request.tag,
                log_tail=list(progress.lines),
            ) from exc
        return BuiltImage(id=image_id, tag=request.tag, log=list(progress.lines))

    @staticmethod
    async def _read_build_stream(response: Any, progress: _BuildProgress) -> None:
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            *messages, buffer = buffer.split(b"\n")
            if len(buffer) > MAX_STREAM_MESSAGE:
                raise BuildFailed(
                    "the build stream sent a message larger than 4 MiB",
                    log_tail=list(progress.lines),
                )
            for raw in messages:
                _feed(progress, raw)
        _feed(progress, buffer)

    async def _abort_build(
        self, response: Any, progress: _BuildProgress, temp_ref: str, reason: str
    ) -> dict[str, Any]:
        """Disconnect (the daemon then cancels the build), make sure its container is gone,
        and remove what it committed."""
        if response is not None:
            response.close()
        progress.flush()
        container = progress.running
        stopped = True
        if container is not None:
            stopped = await self._wait_gone(container, self._build_kill_grace_s)
            if not stopped:
                with contextlib.suppress(*self._engine_errors()):
                    await self.docker.containers.container(container).delete(force=True)
                stopped = await self._wait_gone(container, 5.0)
        await self._remove_build_layers(progress, temp_ref)
        outcome = {"stopped": stopped, "container": container}
        log.warning("build of %s %s: %s", temp_ref, reason, outcome)
        return outcome

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

    async def _remove_build_layers(self, progress: _BuildProgress, temp_ref: str) -> None:
        """Delete the temporary tag and the untagged layers this build committed (and any
        child of them a late step committed), newest first. Never forced: Docker refuses
        images that are tagged elsewhere, used by a container or parents of others."""
        errors = self._engine_errors()
        with contextlib.suppress(*errors):
            await self.docker.images.delete(temp_ref, force=True, noprune=False)
        ours = {i.removeprefix("sha256:")[:12] for i in progress.committed}
        if progress.image_id:
            ours.add(progress.image_id.removeprefix("sha256:")[:12])
        if not ours:
            return
        try:
            listed = await self.docker.images.list(all=True)
        except errors:
            listed = []
        parents = {
            str(i.get("Id", "")).removeprefix("sha256:")[:12]: (
                str(i.get("ParentId", "")).removeprefix("sha256:")[:12],
                [t for t in i.get("RepoTags") or [] if t != "<none>:<none>"],
            )
            for i in listed
        }
        changed = True
        while changed:  # children of our layers are ours too (a step that ended late)
            changed = False
            for image, (parent, _tags) in parents.items():
                if parent in ours and image not in ours:
                    ours.add(image)
                    changed = True
        order = [i.removeprefix("sha256:")[:12] for i in progress.committed]
        order += sorted(ours - set(order))
        for image in reversed(order):
            if parents.get(image, ("", []))[1]:
                continue  # tagged: not a leftover
            with contextlib.suppress(*errors):
                await self.docker.images.delete(image, force=False, noprune=False)

    async def _finish_build(self, temp_ref: str, tag: str) -> str:
        docker = self.docker
        try:
            image = await docker.images.inspect(temp_ref)
            image_id = str(image["Id"]).removeprefix("sha256:")
            repo, version = _split_ref(tag)
            await docker.images.tag(image_id, repo, tag=version)
            await docker.images.delete(temp_ref, force=False, noprune=True)
        except self._engine_errors() as exc:
            raise self._error(exc, f"tagging the image built as {temp_ref} as {tag}") from exc
        return image_id

    # ------------------------------------------------------------------ images
    async def image_exists(self, ref: str) -> bool:
        """Whether an image with this tag or id exists locally."""
        try:
            await self.docker.images.inspect(_image_ref(ref))
        except NotFound:
            return False
        except self._engine_errors() as exc:
            if _status(exc) == 404:
                return False
            raise self._error(exc, f"looking up image {ref}") from exc
        return True

    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Remove an image; a missing image is not an error, one in use is a Conflict."""
        try:
            await self.docker.images.delete(_image_ref(ref), force=force)
        except NotFound:
            return
        except self._engine_errors() as exc:
            if _status(exc) == 404:
                return
            raise self._error(exc, f"removing image {ref}") from exc

    # -------------------------------------------------------------- containers
    def _create_config(self, spec: ContainerSpec) -> dict[str, Any]:
        limits = spec.limits
        memory = int(limits.memory_mb) * MIB
        port = f"{int(spec.container_port)}/tcp"
        host_port = "" if spec.host_port is None else str(int(spec.host_port))
        host_config: dict[str, Any] = {
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "ReadonlyRootfs": bool(spec.read_only),
            "Tmpfs": {
                "/tmp": f"rw,nosuid,nodev,size={int(limits.tmpfs_mb)}m,mode=1777",
                **{
                    target: f"rw,nosuid,nodev,noexec,size={int(size_mb)}m,mode=1777"
                    for target, size_mb in spec.tmpfs.items()
                },
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
        }
        # IPv6 off inside: the agent networks are IPv4 only (the firewall covers both anyway).
        host_config["Sysctls"] = {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
        }
        config: dict[str, Any] = {
            "Image": spec.image,
            "Labels": {**spec.labels, LABEL_MANAGED: "true"},
            "Env": [f"{key}={value}" for key, value in spec.env.items()],
            "ExposedPorts": {port: {}},
            "HostConfig": host_config,
        }
        if spec.command:
            config["Cmd"] = list(spec.command)
        if spec.user:
            config["User"] = spec.user
        if spec.workdir:
            config["WorkingDir"] = spec.workdir
        return config

    # ------------------------------------------------------------- network policy
    async def _agent_network(self, spec: ContainerSpec) -> tuple[str, dict[str, str]]:
        """The network ``spec`` joins under its egress policy, and the env it gets (the
        gateway's URL). Networks are shared and kept: ``dockyard-agents-docker`` for egress
        ``none``, ``dockyard-agents-docker-gw-<hash>`` per gateway (``backends/firewall.py``).
        Rootful: the agent firewall is applied first; when it cannot be, no container starts
        (fail closed). Rootless: see ``ROOTLESS_EGRESS_NOTE`` (not verified here)."""
        if spec.network:
            raise RuntimeOperationError(
                f"container {spec.name!r}: the docker runtime puts containers on its agent "
                "networks under their egress policy; joining a named network is not supported",
                name=spec.name,
            )
        gateway = None
        if spec.egress == "gateway":
            if not spec.gateway:
                raise RuntimeOperationError(
                    f"container {spec.name!r}: egress 'gateway' needs a gateway", name=spec.name
                )
            gateway = parse_gateway(spec.gateway)
        enforce = not is_rootless(self._info or {})
        if enforce and (self._url is None or not self._url.startswith("unix://")):
            raise RuntimeOperationError(
                f"container {spec.name!r} not started: the network policy cannot be enforced: "
                f"{self._egress_status()[1]}",
                reason="network_policy_failed",
                name=spec.name,
            )
        # Which daemon: dockerds on one host may share their ID (20.10 reads it from
        # /etc/docker/key.json), never their data root.
        info = self._info or {}
        daemon_id = f"{info.get('ID') or ''}:{info.get('DockerRootDir') or ''}"
        if gateway is None:
            name, iface = AGENT_NETWORK, agent_iface(daemon_id)
        else:
            digest = hashlib.sha256(f"{gateway[0]}:{gateway[1]}".encode()).hexdigest()[:8]
            name, iface = f"{AGENT_NETWORK}-gw-{digest}", agent_iface(daemon_id, digest)
        if gateway is not None and not enforce and gateway[0].startswith("127."):
            raise RuntimeOperationError(
                f"container {spec.name!r}: rootless Docker cannot reach a gateway on the host's "
                f"loopback ({gateway[0]}:{gateway[1]}); give the gateway a non-loopback address",
                reason="network_policy_failed",
                name=spec.name,
            )
        async with self._network_lock:
            bridge_ip = await self._ensure_network(name, iface, gateway)
            if enforce:  # rootless: see ROOTLESS_EGRESS_NOTE
                try:
                    networks = await self._agent_networks()
                    await asyncio.to_thread(self._firewall.apply, networks)
                except RuntimeOperationError as exc:
                    raise RuntimeOperationError(
                        f"container {spec.name!r} not started: the network policy cannot be "
                        f"enforced: {exc.message}",
                        reason="network_policy_failed",
                        name=spec.name,
                    ) from exc
        env: dict[str, str] = {}
        if gateway is not None:
            host, port, path = gateway
            loopback = enforce and host.startswith("127.")
            if loopback and not await asyncio.to_thread(self._firewall.route_localnet, iface):
                log.warning("route_localnet not set on %s: the gateway may not answer", iface)
            address = f"{bridge_ip}:{port}" if enforce else f"{host}:{port}"
            env.update(gateway_variables(spec, f"http://{address}{path}"))
        return name, env

    async def _agent_networks(self) -> list[AgentNetwork]:
        """Every agent network this daemon has, as the firewall sees it."""
        try:
            found = await self.docker.networks.list(filters={"label": f"{LABEL_NETWORK}=agents"})
        except self._engine_errors() as exc:
            raise self._error(exc, "listing the agent networks") from exc
        networks = []
        for network in found or []:
            iface = str((network.get("Options") or {}).get(BRIDGE_NAME_OPTION) or "")
            config = ((network.get("IPAM") or {}).get("Config") or [{}])[0]
            subnet = str(config.get("Subnet") or "")
            if not iface.startswith(IFACE_PREFIX) or not subnet:
                log.warning("agent network %s is not one of ours; skipped", network.get("Name"))
                continue
            gateway = None
            label = str((network.get("Labels") or {}).get(LABEL_GATEWAY) or "")
            if label:
                host, port, _ = parse_gateway(label)
                gateway = (host, port)
            networks.append(AgentNetwork(iface=iface, subnet=subnet, gateway=gateway))
        return networks

    async def _ensure_network(
        self, name: str, iface: str, gateway: tuple[str, int, str] | None
    ) -> str:
        """Create the agent network ``name`` when missing; its bridge address. Kept once
        made (as with Podman: networks are never removed while containers come and go)."""
        docker = self.docker
        errors = self._engine_errors()
        expected = f"{gateway[0]}:{gateway[1]}" if gateway is not None else None
        try:
            network = await docker._query_json(f"networks/{name}")
        except errors as exc:
            if _status(exc) != 404:
                raise self._error(exc, f"preparing the agent network {name}") from exc
            labels = {LABEL_MANAGED: "true", LABEL_NETWORK: "agents"}
            if expected is not None:
                labels[LABEL_GATEWAY] = expected
            body = {
                "Name": name,
                "Driver": "bridge",
                "CheckDuplicate": True,
                # Not "Internal": Docker publishes no ports of containers on internal networks.
                "Internal": False,
                "EnableIPv6": False,
                "Options": {
                    BRIDGE_NAME_OPTION: iface,
                    "com.docker.network.bridge.enable_ip_masquerade": "false",
                    "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
                },
                "Labels": labels,
            }
            try:
                await docker.networks.create(body)
            except errors as create_exc:
                if _status(create_exc) != 409:  # 409: made meanwhile by another dockyard
                    raise self._error(create_exc, f"creating the agent network {name}") from (
                        create_exc
                    )
            try:
                network = await docker._query_json(f"networks/{name}")
            except errors as again:
                raise self._error(again, f"preparing the agent network {name}") from again
        labels = network.get("Labels") or {}
        options = network.get("Options") or {}
        if (
            options.get(BRIDGE_NAME_OPTION) != iface
            or labels.get(LABEL_GATEWAY) != expected
            or labels.get(LABEL_NETWORK) != "agents"
        ):
            raise RuntimeOperationError(
                f"network {name} exists but is not the agent network dockyard makes (interface "
                f"{iface}, gateway {expected}): remove it (docker network rm {name}) and "
                "dockyard makes it again",
                reason="network_policy_failed",
            )
        config = ((network.get("IPAM") or {}).get("Config") or [{}])[0]
        if not config.get("Subnet") or not config.get("Gateway"):
            raise RuntimeOperationError(f"network {name} has no IPv4 subnet with a gateway")
        return str(config["Gateway"])

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a hardened container (see the module docstring)."""
        docker = self.docker
        if self._info is None:
            await self.info()
        errors = self._engine_errors()
        name = _container_ref(spec.name)
        network, env = await self._agent_network(spec)
        config = self._create_config(spec)
        config["HostConfig"]["NetworkMode"] = network
        config["Env"] = [f"{k}={v}" for k, v in {**dict(spec.env), **env}.items()]
        try:
            container = await docker.containers.create(config, name=name)
        except errors as exc:
            if _status(exc) == 409:
                raise Conflict(
                    f"a container named {name!r} exists already: {_message(exc)}", name=name
                ) from exc
            if isinstance(self._error(exc, ""), RuntimeUnavailable):
                raise self._error(exc, f"creating container {name!r}") from exc
            raise RuntimeOperationError(
                f"creating container {name!r} failed: {_message(exc)}", name=name
            ) from exc
        try:
            await container.start()
        except errors as exc:
            with contextlib.suppress(*errors):
                await container.delete(force=True, v=True)
            raise RuntimeOperationError(
                f"starting container {name!r} failed: {_message(exc)}", name=name
            ) from exc
        info = await self.inspect(container.id)
        if info is None:
            raise RuntimeOperationError(f"container {name!r} vanished right after start")
        return info

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        """Stop within ``timeout_s`` (SIGTERM via the init, then SIGKILL); missing is fine."""
        seconds = max(0, int(timeout_s + 0.999))
        try:
            await self.docker.containers.container(_container_ref(ref)).stop(
                t=seconds, timeout=self._timeout(seconds + 60.0)
            )
        except NotFound:
            return
        except self._engine_errors() as exc:
            if _status(exc) == 404:
                return
            raise self._error(exc, f"stopping container {ref}") from exc

    async def remove(self, ref: str) -> None:
        """Force-remove a container (and its anonymous volumes); missing is fine."""
        try:
            container = self.docker.containers.container(_container_ref(ref))
        except NotFound:
            return
        try:
            await container.delete(force=True, v=True, timeout=self._timeout(self._api_timeout_s))
        except self._engine_errors() as exc:
            status = _status(exc)
            if status == 404:
                return
            in_progress = status == 409 and "in progress" in _message(exc)
            if in_progress and await self._wait_gone(ref, 30.0):
                return
            raise self._error(exc, f"removing container {ref}") from exc

    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of stdout and stderr (all when None)."""
        try:
            container = self.docker.containers.container(_container_ref(ref))
            frames = await container.log(
                stdout=True,
                stderr=True,
                tail="all" if tail is None else max(0, int(tail)),
                timeout=self._timeout(self._api_timeout_s),
            )
        except self._engine_errors() as exc:
            raise self._error(exc, f"reading the logs of container {ref}") from exc
        lines = "".join(frames).splitlines()
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    async def inspect(self, ref: str) -> ContainerInfo | None:
        """State and hardening as the daemon reports them, or None when missing."""
        try:
            attrs = await self.docker.containers.container(_container_ref(ref)).show()
        except NotFound:
            return None
        except self._engine_errors() as exc:
            if _status(exc) == 404:
                return None
            raise self._error(exc, f"inspecting container {ref}") from exc
        if self._info is None:
            await self.info()
        return container_info(attrs, limits_enforced=self._limits_enforced)

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        """Containers, running or not, that carry all of ``labels``."""
        params: dict[str, Any] = {"all": True}
        if labels:
            params["filters"] = {"label": [f"{key}={value}" for key, value in labels.items()]}
        try:
            found = await self.docker.containers.list(**params)
        except self._engine_errors() as exc:
            raise self._error(exc, "listing containers") from exc
        out = []
        for container in found:
            info = await self.inspect(container.id)
            if info is not None and all(info.labels.get(k) == v for k, v in (labels or {}).items()):
                out.append(info)
        return out


def _feed(progress: _BuildProgress, raw: bytes) -> None:
    raw = raw.strip()
    if not raw:
        return
    try:
        message = json.loads(raw)
    except ValueError:
        progress.feed({"stream": raw.decode("utf-8", "replace") + "\n"})
        return
    if isinstance(message, dict):
        progress.feed(message)


__all__ = [
    "DockerRuntime",
    "container_info",
    "context_tar",
    "dockyard_register_runtimes",
    "external_images",
    "is_ignored",
    "limits_status",
    "parse_hardening",
    "read_dockerignore",
]
