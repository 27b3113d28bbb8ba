"""Wiring of the observability pieces into the app: the event hub's lifespan, the routes
(``/metrics``, ``/v1/events``, ``/ui``) and the request-telemetry middleware.

``create_app`` adds :data:`HANDLERS`, :class:`RequestTelemetry` right after the audit log
(which sets the request id) and :func:`event_hub_lifespan` after its own lifespan, so the
hub sees the services and is closed (ending every stream) before they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar
from litestar.logging.config import LoggingConfig

from dockyard.api.events import RESERVED_TAGS, EventHub, EventRoutes
from dockyard.api.metrics import MetricsRoutes, RequestTelemetry
from dockyard.api.ui import UIRoutes
from dockyard.core.event_tags import make_taggers

log = logging.getLogger(__name__)

HANDLERS: list[Any] = [MetricsRoutes, EventRoutes, UIRoutes]
#: Litestar's own logging set-up would replace the root handlers that
#: ``dockyard.core.logs.configure_logging`` installed; its logger propagates to them instead.
LOGGING_CONFIG = LoggingConfig(
    configure_root_logger=False,
    loggers={"litestar": {"level": "INFO", "propagate": True, "handlers": []}},
)
HUB_PLUGIN = "event-hub"  # + the hub's id: apps sharing a plugin manager each have one

__all__ = ["HANDLERS", "LOGGING_CONFIG", "RequestTelemetry", "event_hub_lifespan"]


@contextlib.asynccontextmanager
async def event_hub_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Open the event journal and register the hub as a ``dockyard_event`` observer."""
    services = app.state.services
    pm = services.pm
    hub = EventHub.open(services.settings.data_path, make_taggers(pm, reserved=RESERVED_TAGS))
    name = f"{HUB_PLUGIN}-{id(hub):x}"
    pm.register(hub, name=name)
    app.state.events = hub
    try:
        yield
    finally:
        pm.unregister(name=name)
        hub.close()
