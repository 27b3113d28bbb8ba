"""The Podman runtime: dockyard's default container engine, through Podman's REST API.

:class:`PodmanRuntime` implements :class:`dockyard.core.runtime.Runtime` with podman-py (the
``podman`` package). podman-py is synchronous, so every call runs in a worker thread
(``asyncio.to_thread``); a build's log stream is pumped by a thread of its own.

Where the engine lives. ``open()`` uses, in order: the socket named by the operator
(``settings.podman_socket`` / ``socket=``; when it does not answer that is an error, never a
silent switch to another engine with another security model), ``CONTAINER_HOST``, the
rootless user socket ``$XDG_RUNTIME_DIR/podman/podman.sock`` (non-root) or
``/run/podman/podman.sock`` (root). When none answers it starts a private
``podman system service --time=0`` on a socket in a fresh temp dir (:class:`PodmanService`)
and stops it in ``close()``; containers keep running (conmon owns them).

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
  start and stop: seen with a network per container). ``backends/firewall.py``'s nftables
  tables, applied before every start, hold them to their published port (which works on
  these networks; an ``internal`` network gets none from netavark 1.4) and the gateway,
  reached at ``http://<bridge address>:<gateway port>`` given as ``OPENAI_BASE_URL``. No
  firewall, no container (``network_policy_failed``): dockyard must run as root on the
  engine's host. IPv6 is off inside. Rootless: see ``ROOTLESS_EGRESS_NOTE``; a gateway on
  the host's loopback is refused there (slirp4netns does not reach it).
* Builds: no network unless asked. Podman 4.3's build endpoint ignores ``networkmode=none``
  and shares the *host's* network namespace unless ``nsoptions`` asks for a private one, so
  both are sent (verified: only ``lo`` inside ``RUN``). Base images are never pulled
  (``pullpolicy=never``), intermediate containers are always removed, no layer cache by
  default (so a failed build leaves no dangling layer images). ``RUN`` steps get the
  request's memory (swap included) and CPU caps where limits hold, and nofile/nproc
  ulimits everywhere. Images carry the request's labels plus ``io.dockyard.managed=true``.
* Build timeouts: Podman keeps building after the client disconnects, so on timeout the
  runtime kills the build's ``RUN`` processes itself. Each build carries a marker in the
  ``no_proxy`` build argument (a predefined argument: it reaches every ``RUN`` environment
  without an ``ARG`` line, and its value is not stored in the image); the runtime finds the
  ``buildah-oci-runtime`` processes whose OCI bundle (written by Podman, out of the build's
  reach) holds the marker and SIGKILLs their containers, which fails the build and lets
  buildah clean up. This needs the engine on the same host and permission to signal its
  processes (root, or the user running rootless Podman). A build that is not in a ``RUN``
  step cannot be stopped this way; it is abandoned, and because builds are tagged with a
  private temporary name and only re-tagged on success, an abandoned build never produces
  the requested tag.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlparse

from podman import PodmanClient
from podman import api as podman_api
from podman.errors import APIError, PodmanError

from dockyard.backends.firewall import IFACE_PREFIX, AgentFirewall, AgentNetwork, local_nft
from dockyard.core import children
from dockyard.core.children import PidFile
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
    from dockyard.core.config import Settings
    from dockyard.core.plugins import Registrar

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
CPU_PERIOD_US = 100_000
#: The note ``info()`` gives when rootless Podman runs on cgroup v1.
ROOTLESS_V1_NOTE = (
    "Resource limits are ignored by rootless Podman on cgroup v1: memory, CPU and pids limits "
    "do not hold (ulimits such as nofile and nproc still apply). Run Podman rootful or on a "
    "cgroup v2 host with controller delegation to enforce them."
)
#: The note ``info()`` gives about the network policy under rootless Podman.
ROOTLESS_EGRESS_NOTE = (
    "The network policy is not enforced by rootless Podman: agent containers share a bridge "
    "inside rootless Podman's own network namespace, whose traffic leaves through slirp4netns, "
    "so they can reach the internet and the host's non-loopback addresses (not its loopback, "
    "so not a gateway there). Run Podman rootful to hold agents to their published port and "
    "the gateway."
)
#: Label of the agent networks, their name, and their interface (see backends/firewall.py).
LABEL_NETWORK = "io.dockyard.network"
LABEL_GATEWAY = "io.dockyard.gateway"
AGENT_NETWORK = "dockyard-agents"
AGENT_IFACE = "dya0"
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
INSTALL_HINT = (
    "Podman is not installed: apt-get install podman runc uidmap slirp4netns catatonit "
    "(or run contrib/ci/setup-podman.sh as root), or point settings.podman_socket at a "
    "running Podman service"
)
#: Temporary repository builds are tagged with until they succeed.
BUILD_REPO = "localhost/dockyard-build"
MAX_LOG_LINE = 8192
#: One line of Podman's k8s-file log driver: time, stream, (P)artial or (F)ull, text.
_K8S_LOG_LINE = re.compile(r"^\S+ (?:stdout|stderr) ([PF]) ?(.*)$")


@hookimpl
def dockyard_register_runtimes(register: Registrar) -> None:
    """Register the Podman runtime under the name ``podman``."""
    register("podman", PodmanRuntime.from_settings)


# ------------------------------------------------------------------------------ helpers
def socket_url(value: str) -> str:
    """``/path/podman.sock`` or ``unix:///path`` or ``tcp://h:p`` or ``ssh://...`` as a URL."""
    value = value.strip()
    if value.startswith("/"):
        return f"unix://{value}"
    return value


