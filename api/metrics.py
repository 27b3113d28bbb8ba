"""``GET /metrics`` in Prometheus' text format, and the per-request middleware that times
every API request and binds its request id for the logs.

The route needs a token with the ``read`` scope (``admin`` and ``deploy`` imply it); point
Prometheus at it with ``authorization: {credentials: <token>}``. Gauges of what exists now
(slots, leases) are refreshed from this app's store on each scrape, and plugins refresh
theirs (``ApiRegistrar.scrape``: the evaluation plugin's queue and agents); everything else
moves as it happens (``core/metrics.py``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dockyard.api.auth import SCOPE_KEY_REQUEST_ID
from dockyard.core import logs
from dockyard.core import metrics as m
from dockyard.core.models import SlotState
from dockyard.core.plugins import await_me_maybe

#: The app-state attribute holding the plugins' scrape-time refreshers (``ApiRegistrar.scrape``).
SCRAPE_REFRESHERS = "metric_refreshers"


async def refresh_gauges(state: State) -> None:
    """Set the scrape-time gauges from this app's services, then let every plugin refresh
    its own (``ApiRegistrar.scrape``)."""
    services = getattr(state, "services", None)
    if services is None:
        return
    store = services.store
    counts: Counter[str] = Counter()
    for deployment in await store.list_deployments():
        for slot in await store.list_slots(deployment.id):
            counts[str(slot.state)] += 1
    for slot_state in SlotState:
        m.SLOTS.labels(state=str(slot_state)).set(counts[str(slot_state)])
    m.PORT_LEASES.set(len(await store.list_leases()))
    for refresh in getattr(state, SCRAPE_REFRESHERS, ()):
        await await_me_maybe(refresh(state))


class MetricsRoutes(Controller):
    """Prometheus' scrape endpoint."""

    path = "/metrics"
    tags = ["system"]

    @get(
        "/",
        opt={"scope": "read"},
        operation_id="metrics",
        summary="Prometheus metrics (text exposition format)",
        media_type=CONTENT_TYPE_LATEST,
        include_in_schema=True,
    )
    async def metrics(self, state: State) -> Response[bytes]:
        await refresh_gauges(state)
        return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)


class RequestTelemetry(ASGIMiddleware):
    """Binds the request id (set by the audit middleware) for every log line of the request
    and of the tasks it starts, and counts and times the request by route template."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope["type"] != "http":
            await next_app(scope, receive, send)
            return
        request_id = scope.get(SCOPE_KEY_REQUEST_ID)  # type: ignore[call-overload]
        started = time.monotonic()
        status = 500
        timed = False
        route = str(scope.get("path_template") or "unmatched")  # type: ignore[call-overload]
        method = str(scope.get("method", "GET"))

        def done() -> None:
            nonlocal timed
            if not timed:
                timed = True
                m.HTTP_SECONDS.labels(route=route, method=method).observe(
                    time.monotonic() - started
                )

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                done()
            await send(message)

        # Not reset on the way out: the server runs each request in a task of its own, and
        # its access line (and an error response) is written after the app returned.
        logs.bind(request_id=request_id)
        try:
            await next_app(scope, receive, send_wrapper)
        except Exception as exc:
            status = int(getattr(exc, "status_code", 500))
            raise
        finally:
            done()
            m.HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()


def metric_names() -> list[dict[str, Any]]:
    """Every metric dockyard exports: name (as scraped), type, help, labels."""
    out = []
    for metric in m.REGISTRY.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        labels = sorted({k for s in metric.samples for k in s.labels if k != "le"})
        out.append(
            {"name": name, "type": metric.type, "help": metric.documentation, "labels": labels}
        )
    return out
