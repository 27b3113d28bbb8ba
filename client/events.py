"""Following dockyard's event stream (``GET /v1/events/stream``, server-sent events) from
a client: replay after a sequence number, then live, reconnecting with ``Last-Event-ID``
when the connection drops, so no event is missed or shown twice.

    async with DockyardClient(url, token=...) as dy:
        async for event in follow_events(dy, deployment="agent"):
            print(event["kind"])
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from dockyard.client.rest import ApiError, DockyardClient

#: Seconds without even a heartbeat after which the connection is taken as dead.
READ_TIMEOUT_S = 45.0
RECONNECT_S = 1.0


async def last_event_id(client: DockyardClient, deployment: str | None = None) -> int:
    """The newest journal sequence number (of one deployment), 0 when there is none."""
    params: dict[str, Any] = {"limit": 1, "newest": True}
    if deployment is not None:
        params["deployment"] = deployment
    entries = await client.request("GET", "/v1/events", params=params)
    return max((int(e["id"]) for e in entries), default=0)


async def follow_events(
    client: DockyardClient,
    *,
    deployment: str | None = None,
    evaluation: str | None = None,
    after: int = 0,
    reconnects: int = 30,
    tags: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Every event after ``after``, forever (until the caller stops iterating); only one
    deployment's, and only those carrying ``tags`` (event tags plugins register, e.g.
    ``{"evaluation": id}``; ``evaluation=id`` is the same, kept for one release)."""
    headers = {"Accept": "text/event-stream"}
    if client.token:
        headers["Authorization"] = f"Bearer {client.token}"
    params = {**(tags or {}), **({"evaluation": evaluation} if evaluation else {})}
    if deployment:
        params["deployment"] = deployment
    last = after
    failures = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            try:
                async with http.get(
                    f"{client.url}/v1/events/stream",
                    params=params,
                    headers={**headers, "Last-Event-ID": str(last)},
                ) as response:
                    if response.status >= 400:
                        try:
                            body = await response.json(content_type=None)
                        except ValueError:
                            body = {}
                        body = body if isinstance(body, dict) else {}
                        raise ApiError(
                            response.status,
                            body.get("reason", "http_error"),
                            body.get("message", response.reason or ""),
                        )
                    failures = 0
                    async for event in _parse(response):
                        if int(event["id"]) > last:
                            last = int(event["id"])
                            yield event
            except (aiohttp.ClientError, TimeoutError):
                failures += 1
                if failures > reconnects:
                    raise
            await asyncio.sleep(RECONNECT_S)


async def _parse(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line == "":
            if data:
                yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
