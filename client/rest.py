"""The HTTP client for dockyard's whole REST API (aiohttp, asyncio): deployments as JSON
objects, evaluations as typed structs (``dockyard.client.models``).

    async with DockyardClient("http://127.0.0.1:8800", token=...) as dy:
        view = await dy.deploy({"id": "agent", "repo": "https://github.com/acme/agent"})
        view = await dy.wait_for(view["id"])
        evaluation = await dy.evaluate_miner({"miner": {...}, "tasks": [...]})
        evaluation = await dy.wait_for_evaluation(evaluation.id)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from dockyard.client.closing import AsyncClosing
from dockyard.client.models import Batch, Evaluation, EvaluationList

DEFAULT_URL = "http://127.0.0.1:8800"


class ApiError(Exception):
    """The API answered with an error: ``status``, stable ``reason`` and ``message``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{message} ({reason}, HTTP {status})")
        self.status = status
        self.reason = reason
        self.message = message


class DockyardClient(AsyncClosing):
    """One HTTP session to one dockyard."""

    def __init__(
        self, url: str = DEFAULT_URL, *, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        if token is not None and (not token.isprintable() or any(c.isspace() for c in token)):
            raise ValueError(
                "the token contains whitespace or control characters; "
                "copy it again (one line, dy_<id>_<secret>)"
            )
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the URL {url!r} must start with http:// or https://")
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

    async def status(
        self,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        state: str | None = None,
        evaluation: bool | None = None,
    ) -> dict[str, Any]:
        """One page of the status list; pass its ``cursor`` back for the next one."""
        params = {"limit": limit, "cursor": cursor, "state": state, "evaluation": evaluation}
        return await self.request("GET", "/v1/status", params=params)  # type: ignore[no-any-return]

    async def status_all(self, *, page_size: int = 1000, **filters: Any) -> list[dict[str, Any]]:
        """Every deployment of the status list (``filters`` as :meth:`status`), page by
        page."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = await self.status(limit=page_size, cursor=cursor, **filters)
            items += page["deployments"]
            cursor = page.get("cursor")
            if not cursor:
                return items

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

    # -- evaluations (the validator integration) -----------------------------------------
    async def evaluate_miner(self, request: dict[str, Any]) -> Evaluation:
        """``POST /v1/integration/evaluate-miner``: queue one miner's evaluation."""
        body = await self.request("POST", "/v1/integration/evaluate-miner", json=request)
        return msgspec.convert(body, Evaluation)

    async def evaluate_miners_batch(self, request: dict[str, Any]) -> Batch:
        """``POST /v1/integration/evaluate-miners-batch``: queue one evaluation per miner."""
        body = await self.request("POST", "/v1/integration/evaluate-miners-batch", json=request)
        return msgspec.convert(body, Batch)

    async def evaluation(self, evaluation_id: str) -> Evaluation:
        """``GET /v1/integration/evaluation/{id}`` of an evaluation."""
        body = await self.request("GET", f"/v1/integration/evaluation/{evaluation_id}")
        return msgspec.convert(body, Evaluation)

    async def batch(self, batch_id: str) -> Batch:
        """``GET /v1/integration/evaluation/{id}`` of a batch: every member as it stands."""
        body = await self.request("GET", f"/v1/integration/evaluation/{batch_id}")
        return msgspec.convert(body, Batch)

    async def evaluations(self, *, state: str | None = None, limit: int = 100) -> list[Evaluation]:
        """``GET /v1/integration/evaluations``: active ones first, then the newest stored."""
        body = await self.request(
            "GET", "/v1/integration/evaluations", params={"state": state, "limit": limit}
        )
        return msgspec.convert(body, EvaluationList).evaluations

    async def cancel_evaluation(self, evaluation_id: str) -> Evaluation | Batch:
        """Cancel an evaluation (or every unfinished member of a batch); returns once its
        cleanup is over."""
        body = await self.request(
            "POST", f"/v1/integration/evaluation/{evaluation_id}/cancel", timeout_s=120
        )
        return _evaluation_or_batch(body)

    async def finish_session(
        self, evaluation_id: str, results: list[Any] | None = None
    ) -> Evaluation:
        """End a step session, optionally recording what the validator saw."""
        body = await self.request(
            "POST",
            f"/v1/integration/evaluation/{evaluation_id}/finish",
            json={"results": results or []},
            timeout_s=120,
        )
        return msgspec.convert(body, Evaluation)

    async def wait_for_evaluation(
        self,
        evaluation_id: str,
        *,
        timeout_s: float = 3600,
        poll_s: float = 1.0,
        until: Callable[[Evaluation | Batch], bool] | None = None,
    ) -> Evaluation | Batch:
        """Poll an evaluation or batch until it ends (or ``until`` says so, e.g. a session
        opened); the last view when ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        while True:
            body = await self.request("GET", f"/v1/integration/evaluation/{evaluation_id}")
            view = _evaluation_or_batch(body)
            done = until(view) if until is not None else view.finished
            if done or time.monotonic() > deadline:
                return view
            await asyncio.sleep(poll_s)


def _evaluation_or_batch(body: Any) -> Evaluation | Batch:
    if isinstance(body, dict) and "evaluations" in body:
        return msgspec.convert(body, Batch)
    return msgspec.convert(body, Evaluation)
