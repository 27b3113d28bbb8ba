"""A typed asyncio client for dockyard's REST API (aiohttp), used by the CLI and by
validators' code.

    async with DockyardClient("http://127.0.0.1:8800", token=...) as dy:
        view = await dy.deploy({"id": "agent", "repo": "https://github.com/acme/agent"})
        view = await dy.wait_for(view["id"])
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8800"


class ApiError(Exception):
    """The API answered with an error: ``status``, stable ``reason`` and ``message``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{message} ({reason}, HTTP {status})")
        self.status = status
        self.reason = reason
        self.message = message


class DockyardClient:
    """One HTTP session to one dockyard."""

    def __init__(
        self, url: str = DEFAULT_URL, *, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DockyardClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request; raise ApiError for a 4xx/5xx answer."""
        if self._session is None:
            await self.__aenter__()
        assert self._session is not None
        clean = {
            k: (str(v).lower() if isinstance(v, bool) else v)
            for k, v in (params or {}).items()
            if v is not None
        }
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        async with self._session.request(
            method, self.url + path, json=json, params=clean, timeout=timeout
        ) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = {"message": await response.text()}
            if response.status >= 400:
                body = body if isinstance(body, dict) else {}
                raise ApiError(
                    response.status,
                    body.get("reason", "http_error"),
                    body.get("message", response.reason or ""),
                )
            return body

    # -- routes --------------------------------------------------------------------------
    async def healthz(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/healthz")  # type: ignore[no-any-return]

    async def plugins(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/v1/plugins")  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")  # type: ignore[no-any-return]

    async def deploy(
        self, spec: dict[str, Any], *, wait: bool = False, timeout_s: float = 300
    ) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "POST",
            "/v1/repos",
            json=spec,
            params={"wait": wait, "timeout": timeout_s},
            timeout_s=timeout_s + 30,
        )

    async def get(self, deployment_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/repos/{deployment_id}")  # type: ignore[no-any-return]

    async def events(self, deployment_id: str, *, after: int = 0) -> list[dict[str, Any]]:
        return await self.request(  # type: ignore[no-any-return]
            "GET", f"/v1/repos/{deployment_id}/events", params={"after": after}
        )

    async def redeploy(
        self,
        deployment_id: str,
        changes: dict[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout_s: float = 300,
    ) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "POST",
            f"/v1/repos/{deployment_id}/redeploy",
            json=changes or {},
            params={"wait": wait, "timeout": timeout_s},
            timeout_s=timeout_s + 30,
        )

    async def switch(
        self, deployment_id: str, *, wait: bool = False, timeout_s: float = 300
    ) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "POST",
            f"/v1/repos/{deployment_id}/switch",
            params={"wait": wait, "timeout": timeout_s},
            timeout_s=timeout_s + 30,
        )

    async def delete(self, deployment_id: str) -> dict[str, Any]:
        return await self.request(
            "DELETE",
            f"/v1/repos/{deployment_id}",  # type: ignore[no-any-return]
            timeout_s=120,
        )

    async def logs(
        self,
        deployment_id: str,
        *,
        slot: str | None = None,
        tail: int = 200,
        strip_ansi: bool = False,
        build: bool = False,
    ) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "GET",
            f"/v1/repos/{deployment_id}/logs",
            params={"slot": slot, "tail": tail, "strip_ansi": strip_ansi, "build": build},
        )

    async def wait_for(
        self,
        deployment_id: str,
        *,
        timeout_s: float = 900,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        after: int = 0,
        poll_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the deployment's operation ends, handing each new event to
        ``on_event``; returns the final view."""
        deadline = time.monotonic() + timeout_s
        while True:
            if on_event is not None:
                for event in await self.events(deployment_id, after=after):
                    after = max(after, event.get("seq") or after)
                    on_event(event)
            view = await self.get(deployment_id)
            op = view.get("operation")
            if not op or not op["running"] or time.monotonic() > deadline:
                if on_event is not None:
                    for event in await self.events(deployment_id, after=after):
                        on_event(event)
                return view
            await asyncio.sleep(poll_s)
