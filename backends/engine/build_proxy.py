"""The build egress proxy: one squid per build, the only way out of a build's network.

When the operator sets ``build_proxy = "squid"``, a build that is not given the whole network
(``allow_build_network``) runs its ``RUN`` steps on a build network of its own
(``backends/engine/build_firewall.py`` holds it to its proxy) with ``HTTP_PROXY`` and its
kin pointing at a squid that dockyard starts for that build alone, on a port of its own:

* deny by default; allow exactly the ``build_proxy_allow`` entries, by host name *and*
  port, for plain HTTP and HTTPS ``CONNECT`` alike (``dstdomain -n``: the name as the client
  sent it, no reverse lookup);
* a name entry never reaches loopback, private, link-local or multicast addresses (squid's
  ``dst`` ACL checks the addresses the name resolves to, from the cache it then connects
  with); an entry that is an IP address is allowed as named (the operator named it);
* every request is logged with method, host, port, bytes sent to the build and squid's
  verdict (:func:`read_access_log`); ``reply_body_max_size`` stops one reply over the
  build's byte cap with a clear error, the firewall's quota the sum (tunnels included).

Why squid and not tinyproxy: tinyproxy's filter matches host names (or whole URLs) only,
cannot refuse a name that resolves to a private address, and logs no byte counts; squid
does all three with stock directives. One instance per build keeps attribution exact (its
own log, its own port for the firewall's quota) and its lifetime the build's.

Each instance records itself in a :class:`dockyard.core.children.PidFile` under the data
directory (``build-proxy/<build>.pid``; its files are in a temp directory of their own,
which squid's unprivileged user can reach) and dies with dockyard (``PR_SET_PDEATHSIG``);
:func:`reap_leftovers` stops what a killed dockyard left."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dockyard.core import children
from dockyard.core.build_egress import AllowedHost
from dockyard.core.children import PidFile

log = logging.getLogger(__name__)

#: Where an address a name entry resolves to must not be (squid ``dst`` notation).
PRIVATE_RANGES = (
    "0.0.0.0/8 10.0.0.0/8 100.64.0.0/10 127.0.0.0/8 169.254.0.0/16 172.16.0.0/12 "
    "192.0.0.0/24 192.168.0.0/16 198.18.0.0/15 224.0.0.0/3 ::/127 fc00::/7 fe80::/10 ff00::/8"
)
#: The access log line: time, method, host, port, bytes to the client, status, server.
LOG_FORMAT = "%ts %rm %>rd %>rP %<st %Ss/%>Hs %<a"
#: The proxy's directory under the data directory, one subdirectory per build.
PROXY_DIR = "build-proxy"
#: The account squid runs as when dockyard runs as root (Debian's squid package makes it).
PROXY_USER = "proxy"


@dataclass(frozen=True)
class ProxyRecord:
    """One request a build made through its proxy."""

    method: str
    host: str
    port: int
    bytes: int
    allowed: bool
    status: str

    @property
    def too_large(self) -> bool:
        """Refused for its reply's size (``reply_body_max_size``), not for its host."""
        return self.status.startswith("TCP_DENIED_REPLY")

    def line(self) -> str:
        verdict = "allowed" if self.allowed else "REFUSED"
        why = ", reply over build_proxy_max_bytes" if self.too_large else ""
        return (
            f"build proxy: {verdict} {self.method} {self.host}:{self.port} "
            f"{self.bytes} bytes ({self.status}{why})"
        )


def squid_config(workdir: Path, port: int, allow: Sequence[AllowedHost], max_bytes: int) -> str:
    """The configuration of one build's squid: listen on ``port`` (IPv4, every address:
    the build firewall admits the build network only), allow ``allow``, cap replies."""
    lines = [
        f"http_port 0.0.0.0:{port}",
        "pid_filename none",
        f"cache_log {workdir / 'cache.log'}",
        f"logformat dockyard {LOG_FORMAT}",
        f"access_log stdio:{workdir / 'access.log'} dockyard",
        "cache deny all",
        "cache_mem 8 MB",
        "netdb_filename none",
        "pinger_enable off",
        "shutdown_lifetime 0 seconds",
        "via off",
        "forwarded_for delete",
        "httpd_suppress_version_string on",
        "visible_hostname dockyard-build-proxy",
        f"coredump_dir {workdir}",
        f"acl private_dst dst {PRIVATE_RANGES}",
    ]
    for index, entry in enumerate(allow):
        lines.append(f"acl allow_{index}_host dstdomain -n {entry.host}")
        lines.append(f"acl allow_{index}_port port {entry.port}")
        guard = "" if entry.is_address else " !private_dst"
        lines.append(f"http_access allow allow_{index}_host allow_{index}_port{guard}")
    lines += ["http_access deny all", f"reply_body_max_size {max_bytes} bytes", ""]
    return "\n".join(lines)


