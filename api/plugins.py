"""What a plugin brings to the API: routes, dependencies, a lifespan and scrape-time
metrics, together.

``create_app`` calls every ``dockyard_api_plugins(register)`` implementation once with an
:class:`ApiRegistrar`, mounts the routes, adds the dependencies, and enters the lifespans
after the deployment controller has started (exiting them, newest first, before it stops).
A plugin that runs a service beside the controller (the evaluation plugin) uses this; the
app knows nothing about the service itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from dockyard.core.config import Settings
from dockyard.core.controller import Controller
from dockyard.core.errors import PluginError
from dockyard.core.plugins import DockyardPluginManager, call_registrar, current_plugin
from dockyard.core.services import Services
from dockyard.core.store import StateStore


@dataclass(frozen=True)
class PluginContext:
    """What a plugin's lifespan is entered with: the app (its ``state`` is where a service
    is kept for the plugin's dependencies), and dockyard's settings, services and controller.

    A plugin's service takes what it needs from here: ``store`` for its records
    (``put_record``/``get_record``/``list_records``/``delete_record``), ``pm`` for hooks
    (its own, policy, observers), ``settings``, and the ``controller``'s answers for
    deployments; never the runtime or router behind the controller."""

    app: Litestar
    settings: Settings
    services: Services
    controller: Controller

    @property
    def store(self) -> StateStore:
        """The state store: where a plugin keeps its records."""
        return self.services.store

    @property
    def pm(self) -> DockyardPluginManager:
        """The plugin manager: hooks and registries."""
        return self.services.pm


#: A plugin lifespan: called with the context, returns an async context manager.
PluginLifespan = Callable[[PluginContext], AbstractAsyncContextManager[Any]]
#: A plugin's scrape-time refresher: called with the app's state at every ``/metrics``.
MetricsRefresher = Callable[[State], Awaitable[None] | None]


@dataclass
class ApiRegistrar:
    """The registrar ``dockyard_api_plugins`` receives (see ``core/hookspecs.py``)."""

    settings: Settings
    routes: list[Any] = field(default_factory=list)
    #: The plugin that mounted each of ``routes`` (same order).
    route_owners: list[str] = field(default_factory=list)
    dependencies: dict[str, Provide] = field(default_factory=dict)
    lifespans: list[tuple[str, PluginLifespan]] = field(default_factory=list)
    scrapes: list[MetricsRefresher] = field(default_factory=list)
    _owners: dict[str, str] = field(default_factory=dict)

    def route(self, handler: Any) -> None:
        """Mount a Litestar route handler, controller or router (it declares its scope)."""
        self.routes.append(handler)
        self.route_owners.append(current_plugin())

    def dependency(self, name: str, provide: Provide | Callable[..., Any]) -> None:
        """Add a Litestar dependency ``name``; a name two plugins add is an error."""
        plugin = current_plugin()
        if name in self.dependencies:
            raise PluginError(
                f"API dependency {name!r} added twice (by {self._owners[name]!r} and {plugin!r})"
            )
        if not isinstance(provide, Provide):
            provide = Provide(provide, sync_to_thread=False)
        self.dependencies[name] = provide
        self._owners[name] = plugin

    def lifespan(self, factory: PluginLifespan) -> None:
        """Run ``factory(context)`` (an async context manager) while the app serves."""
        self.lifespans.append((current_plugin(), factory))

    def scrape(self, refresh: MetricsRefresher) -> None:
        """Call ``refresh(app.state)`` at every ``GET /metrics`` before the metrics are
        written: set the plugin's gauges of what exists now (its metrics are registered in
        ``dockyard.core.metrics.REGISTRY``). It may return an awaitable."""
        self.scrapes.append(refresh)


def collect_api_plugins(pm: DockyardPluginManager, settings: Settings) -> ApiRegistrar:
    """Every plugin's part of the API, through ``dockyard_api_plugins``."""
    registrar = ApiRegistrar(settings)
    call_registrar(pm, "dockyard_api_plugins", registrar)
    return registrar


@contextlib.asynccontextmanager
async def plugin_lifespans(registrar: ApiRegistrar, context: PluginContext) -> AsyncIterator[None]:
    """Enter every plugin lifespan in registration order; exit them newest first, also
    when a later one fails to start. A failure names the plugin."""
    async with contextlib.AsyncExitStack() as stack:
        for plugin, factory in registrar.lifespans:
            try:
                await stack.enter_async_context(factory(context))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {plugin!r} failed to start: {exc}") from exc
        yield
