"""The Litestar app factory.

``create_app(settings)`` opens the configured plugins in the app's lifespan;
``create_app(settings, services=...)`` uses services the caller opened (the CLI and tests).
Handlers reach the services through dependency injection (``services: Services``).
"""

from __future__ import annotations

import contextlib
import gc as heap
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from dockyard.api.auth import (
    APP_SCOPES,
    AuditLog,
    BearerAuth,
    ClientGate,
    ScopeTable,
    TokenBook,
    check_route_scopes,
    rate_limits,
    scope_guard,
    token_rate_limits,
)
from dockyard.api.deployments import STATUS_FILTERED_OPERATIONS, DeploymentRoutes
from dockyard.api.errors import EXCEPTION_HANDLERS, document_errors
from dockyard.api.events import ID_RE, TAG_FILTERED_OPERATIONS
from dockyard.api.metrics import SCRAPE_REFRESHERS
from dockyard.api.observe import HANDLERS as OBSERVE_HANDLERS
from dockyard.api.observe import LOGGING_CONFIG, RequestTelemetry, event_hub_lifespan
from dockyard.api.plugins import PluginContext, collect_api_plugins, plugin_lifespans
from dockyard.api.schema import PluginParts, fix_options_allow, serve_true_schema
from dockyard.api.system import SystemController
from dockyard.api.tokens import TokenRoutes
from dockyard.api.ui import SITE, UiSite, ui_routers
from dockyard.core.config import Settings
from dockyard.core.controller import Controller
from dockyard.core.errors import ValidationError
from dockyard.core.gc import GarbageCollector, GcSchedule
from dockyard.core.plugins import DockyardPluginManager, build_plugin_manager, dockyard_version
from dockyard.core.services import Services

log = logging.getLogger(__name__)

#: Request bodies above this many bytes get 413.
MAX_BODY_BYTES = 1024 * 1024


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


async def refuse_duplicate_keys(request: Request[Any, Any, Any]) -> None:
    """A JSON body that names a key twice is a 400 naming the key: decoders keep the last
    value silently, so what was validated and logged could differ from what was meant.
    Bodies that are not JSON are left to the handler's own decoding (and its errors)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    body = await request.body()  # cached: the handler decodes the same bytes
    if not body.strip():
        return
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as duplicate:
        raise ValidationError(
            f"{duplicate.key}: this key appears more than once in the JSON body",
            field=duplicate.key,
        ) from None
    except (ValueError, RecursionError):
        return


def _services(state: State) -> Services:
    return state.services  # type: ignore[no-any-return]


def _controller(state: State) -> Controller:
    return state.controller  # type: ignore[no-any-return]


def query_filters(pm: DockyardPluginManager) -> dict[str, list[dict[str, Any]]]:
    """The query parameters plugins register, by operation id: an event tag filters the
    event routes (``?<tag>=ID``), a status filter ``GET /v1/status`` (``?<name>=true|false``)."""
    tags, status = pm.registries.event_tags, pm.registries.status_filters
    tag_params = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": f"only events tagged {name} with this id (the {tags.owner(name)!r}"
            " plugin's event tag)",
            "schema": {"type": "string", "pattern": ID_RE.pattern},
        }
        for name in tags.names()
    ]
    status_params = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": f"true: only deployments labelled {label!r} (the"
            f" {status.owner(name)!r} plugin's filter); false: only the others",
            "schema": {"type": "boolean"},
        }
        for name, label in status.items()
    ]
    filters = {operation: tag_params for operation in TAG_FILTERED_OPERATIONS}
    filters.update({operation: status_params for operation in STATUS_FILTERED_OPERATIONS})
    return filters


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    pm: DockyardPluginManager | None = None,
) -> Litestar:
    """Build the API. Plugins' ``dockyard_api_handlers`` and ``dockyard_api_plugins``
    routes are mounted beside the built-ins, with their dependencies and lifespans.

    Services that are not started yet are started by the app's lifespan and closed with it.
    """
    settings = settings or (services.settings if services else Settings())
    pm = services.pm if services else (pm or build_plugin_manager(settings.disable_plugins))

    extensions = collect_api_plugins(pm, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        serve_true_schema(
            app,
            PluginParts(
                filters=query_filters(pm),
                tag_names=tuple(pm.registries.event_tags.names()),
                scope_names=scopes.names,
            ),
        )
        ours = services if services is not None else Services.build(settings, pm)
        owned = not ours.started  # the caller may have opened them (the CLI does, to fail fast)
        if owned:
            await ours.start()
        controller = Controller.from_services(ours)
        app.state.services = ours
        app.state.controller = controller
        gc = app.state.gc = GcSchedule(
            GarbageCollector(ours.settings, ours.store, ours.runtime, pm=ours.pm)
        )
        try:
            await controller.start()
            # Plugins' services start after resume (the evaluation service ends what a
            # restart cut short) and stop before the controller does.
            context = PluginContext(app, settings, ours, controller)
            async with plugin_lifespans(extensions, context):
                gc.start()
                # What start-up built (modules, plugins, the app: most of the heap) lives
                # as long as the server: out of the collector's sight, a full collection
                # walks only what was made since (measured: 5 ms instead of ~110 ms, the
                # status p99).
                heap.freeze()
                try:
                    yield
                finally:
                    heap.unfreeze()
                    await gc.stop()
        finally:
            await controller.stop()
            if owned:
                await ours.close()

    handlers: list[Any] = [SystemController, DeploymentRoutes, TokenRoutes, *OBSERVE_HANDLERS]
    mounted: list[tuple[str, Any]] = [("dockyard", handler) for handler in handlers]
    api_handlers = pm.registries.api_handlers
    mounted.extend((api_handlers.owner(name), handler) for name, handler in api_handlers.items())
    mounted.extend(zip(extensions.route_owners, extensions.routes, strict=True))
    scopes = ScopeTable.from_plugins(pm)
    check_route_scopes(scopes, mounted)  # a route no token could be granted fails the start
    handlers.extend(handler for _, handler in api_handlers.items())
    handlers.extend(extensions.routes)
    handlers.extend(ui_routers(extensions.ui))  # plugins' /ui pages, behind the UI session
    tokens = TokenBook.from_settings(settings, scopes)
    app = Litestar(
        route_handlers=handlers,
        guards=[scope_guard],
        middleware=[
            AuditLog(settings.data_path / "audit.log"),
            RequestTelemetry(),
            ClientGate(settings),
            *rate_limits(settings),
            BearerAuth(tokens),
            *token_rate_limits(settings),
        ],
        dependencies={
            "services": Provide(_services, sync_to_thread=False),
            "controller": Provide(_controller, sync_to_thread=False),
            "tokens": Provide(lambda: tokens, sync_to_thread=False),
            **extensions.dependencies,
        },
        lifespan=[lifespan, event_hub_lifespan],
        logging_config=LOGGING_CONFIG,
        before_request=refuse_duplicate_keys,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="dockyard",
            version=dockyard_version(),
            path="/docs",
            render_plugins=[SwaggerRenderPlugin()],
        ),
    )
    setattr(app.state, SCRAPE_REFRESHERS, list(extensions.scrapes))
    setattr(app.state, SITE, UiSite(extensions.ui))
    setattr(app.state, APP_SCOPES, scopes)
    document_errors(app)
    fix_options_allow(app)
    return app
