"""A small HTTP server on a loopback port for the router contract (and dockyard's switch
benchmark): it says who it is, so a test can tell which upstream a proxy sent it to.
Nothing here listens beyond 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