def _unix_path(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.scheme in ("unix", "http+unix"):
        return parsed.path
    return None


def socket_answers(url: str, timeout_s: float = 5.0) -> bool:
    """Whether a Podman service answers ``/_ping`` at ``url``."""
    path = _unix_path(url)
    if path is not None and not os.path.exists(path):
        return False
    try:
        with PodmanClient(base_url=url, timeout=timeout_s) as client:
            return bool(client.ping())
    except Exception:
        return False


def _engine_message(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        text = exc.explanation or (exc.args[0] if exc.args else "") or str(exc)
        return str(text).strip()
    return str(exc).strip() or type(exc).__name__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _response_message(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        return str(resp.text).strip()
    if isinstance(body, dict):
        return str(body.get("message") or body.get("cause") or body).strip()
    return str(body)


def _split_ref(ref: str) -> tuple[str, str]:
    """``name[:tag]`` into (repository, tag); a port in the registry is not a tag."""
    if "@" in ref:
        raise BuildFailed(f"image tag {ref!r} must not be a digest", tag=ref)
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


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


def _int_or_none(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def parse_hardening(attrs: Mapping[str, Any], *, limits_enforced: bool = True) -> Hardening:
    """Security settings from a container's inspect JSON (libpod or Docker-compatible).

    With ``limits_enforced=False`` the cgroup limits are reported as absent: the engine may
    echo them, but they do not hold.
    """
    hc = attrs.get("HostConfig") or {}
    cap_add = [str(c) for c in hc.get("CapAdd") or []]
    cap_drop = {str(c).upper() for c in hc.get("CapDrop") or []}
    cap_drop_all = not cap_add and ("ALL" in cap_drop or cap_drop >= DEFAULT_CAPABILITIES)
    security_opt = [str(o) for o in hc.get("SecurityOpt") or []]
    nnp = any(
        o.replace("=", ":") in ("no-new-privileges", "no-new-privileges:true") for o in security_opt
    )

    nano_cpus = _int_or_none(hc.get("NanoCpus"))
    quota, period = _int_or_none(hc.get("CpuQuota")), _int_or_none(hc.get("CpuPeriod"))
    if nano_cpus is None and quota and period:
        nano_cpus = quota * 1_000_000_000 // period
    memory = _int_or_none(hc.get("Memory"))
    swap = hc.get("MemorySwap")
    swap_bytes = int(swap) if isinstance(swap, int) and swap != 0 else None
    pids = _int_or_none(hc.get("PidsLimit"))
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
            host_port = _int_or_none(binding.get("HostPort"))
            if host_port is not None:
                published.append((str(binding.get("HostIp") or ""), host_port, container_port))

    log_config = hc.get("LogConfig") or {}
    log_options = log_config.get("Config") or {}
    log_size = log_config.get("Size") or log_options.get("max-size") or None
    return Hardening(
        cap_drop_all=cap_drop_all,
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
        log_max_size=str(log_size) if log_size else None,
    )


def container_info(attrs: Mapping[str, Any], *, limits_enforced: bool = True) -> ContainerInfo:
    """A :class:`ContainerInfo` from a container's inspect JSON."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    hardening = parse_hardening(attrs, limits_enforced=limits_enforced)
    status = str(state.get("Status") or "unknown")
    exited = status in ("exited", "stopped") or (not state.get("Running") and status != "created")
    return ContainerInfo(
        id=str(attrs.get("Id", "")),
        name=str(attrs.get("Name", "")).lstrip("/"),
        image=str(attrs.get("ImageName") or config.get("Image") or attrs.get("Image") or ""),
        status=status,
        running=bool(state.get("Running")),
        labels=dict(config.get("Labels") or {}),
        host_port=hardening.published[0][1] if hardening.published else None,
        exit_code=int(state.get("ExitCode", 0)) if exited else None,
        oom_killed=bool(state.get("OOMKilled")),
        started_at=_timestamp(state.get("StartedAt")),
        hardening=hardening,
    )


def _timestamp(value: Any) -> float | None:
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


# ------------------------------------------------------------------------ build killing
def _proc_pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid in _proc_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children[int(fields[1])].append(pid)
    return children


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for pid in _proc_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(pid)
    return members


def _descendants(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _bundle_has_marker(pid: int, marker: str) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        if not argv0.endswith(b"buildah-oci-runtime"):
            return False
        spec = json.loads(Path(f"/proc/{pid}/cwd/config.json").read_text())
    except (OSError, ValueError):
        return False
    env = ((spec.get("process") or {}).get("env")) or []
    for item in env:
        name, _, value = str(item).partition("=")
        if name == "no_proxy" and marker in value.split(","):
            return True
    return False


def kill_marked_build_processes(marker: str) -> int:
    """SIGKILL the ``RUN`` containers of the build whose ``no_proxy`` holds ``marker``.

    Killing a RUN container's init ends its whole PID namespace; the build step fails and
    buildah removes the container. Returns how many processes were signalled.
    """
    owners = [pid for pid in _proc_pids() if _bundle_has_marker(pid, marker)]
    if not owners:
        return 0
    children = _children_map()
    killed = 0
    for owner in owners:
        for pid in _descendants(owner, children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def _shutdown_response(resp: Any) -> None:
    """Unblock a thread reading a streamed response by shutting its socket down."""
    raw = getattr(resp, "raw", None)
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()


# ------------------------------------------------------------------------------ service
class PodmanService:
    """A private ``podman system service`` on a socket in a fresh temp dir.

    Rootful by default; with ``user`` (needs root) it runs as that unprivileged user, i.e.
    rootless Podman (``XDG_RUNTIME_DIR`` defaults to ``/run/user/<uid>``, created when
    missing). Stopping it stops the service process group; containers
    it started keep running (conmon owns them). Used by :class:`PodmanRuntime` when no
    socket answers, and by the tests to get engines of their own.

    With ``pid_path`` it records itself there (``core/children.py``), so :meth:`reap`
    stops a service a killed dockyard left; it always gets SIGKILL when its parent dies.
    """

    def __init__(
        self,
        podman_path: str = "podman",
        *,
        user: str | None = None,
        runtime_dir: str | None = None,
        start_timeout_s: float = 20.0,
        pid_path: Path | None = None,
    ) -> None:
        self.podman_path = podman_path
        self.pid_file = PidFile(pid_path, "the private Podman service") if pid_path else None
        self.user = user
        self.runtime_dir = runtime_dir
        self.start_timeout_s = start_timeout_s
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._pause_pid_before: int | None = None

    @property
    def socket_path(self) -> Path:
        if self.dir is None:
            raise RuntimeError("service not started")
        return self.dir / "podman.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _log_tail(self, lines: int = 20) -> str:
        if self.dir is None:
            return ""
        try:
            text = (self.dir / "service.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _popen_args(self) -> dict[str, Any]:
        binary = shutil.which(self.podman_path)
        if binary is None:
            raise RuntimeUnavailable(INSTALL_HINT)
        args: dict[str, Any] = {"args": [binary, "system", "service", "--time=0", self.url]}
        if self.user is None:
            # With these set, podman acts as a remote client instead of serving.
            remote = ("CONTAINER_HOST", "CONTAINER_CONNECTION")
            args["env"] = {k: v for k, v in os.environ.items() if k not in remote}
            return args
        # Switch user in the child itself (not through runuser/su): the service stays our
        # direct child, so it is waited for and never left as an orphan or a zombie.
        entry = pwd.getpwnam(self.user)
        runtime_dir = self.runtime_dir or f"/run/user/{entry.pw_uid}"
        self.runtime_dir = runtime_dir
        if not os.path.isdir(runtime_dir):
            os.makedirs(runtime_dir, mode=0o700)
            os.chown(runtime_dir, entry.pw_uid, entry.pw_gid)
        args.update(
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
            cwd=entry.pw_dir,
            env={
                "HOME": entry.pw_dir,
                "USER": entry.pw_name,
                "LOGNAME": entry.pw_name,
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "XDG_RUNTIME_DIR": runtime_dir,
            },
        )
        return args

    def _pause_pid(self) -> int | None:
        if self.runtime_dir is None:
            return None
        try:
            pid = int(Path(self.runtime_dir, "libpod", "tmp", "pause.pid").read_text().strip())
            alive = b"catatonit" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if alive else None

    def start(self) -> str:
        """Start the service and wait (bounded) until it answers; returns its URL."""
        self.dir = Path(tempfile.mkdtemp(prefix="dockyard-podman-"))
        try:
            popen_args = self._popen_args()
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                os.chown(self.dir, entry.pw_uid, entry.pw_gid)
                self._pause_pid_before = self._pause_pid()
            with open(self.dir / "service.log", "wb") as out:
                self.process = children.popen(
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                    **popen_args,
                )
            if self.pid_file is not None:
                self.pid_file.record(self.process.pid, popen_args["args"][0], dir=str(self.dir))
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeUnavailable(
                        f"podman system service exited with {self.process.returncode}: "
                        f"{self._log_tail()}"
                    )
                if socket_answers(self.url, timeout_s=2.0):
                    return self.url
                time.sleep(0.1)
            raise RuntimeUnavailable(
                f"podman system service did not answer within {self.start_timeout_s:.0f}s: "
                f"{self._log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the service (SIGTERM, then SIGKILL) and remove its socket dir."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            # The whole group: rootless podman re-executes itself into the user namespace.
            while (proc.poll() is None or _group_members(proc.pid)) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
            if proc.poll() is None or _group_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
        if self.user is not None:
            self._stop_idle_pause_process()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self.pid_file is not None:
            self.pid_file.clear()

    @staticmethod
    def reap(pid_path: Path) -> bool:
        """Stop the service a killed dockyard left (recorded in ``pid_path``, still the same
        process) and remove its socket directory; True when there was one."""
        record = PidFile(pid_path, "the private Podman service").reap()
        if record is None:
            return False
        leftover = Path(str(record.get("dir") or ""))
        if leftover.name.startswith("dockyard-podman-"):
            shutil.rmtree(leftover, ignore_errors=True)
        return True

    def _stop_idle_pause_process(self) -> None:
        """Stop the rootless pause process this service started, once nothing else uses it."""
        pid = self._pause_pid()
        if pid is None or pid == self._pause_pid_before or self.user is None:
            return
        uid = pwd.getpwnam(self.user).pw_uid
        for other in _proc_pids():
            if other == pid:
                continue
            try:
                if os.stat(f"/proc/{other}").st_uid != uid:
                    continue
                state = Path(f"/proc/{other}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                return  # another Podman process (or anything) of this user still runs
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


# ------------------------------------------------------------------------------ runtime
_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "socket": str,
    "podman_path": str,
    "start_service": bool,
    "service_user": str,
    "service_start_timeout_s": (int, float),
    "api_timeout_s": (int, float),
    "build_log_lines": int,
    "build_layers": bool,
    "build_nofile": int,
    "build_nproc": int,
    "build_kill_grace_s": (int, float),
    "nft_path": str,
}


class PodmanRuntime(Runtime):
    """Podman through its REST API (podman-py), with dockyard's hardening always applied.

    :param socket: the Podman service to use (path or URL); when set, it must answer.
    :param podman_path: the ``podman`` binary, for starting a private service.
    :param start_service: start a private service when no socket answers.
    :param service_user: run that private service as this user (rootless; needs root).
    :param build_layers: keep Podman's layer cache between builds (off: nothing dangles).
    :param build_nofile: nofile ulimit of ``RUN`` steps; ``build_nproc`` likewise.
    :param build_kill_grace_s: how long a timed-out build may take to die before it is
        abandoned.
    :param nft_path: the ``nft`` binary of the agent firewall (rootful Podman).
    """

    name: ClassVar[str] = "podman"

    def __init__(
        self,
        socket: str | None = None,
        *,
        podman_path: str = "podman",
        start_service: bool = True,
        service_user: str | None = None,
        service_start_timeout_s: float = 20.0,
        api_timeout_s: float = 120.0,
        build_log_lines: int = 2000,
        build_layers: bool = False,
        build_nofile: int = 4096,
        build_nproc: int = 4096,
        build_kill_grace_s: float = 15.0,
        nft_path: str = "nft",
        state_dir: str | None = None,
    ) -> None:
        self._socket = socket_url(socket) if socket else None
        self._service_pid_path = Path(state_dir) / "podman-service.pid" if state_dir else None
        self._podman_path = podman_path
        self._start_service = start_service
        self._service_user = service_user
        self._service_start_timeout_s = float(service_start_timeout_s)
        self._api_timeout_s = float(api_timeout_s)
        self._build_log_lines = max(1, int(build_log_lines))
        self._build_layers = build_layers
        self._build_nofile = int(build_nofile)
        self._build_nproc = int(build_nproc)
        self._build_kill_grace_s = float(build_kill_grace_s)
        self._client: PodmanClient | None = None
        self._url: str | None = None
        self._service: PodmanService | None = None
        self._host: dict[str, Any] | None = None
        self._firewall = AgentFirewall(local_nft(nft_path))
        self._network_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> PodmanRuntime:
        """Build from ``settings.podman_socket`` and the ``[plugins.podman]`` table."""
        options = settings.plugin_options("podman")
        for key, value in options.items():
            expected = _OPTIONS.get(key)
            if expected is None:
                raise ConfigError(
                    f"unknown option plugins.podman.{key}; known: {', '.join(sorted(_OPTIONS))}"
                )
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"plugins.podman.{key} has the wrong type: {value!r}")
        socket_option = options.pop("socket", None)
        return cls(
            socket=settings.podman_socket or socket_option,
            state_dir=str(settings.data_path),
            **options,
        )

    # -------------------------------------------------------------- connection
    @property
    def url(self) -> str | None:
        """The URL of the service in use (None before ``open()``)."""
        return self._url

    def _candidates(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if os.environ.get("CONTAINER_HOST"):
            found.append((socket_url(os.environ["CONTAINER_HOST"]), "CONTAINER_HOST"))
        if os.geteuid() != 0:
            runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
            found.append((f"unix://{runtime_dir}/podman/podman.sock", "rootless user socket"))
        else:
            found.append(("unix:///run/podman/podman.sock", "rootful system socket"))
        return found

    def _connect(self) -> None:
        url: str | None = None
        if self._service_pid_path is not None:
            PodmanService.reap(self._service_pid_path)  # a killed dockyard's
        if self._socket is not None:
            if not socket_answers(self._socket):
                raise RuntimeUnavailable(
                    f"no Podman service answers at the configured socket {self._socket}",
                    socket=self._socket,
                )
            url = self._socket
        else:
            tried = []
            for candidate, origin in self._candidates():
                tried.append(candidate)
                if socket_answers(candidate):
                    log.info("using Podman at %s (%s)", candidate, origin)
                    url = candidate
                    break
            if url is None:
                if not self._start_service:
                    raise RuntimeUnavailable(
                        f"no Podman service answers (tried {', '.join(tried)}) and starting "
                        "one is disabled",
                        tried=tried,
                    )
                if shutil.which(self._podman_path) is None:
                    raise RuntimeUnavailable(INSTALL_HINT, tried=tried)
                service = PodmanService(
                    self._podman_path,
                    user=self._service_user,
                    start_timeout_s=self._service_start_timeout_s,
                    pid_path=self._service_pid_path,
                )
                url = service.start()
                self._service = service
                log.info("started a private Podman service at %s", url)
        self._client = PodmanClient(base_url=url, timeout=self._api_timeout_s)
        self._url = url
        try:
            self._host = self._client.info()
        except Exception as exc:
            self._disconnect()
            raise RuntimeUnavailable(f"Podman at {url} failed: {_engine_message(exc)}") from exc

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        service, self._service = self._service, None
        if service is not None:
            service.stop()

    async def open(self) -> None:
        """Connect to Podman, starting a private service when no socket answers."""
        if self._client is None:
            await asyncio.to_thread(self._connect)

    async def close(self) -> None:
        """Disconnect and stop the private service if ``open()`` started one."""
        await asyncio.to_thread(self._disconnect)

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
        message = _response_message(resp)
        if status == 404:
            raise NotFound(f"{what}: {message}")
        if status == 409:
            raise Conflict(f"{what}: {message}")
        raise RuntimeOperationError(f"{what}: {message}", status=status)

    @property
    def _limits_enforced(self) -> bool:
        return limits_status(self._host or {})[0]

    @property
    def _rootless(self) -> bool:
        return bool(((self._host or {}).get("host") or {}).get("security", {}).get("rootless"))

    def _egress_status(self) -> tuple[bool, str]:
        """Whether the agent firewall holds here (applying it), and why not."""
        if self._rootless:
            return False, ROOTLESS_EGRESS_NOTE
        if self._url is None or _unix_path(self._url) is None:
            return False, (
                f"the Podman service at {self._url} is not on this host: dockyard's agent "
                "firewall acts on this host's kernel only"
            )
        note = self._firewall.check()
        return not note, note

    # -------------------------------------------------------------------- info
    async def info(self) -> RuntimeInfo:
        """Version, rootless or not, cgroup version, and whether limits and the network
        policy hold (the agent firewall is applied on the way)."""
        host_info = await self._call(self.client.info)
        self._host = host_info
        host = host_info.get("host") or {}
        enforced, note = limits_status(host_info)
        egress_enforced, egress_note = await asyncio.to_thread(self._egress_status)
        return RuntimeInfo(
            name=self.name,
            version=str((host_info.get("version") or {}).get("Version", "")),
            rootless=bool((host.get("security") or {}).get("rootless")),
            cgroup_version=str(host.get("cgroupVersion") or ""),
            limits_enforced=enforced,
            limits_note=note,
            egress_enforced=egress_enforced,
            egress_note=egress_note,
            socket=self._url,
            extra={
                "api_version": (host_info.get("version") or {}).get("APIVersion"),
                "oci_runtime": (host.get("ociRuntime") or {}).get("name"),
                "cgroup_manager": host.get("cgroupManager"),
                "cgroup_controllers": host.get("cgroupControllers") or [],
                "storage_driver": (host_info.get("store") or {}).get("graphDriverName"),
                "private_service": self._service is not None,
            },
        )

    # ------------------------------------------------------------------- build
    def _build_params(
        self, request: BuildRequest, dockerfile: str, marker: str, temp_ref: str
    ) -> dict[str, Any]:
        build_args = dict(request.build_args)
        previous = build_args.get("no_proxy")
        build_args["no_proxy"] = f"{previous},{marker}" if previous else marker
        params: dict[str, Any] = {
            "t": temp_ref,
            "dockerfile": dockerfile,
            "buildargs": json.dumps(build_args),
            "labels": json.dumps({**request.labels, LABEL_MANAGED: "true"}),
            "rm": True,
            "forcerm": True,
            "pullpolicy": "never",
            "layers": self._build_layers,
            "outputformat": "application/vnd.docker.distribution.manifest.v2+json",
            # Podman 4.3 ignores networkmode=none and would share the host's network
            # namespace: ask for a private one, configured (bridge) or not (only lo).
            "networkmode": "2" if request.network else "1",
            "nsoptions": json.dumps([{"Name": "network", "Host": False, "Path": ""}]),
            "ulimits": json.dumps(
                [
                    f"nofile={self._build_nofile}:{self._build_nofile}",
                    f"nproc={self._build_nproc}:{self._build_nproc}",
                ]
            ),
        }
        if self._limits_enforced:
            memory = int(request.memory_mb) * MIB
            params.update(
                memory=memory,
                memswap=memory,
                cpuperiod=CPU_PERIOD_US,
                cpuquota=max(1000, int(request.cpus * CPU_PERIOD_US)),
            )
        return params

    def _post_build(self, context: Path, params: dict[str, Any], read_timeout_s: float) -> Any:
        excludes = podman_api.prepare_containerignore(str(context))
        body = podman_api.create_tar(anchor=str(context), exclude=excludes)
        try:
            return self.client.api.post(
                "/build",
                params=params,
                data=body,
                headers={"Content-type": "application/x-tar"},
                stream=True,
                timeout=(30.0, read_timeout_s),
            )
        finally:
            body.close()

    @staticmethod
    def _pump(resp: Any, deliver: Callable[[tuple[str, str | None]], None]) -> None:
        try:
            for raw in resp.iter_lines():
                if not raw:
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    deliver(("stream", raw.decode("utf-8", "replace") + "\n"))
                    continue
                if not isinstance(msg, dict):
                    continue
                error = msg.get("error") or (msg.get("errorDetail") or {}).get("message")
                if error:
                    deliver(("error", str(error)))
                elif isinstance(msg.get("stream"), str):
                    deliver(("stream", msg["stream"]))
        except Exception as exc:
            deliver(("broken", f"{type(exc).__name__}: {exc}"))
        finally:
            with contextlib.suppress(Exception):
                resp.close()
            deliver(("end", None))

    def _stop_build(self, resp: Any, marker: str, reader: threading.Thread) -> dict[str, Any]:
        deadline = time.monotonic() + self._build_kill_grace_s
        killed = 0
        while reader.is_alive() and time.monotonic() < deadline:
            killed += kill_marked_build_processes(marker)
            reader.join(0.2)
        stopped = not reader.is_alive()
        if not stopped:
            _shutdown_response(resp)
            reader.join(5.0)
        return {"killed_processes": killed, "stopped": stopped}

    def _remove_image_quietly(self, ref: str) -> None:
        with contextlib.suppress(Exception):
            self.client.api.delete(f"/images/{ref}", params={"force": True})

    def _finish_build(self, temp_ref: str, build_id: str, tag: str) -> str:
        resp = self.client.api.get(f"/images/{temp_ref}/json")
        self._check(resp, f"inspecting the image built as {temp_ref}")
        image_id = str(resp.json()["Id"]).removeprefix("sha256:")
        repo, version = _split_ref(tag)
        self._check(
            self.client.api.post(f"/images/{image_id}/tag", params={"repo": repo, "tag": version}),
            f"tagging {image_id[:12]} as {tag}",
        )
        self._check(
            self.client.api.post(
                f"/images/{image_id}/untag", params={"repo": BUILD_REPO, "tag": build_id}
            ),
            f"removing the temporary tag {temp_ref}",
        )
        return image_id

    async def build(self, request: BuildRequest, on_log: LogCallback | None = None) -> BuiltImage:
        """Build ``request.context`` into ``request.tag``; see the module docstring for what
        holds (no network, no pulls, timeouts that kill the build)."""
        _ = self.client  # fail early when not open
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
        build_id = uuid.uuid4().hex
        marker = f"dockyard-build-{build_id}"
        temp_ref = f"{BUILD_REPO}:{build_id}"
        params = self._build_params(
            request, dockerfile.relative_to(context).as_posix(), marker, temp_ref
        )

        lines: collections.deque[str] = collections.deque(maxlen=self._build_log_lines)
        pending = ""

        def add(text: str) -> None:
            nonlocal pending
            pending += text
            *complete, pending = pending.split("\n")
            if len(pending) > MAX_LOG_LINE:
                complete.append(pending)
                pending = ""
            for line in complete:
                line = line.rstrip("\r")[:MAX_LOG_LINE]
                lines.append(line)
                if on_log is not None:
                    try:
                        on_log(line)
                    except Exception:
                        log.exception("build log callback failed")

        def flush() -> None:
            if pending:
                add("\n")

        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + request.timeout_s
        read_timeout = request.timeout_s + self._build_kill_grace_s + 60.0
        resp = await self._call(self._post_build, context, params, read_timeout)
        if resp.status_code >= 400:
            message = _response_message(resp)
            raise BuildFailed(
                f"build of {request.tag} refused: {message}", tag=request.tag, log_tail=[message]
            )

        queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

        def deliver(item: tuple[str, str | None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(queue.put_nowait, item)

        reader = threading.Thread(
            target=self._pump,
            args=(resp, deliver),
            name=f"podman-build-{build_id[:8]}",
            daemon=True,
        )
        reader.start()

        error: str | None = None
        broken: str | None = None

        def handle(kind: str, value: str | None) -> None:
            nonlocal error, broken
            if kind == "stream" and value is not None:
                add(value)
            elif kind == "error" and value is not None:
                error = value.strip()
                add(f"ERROR: {error}\n")
            elif kind == "broken":
                broken = value

        async def abort(reason: str) -> dict[str, Any]:
            outcome = await asyncio.to_thread(self._stop_build, resp, marker, reader)
            while not queue.empty():
                kind, value = queue.get_nowait()
                if kind != "end":
                    handle(kind, value)
            flush()
            await asyncio.to_thread(self._remove_image_quietly, temp_ref)
            log.warning("build of %s %s: %s", request.tag, reason, outcome)
            return outcome

        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                kind, value = await asyncio.wait_for(queue.get(), remaining)
                if kind == "end":
                    break
                handle(kind, value)
        except TimeoutError:
            outcome = await abort("timed out")
            raise BuildTimeout(
                f"build of {request.tag} ran past its {request.timeout_s:g}s timeout and was "
                + ("stopped" if outcome["stopped"] else "abandoned (it may still run)"),
                tag=request.tag,
                timeout_s=request.timeout_s,
                log_tail=list(lines),
                **outcome,
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(abort("was cancelled"))
            raise
        flush()

        if error is not None or broken is not None:
            await asyncio.to_thread(self._remove_image_quietly, temp_ref)
            reason = error or f"the connection to Podman broke ({broken})"
            raise BuildFailed(
                f"build of {request.tag} failed: {reason}", tag=request.tag, log_tail=list(lines)
            )
        try:
            image_id = await self._call(self._finish_build, temp_ref, build_id, request.tag)
        except (RuntimeOperationError, NotFound, Conflict) as exc:
            await asyncio.to_thread(self._remove_image_quietly, temp_ref)
            raise BuildFailed(
                f"build of {request.tag} failed: {exc.message}",
                tag=request.tag,
                log_tail=list(lines),
            ) from exc
        return BuiltImage(id=image_id, tag=request.tag, log=list(lines))

    # ------------------------------------------------------------------ images
    async def image_exists(self, ref: str) -> bool:
        """Whether an image with this tag or id exists locally."""
        resp = await self._call(self.client.api.get, f"/images/{ref}/exists")
        return bool(self._check(resp, f"looking up image {ref}", ok_missing=True))

    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Remove an image; a missing image is not an error, one in use is a Conflict."""
        resp = await self._call(self.client.api.delete, f"/images/{ref}", params={"force": force})
        self._check(resp, f"removing image {ref}", ok_missing=True)

    # -------------------------------------------------------------- containers
    def _create_kwargs(self, spec: ContainerSpec) -> dict[str, Any]:
        limits = spec.limits
        mounts: list[dict[str, Any]] = [
            {
                "type": "tmpfs",
                "source": "tmpfs",
                "target": "/tmp",
                "size": f"{int(limits.tmpfs_mb)}m",
                "mode": "1777",
            }
        ]
        for target, size_mb in spec.tmpfs.items():
            mounts.append(
                {
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "target": target,
                    "size": f"{int(size_mb)}m",
                    "mode": "1777",
                }
            )
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
        }
        if spec.command:
            kwargs["command"] = list(spec.command)
        if spec.user:
            kwargs["user"] = spec.user
        if spec.workdir:
            kwargs["working_dir"] = spec.workdir
        # IPv6 off inside: the private network is IPv4 only (the firewall covers both anyway).
        kwargs["sysctls"] = {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
        }
        if self._limits_enforced:
            memory = int(limits.memory_mb) * MIB
            kwargs.update(
                pids_limit=int(limits.pids),
                mem_limit=memory,
                memswap_limit=memory,
                cpu_period=CPU_PERIOD_US,
                cpu_quota=max(1000, int(limits.cpus * CPU_PERIOD_US)),
            )
        return kwargs

    # ------------------------------------------------------------- network policy
    def _agent_network(self, spec: ContainerSpec) -> tuple[str, dict[str, str]]:
        """The network ``spec`` joins under its egress policy, and the env it gets (the
        gateway's URL). Networks are shared and kept: ``dockyard-agents`` for egress
        ``none``, ``dockyard-gw-<hash>`` per gateway (see ``backends/firewall.py``).

        Rootful: the agent firewall is applied first; when it cannot be, no container
        starts (fail closed). Rootless: see ``ROOTLESS_EGRESS_NOTE``."""
        if spec.network:
            raise RuntimeOperationError(
                f"container {spec.name!r}: the podman runtime puts containers on its agent "
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
        enforce = not self._rootless
        if enforce and (self._url is None or _unix_path(self._url) is None):
            raise RuntimeOperationError(
                f"container {spec.name!r} not started: the network policy cannot be enforced: "
                f"{self._egress_status()[1]}",
                reason="network_policy_failed",
                name=spec.name,
            )
        if gateway is None:
            name, iface = AGENT_NETWORK, AGENT_IFACE
        else:
            digest = hashlib.sha256(f"{gateway[0]}:{gateway[1]}".encode()).hexdigest()[:8]
            name, iface = f"{AGENT_NETWORK}-gw-{digest}", f"{AGENT_IFACE}g{digest}"
        if gateway is not None and not enforce and gateway[0].startswith("127."):
            raise RuntimeOperationError(
                f"container {spec.name!r}: rootless Podman cannot reach a gateway on the host's "
                f"loopback ({gateway[0]}:{gateway[1]}); give the gateway a non-loopback address",
                reason="network_policy_failed",
                name=spec.name,
            )
        with self._network_lock:
            bridge_ip = self._ensure_network(name, iface, gateway)
            if enforce:
                try:
                    self._sync_firewall()
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
            address = f"{bridge_ip}:{port}" if enforce else f"{host}:{port}"
            env.update(gateway_variables(spec, f"http://{address}{path}"))
        return name, env

    def _sync_firewall(self) -> None:
        """Apply the agent firewall for every agent network the engine has now."""
        resp = self.client.api.get(
            "/networks/json", params={"filters": json.dumps({"label": [f"{LABEL_NETWORK}=agents"]})}
        )
        self._check(resp, "listing the agent networks")
        networks = []
        for network in resp.json() or []:
            iface = str(network.get("network_interface") or "")
            subnet = str(((network.get("subnets") or [{}])[0]).get("subnet") or "")
            if not iface.startswith(IFACE_PREFIX) or not subnet:
                log.warning("agent network %s is not one of ours; skipped", network.get("name"))
                continue
            gateway = None
            label = str((network.get("labels") or {}).get(LABEL_GATEWAY) or "")
            if label:
                host, port, _ = parse_gateway(label)
                gateway = (host, port)
            networks.append(AgentNetwork(iface=iface, subnet=subnet, gateway=gateway))
        self._firewall.apply(networks)

    def _ensure_network(self, name: str, iface: str, gateway: tuple[str, int, str] | None) -> str:
        """Create the agent network ``name`` when missing; its bridge address.

        Kept once made: Podman 4.3 with netavark loses other containers' port forwarding
        when networks are created and removed while containers start and stop (seen here
        with a network per container), so dockyard never removes them itself."""
        resp = self.client.api.get(f"/networks/{name}/json")
        if resp.status_code == 404:
            body = {
                "name": name,
                "driver": "bridge",
                "network_interface": iface,
                # Not "internal": netavark 1.4 publishes no ports on internal networks.
                "internal": False,
                "dns_enabled": False,
                "ipv6_enabled": False,
                "labels": {LABEL_MANAGED: "true", LABEL_NETWORK: "agents"},
            }
            if gateway is not None:
                body["labels"][LABEL_GATEWAY] = f"{gateway[0]}:{gateway[1]}"
            resp = self.client.api.post(
                "/networks/create",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            if resp.status_code == 409:  # made meanwhile by another dockyard
                resp = self.client.api.get(f"/networks/{name}/json")
        self._check(resp, f"preparing the agent network {name}")
        network = resp.json()
        labels = network.get("labels") or {}
        expected = f"{gateway[0]}:{gateway[1]}" if gateway is not None else None
        if network.get("network_interface") != iface or labels.get(LABEL_GATEWAY) != expected:
            raise RuntimeOperationError(
                f"network {name} exists but is not the agent network dockyard makes (interface "
                f"{iface}, gateway {expected}): remove it (podman network rm {name}) and "
                "dockyard makes it again",
                reason="network_policy_failed",
            )
        subnet = (network.get("subnets") or [{}])[0]
        if not subnet.get("subnet") or not subnet.get("gateway"):
            raise RuntimeOperationError(f"network {name} has no IPv4 subnet with a gateway")
        return str(subnet["gateway"])

    def _run(self, spec: ContainerSpec) -> str:
        network, env = self._agent_network(spec)
        kwargs = self._create_kwargs(spec)
        kwargs["networks"] = {network: {}}
        kwargs["network_mode"] = "bridge"  # rootless would default to slirp4netns
        kwargs["environment"] = {**kwargs["environment"], **env}
        container_id = self._create_and_start(spec, kwargs)
        if env and not self._rootless:
            self._firewall.route_localnet(self._network_iface(network))
        return container_id

    @staticmethod
    def _network_iface(network: str) -> str:
        if network == AGENT_NETWORK:
            return AGENT_IFACE
        return f"{AGENT_IFACE}g{network.rsplit('-', 1)[-1]}"

    def _create(self, spec: ContainerSpec, kwargs: dict[str, Any]) -> str:
        """Create the container; its id. podman-py's ``containers.create`` drops a mount's
        ``options``, so the payload it renders gets the scratch tmpfs options here."""
        manager = self.client.containers
        payload = manager._render_payload({"image": spec.image, **kwargs})
        for mount in payload.get("mounts") or []:
            if mount.get("type") == "tmpfs" and mount.get("destination") in spec.tmpfs:
                mount["options"] = [*mount.get("options", []), "nosuid", "nodev", "noexec"]
        resp = self.client.api.post(
            "/containers/create",
            headers={"content-type": "application/json"},
            data=podman_api.prepare_body(payload),
        )
        resp.raise_for_status()
        return str(resp.json()["Id"])

    def _create_and_start(self, spec: ContainerSpec, kwargs: dict[str, Any]) -> str:
        try:
            container_id = self._create(spec, kwargs)
        except APIError as exc:
            if exc.response is None:
                raise
            message = _engine_message(exc)
            if _status(exc) == 409 or "already in use" in message:
                raise Conflict(
                    f"a container named {spec.name!r} exists already: {message}", name=spec.name
                ) from exc
            raise RuntimeOperationError(
                f"creating container {spec.name!r} failed: {message}", name=spec.name
            ) from exc
        except (PodmanError, ValueError, TypeError) as exc:
            raise RuntimeOperationError(
                f"creating container {spec.name!r} failed: {_engine_message(exc)}",
                name=spec.name,
            ) from exc
        resp = self.client.api.post(f"/containers/{container_id}/start")
        if resp.status_code >= 400:
            message = _response_message(resp)
            with contextlib.suppress(Exception):
                self.client.api.delete(f"/containers/{container_id}", params={"force": True})
            raise RuntimeOperationError(
                f"starting container {spec.name!r} failed: {message}", name=spec.name
            )
        return container_id

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a hardened container (see the module docstring)."""
        if self._host is None:
            await self.info()
        container_id = await self._call(self._run, spec)
        info = await self.inspect(container_id)
        if info is None:
            raise RuntimeOperationError(f"container {spec.name!r} vanished right after start")
        return info

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        """Stop within ``timeout_s`` (SIGTERM via the init, then SIGKILL); missing is fine."""
        seconds = max(0, int(timeout_s + 0.999))
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
        resp = await self._call(
            self.client.api.delete,
            f"/containers/{ref}",
            params={"force": True, "v": True, "timeout": 5},
            timeout=self._api_timeout_s,
        )
        self._check(resp, f"removing container {ref}", ok_missing=True)

    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of stdout and stderr (all when None)."""

        def fetch() -> list[str]:
            resp = self.client.api.get(
                f"/containers/{ref}/logs",
                params={"stdout": True, "stderr": True, "tail": "all" if tail is None else tail},
            )
            self._check(resp, f"reading the logs of container {ref}")
            data = b"".join(podman_api.frames(resp))
            return data.decode("utf-8", "replace").splitlines()

        try:
            lines = await self._call(fetch)
        except RuntimeOperationError as exc:
            # Podman 4.3 cannot read a k8s-file log that conmon truncated at its size cap
            # mid-line ("... is not a valid container log line"); read the file itself.
            if "not a valid container log line" not in exc.message:
                raise
            lines = await self._call(self._read_log_file, ref, exc)
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    def _read_log_file(self, ref: str, error: RuntimeOperationError) -> list[str]:
        """A container's k8s-file log read from disk, skipping a torn first line."""
        resp = self.client.api.get(f"/containers/{ref}/json")
        self._check(resp, f"inspecting container {ref}")
        path = ((resp.json().get("HostConfig") or {}).get("LogConfig") or {}).get("Path")
        try:
            data = Path(str(path)).read_bytes() if path else None
        except OSError:
            data = None
        if data is None:
            raise error
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

    def _inspect(self, ref: str) -> ContainerInfo | None:
        resp = self.client.api.get(f"/containers/{ref}/json")
        if not self._check(resp, f"inspecting container {ref}", ok_missing=True):
            return None
        attrs = resp.json()
        info = container_info(attrs, limits_enforced=self._limits_enforced)
        if info.running:
            # Read the capability sets of the running processes back from the engine.
            top = self.client.api.get(f"/containers/{info.id}/top", params={"ps_args": "capbnd"})
            if top.status_code == 200:
                try:
                    processes = top.json().get("Processes") or []
                except ValueError:  # the container exited meanwhile: Podman answers empty
                    processes = []
                if processes:
                    dropped = all(str(row[0]).strip() == "none" for row in processes if row)
                    info.hardening.cap_drop_all = dropped and not info.hardening.cap_add
        return info

    async def inspect(self, ref: str) -> ContainerInfo | None:
        """State and hardening as the engine reports them, or None when missing."""
        if self._host is None:
            await self.info()
        return await self._call(self._inspect, ref)

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        """Containers, running or not, that carry all of ``labels``."""

        def fetch() -> list[ContainerInfo]:
            params: dict[str, Any] = {"all": True}
            if labels:
                params["filters"] = json.dumps(
                    {"label": [f"{key}={value}" for key, value in labels.items()]}
                )
            resp = self.client.api.get("/containers/json", params=params)
            self._check(resp, "listing containers")
            found = []
            for entry in resp.json() or []:
                info = self._inspect(str(entry["Id"]))
                if info is not None and _has_labels(info.labels, labels or {}):
                    found.append(info)
            return found

        if self._host is None:
            await self.info()
        return await self._call(fetch)


def _has_labels(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in want.items())


__all__ = [
    "PodmanRuntime",
    "PodmanService",
    "container_info",
    "dockyard_register_runtimes",
    "kill_marked_build_processes",
    "limits_status",
    "parse_hardening",
    "socket_answers",
]
