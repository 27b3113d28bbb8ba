"""A headless Chromium driven over the DevTools protocol (aiohttp websocket), for the status
page tests. Debian's ``chromium`` package, installed by ``contrib/ci/setup-browser.sh``; no
test tool downloads a browser of its own.

    async with Browser.launch(tmp_path) as browser:
        await browser.goto("http://127.0.0.1:8800/ui/")
        assert await browser.eval("document.title") == "dockyard"
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from dockyard.client.closing import AsyncClosing

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser(AsyncClosing):
    """One Chromium process with one page, and the DevTools calls the tests need."""

    def __init__(self, process: subprocess.Popen[bytes], profile: Path) -> None:
        self.process = process
        self.profile = profile
        self._ids = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.console: list[str] = []

    @classmethod
    def launch(cls, workdir: Path) -> Browser:
        binary = chromium_binary()
        assert binary is not None, "chromium is not installed (contrib/ci/setup-browser.sh)"
        profile = workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=False)
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return cls(process, profile)

    async def __aenter__(self) -> Browser:
        try:
            port_file = self.profile / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text().strip():
                assert self.process.poll() is None, "chromium exited at start"
                assert time.monotonic() < deadline, "chromium did not open its DevTools port"
                await asyncio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            self._http = aiohttp.ClientSession()
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t.get("type") == "page")
            self._ws = await self._http.ws_connect(
                page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024
            )
            self._reader = asyncio.create_task(self._read())
            await self.call("Page.enable")
            await self.call("Runtime.enable")
            await self.call("Network.enable")
            await self.call(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            body = json.loads(message.data)
            future = self._pending.pop(body.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(body)
            elif body.get("method") == "Runtime.consoleAPICalled":
                args = body["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", "")) for a in args))
            elif body.get("method") == "Runtime.exceptionThrown":
                details = body["params"]["exceptionDetails"]
                self.console.append("exception: " + json.dumps(details)[:500])

    async def call(self, method: str, timeout_s: float = 30.0, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (a call lost in a navigation times out)."""
        assert self._ws is not None
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(call_id, None)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})  # type: ignore[no-any-return]

    async def eval(self, expression: str) -> Any:
        """Evaluate JavaScript in the page; its value (promises awaited)."""
        result = await self.call(
            "Runtime.evaluate",
            timeout_s=5.0,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(RuntimeError, TimeoutError):
                # A DOM element does not serialize: it stands for "true".
                value = await self.eval(f"(v => v instanceof Node || v)({expression})")
                if value:
                    return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {expression!r}; console: {self.console}"
                )
            await asyncio.sleep(0.1)

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for(f"location.href.startsWith({json.dumps(url.split('#')[0])}) && "
                            "document.readyState === 'complete'")  # fmt: skip

    async def cookies(self) -> list[dict[str, Any]]:
        return (await self.call("Network.getCookies"))["cookies"]  # type: ignore[no-any-return]

    async def screenshot(self, path: Path) -> Path:
        size = (await self.call("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": 1280, "height": min(size["height"], 4000), "scale": 1}
        shot = await self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