def read_access_log(path: Path) -> list[ProxyRecord]:
    """The requests in a squid access log written with :data:`LOG_FORMAT`."""
    records = []
    with contextlib.suppress(OSError):
        for raw in path.read_text(errors="replace").splitlines():
            parts = raw.split()
            if len(parts) < 6 or not parts[3].isdigit() or not parts[4].isdigit():
                continue
            status = parts[5]
            allowed = "DENIED" not in status and not status.endswith("/403")
            records.append(
                ProxyRecord(parts[1], parts[2], int(parts[3]), int(parts[4]), allowed, status)
            )
    return records


def refused_hosts(records: Iterable[ProxyRecord]) -> list[str]:
    """``host:port`` of every refused request, in order, without duplicates."""
    seen: list[str] = []
    for record in records:
        where = f"{record.host}:{record.port}"
        if not record.allowed and not record.too_large and where not in seen:
            seen.append(where)
    return seen


def free_port() -> int:
    """An IPv4 port nothing listens on now (the proxy binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """Whether some socket listens on IPv4 TCP ``port`` (read from ``/proc``: the build
    firewall refuses connections to the proxy from anywhere but the build network)."""
    try:
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    wanted = f":{port:04X}"
    return any(
        len(row.split()) > 3 and row.split()[1].endswith(wanted) and row.split()[3] == "0A"
        for row in table
    )


class SquidProxy:
    """One build's squid: its directory, port, configuration and process."""

    def __init__(
        self,
        binary: str,
        pid_path: Path,
        allow: Sequence[AllowedHost],
        max_bytes: int,
        port: int | None = None,
    ) -> None:
        self.binary = binary
        # squid drops to an unprivileged user that may not traverse the data directory:
        # its files live in a directory of their own in the temp dir, named in the pid file.
        self.workdir = Path(tempfile.mkdtemp(prefix="dockyard-build-proxy-"))
        self.allow = list(allow)
        self.max_bytes = max_bytes
        self.port = port or free_port()
        self.pidfile = PidFile(pid_path, "build proxy (squid)")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def start(self, timeout_s: float = 20.0) -> None:
        """Write the configuration and start squid in the foreground (``-N``); return once
        it listens. :raises RuntimeError: squid is missing or did not come up (why)."""
        binary = shutil.which(self.binary)
        if binary is None:
            raise RuntimeError(
                f"{self.binary}: not found (install squid: contrib/ci/setup-podman.sh)"
            )
        config = self.workdir / "squid.conf"
        config.write_text(squid_config(self.workdir, self.port, self.allow, self.max_bytes))
        account: dict[str, int] = {}
        if os.geteuid() == 0:
            # Started as squid's unprivileged user (Debian: proxy) rather than left to drop
            # to it: a change of credentials would clear PR_SET_PDEATHSIG, and squid would
            # outlive a killed dockyard.
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam(PROXY_USER)
                os.chown(self.workdir, user.pw_uid, user.pw_gid)
                account = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.process = children.popen(
            args=[binary, "-N", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **account,
        )
        self.pidfile.record(self.process.pid, binary, port=self.port, workdir=str(self.workdir))
        deadline = time.monotonic() + timeout_s
        while not listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"squid did not start: {self._cache_log_tail()}")
            time.sleep(0.05)

    def _cache_log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.workdir / "cache.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-3:]) or "no log"
        return "no log"

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to its process group after ``grace_s``; wait for it."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5.0)
        self.pidfile.clear()

    def records(self) -> list[ProxyRecord]:
        return read_access_log(self.access_log)

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.pidfile.clear()


def reap_leftovers(state_dir: str | os.PathLike[str] | None) -> int:
    """Stop the build proxies a killed dockyard left in ``state_dir`` and remove their
    directories; how many were still running."""
    if not state_dir:
        return 0
    root = Path(state_dir) / PROXY_DIR
    stopped = 0
    for pid_path in sorted(root.glob("*.pid")):
        pidfile = PidFile(pid_path, "build proxy (squid)")
        workdir = str((pidfile.read() or {}).get("workdir") or "")
        if pidfile.reap() is not None:
            stopped += 1
        pidfile.clear()
        if Path(workdir).name.startswith("dockyard-build-proxy-"):
            shutil.rmtree(workdir, ignore_errors=True)
    return stopped


__all__ = [
    "LOG_FORMAT",
    "PRIVATE_RANGES",
    "PROXY_DIR",
    "ProxyRecord",
    "SquidProxy",
    "free_port",
    "read_access_log",
    "reap_leftovers",
    "refused_hosts",
    "squid_config",
]
