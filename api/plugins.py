"""What a plugin brings to the API: routes, dependencies, a lifespan, scrape-time
metrics and its parts of the status page, together.

``create_app`` calls every ``dockyard_api_plugins(register)`` implementation once with an
:class:`ApiRegistrar`, mounts the routes, adds the dependencies, and enters the lifespans
after the deployment controller has started (exiting them, newest first, before it stops).
A plugin that runs a service beside the controller (the evaluation plugin) uses this; the
app knows nothing about the service itself. The ``ui_*`` methods add to the status page
(``/ui``): templates, a panel, pages, a chart series, the timeline's text for an event kind
(:mod:`dockyard.api.ui.parts`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from dockyard.api.ui.parts import (
    COLOUR_RE,
    ChartSeries,
    EventText,
    PanelContext,
    UiPanel,
    UiParts,
    UiSeries,
)
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
    ui: UiParts = field(default_factory=UiParts)
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

    # ------------------------------------------------------------ the status page (/ui)
    def ui_templates(self, directory: Path, prefix: str | None = None) -> None:
        """Load the Jinja templates in ``directory`` as ``{prefix}/NAME`` (the prefix is the
        plugin's name unless given) into the status page's environment: they may extend
        ``base.html`` and include ``event.html``; autoescape is always on, an undefined
        name is an error, ``age`` and ``clock`` are filters and ``event_text(entry)`` a
        function. Ship them as package data."""
        plugin = current_plugin()
        prefix = prefix or plugin
        self.ui.claim("UI template prefix", prefix, plugin)
        if not Path(directory).is_dir():
            raise PluginError(f"plugin {plugin!r}: UI templates {directory} is not a directory")
        self.ui.templates[prefix] = Path(directory)

    def ui_panel(
        self, name: str, *, title: str, template: str, context: PanelContext, order: int = 100
    ) -> None:
        """Add a panel to ``/ui/``: ``<div id="{name}">`` under the heading ``title``,
        holding ``template`` rendered with ``await context(app.state)``. It is served alone
        at ``/ui/fragments/{name}`` (behind the session), which the page re-fetches when
        events come. Panels are shown by ``order``, after the deployments."""
        plugin = current_plugin()
        self.ui.claim("UI panel", name, plugin)
        self.ui.panels[name] = UiPanel(name, title, template, context, order, plugin)

    def ui_route(self, handler: Any) -> None:
        """Mount a route handler, controller or router under ``/ui`` (its paths are relative
        to ``/ui``), behind the session guard: a route needs a logged-in session unless it
        says ``opt={"ui_public": True}``. Render with ``dockyard.api.ui.page``."""
        self.ui.routes.append(handler)

    def ui_chart(self, kind: str, bars: ChartSeries, *, colour: str) -> None:
        """Add a series to the durations chart: ``bars(entries)`` turns the journal's recent
        entries (oldest first) into :class:`~dockyard.api.ui.parts.Bar` s of this ``kind``,
        drawn in ``colour`` (``#rgb`` or ``#rrggbb``). dockyard's own series is ``deploy``."""
        plugin = current_plugin()
        self.ui.claim("chart series", kind, plugin)
        if not COLOUR_RE.match(colour):
            raise PluginError(f"chart series {kind!r}: colour {colour!r} is not #rgb or #rrggbb")
        self.ui.series[kind] = UiSeries(kind, bars, colour, plugin)

    def ui_event_text(self, kind: str, text: EventText) -> None:
        """Say how events of ``kind`` read in the timeline (page and live updates alike):
        ``text(entry)`` is a line of plain text, escaped when shown. Kinds no plugin
        describes read as their name."""
        plugin = current_plugin()
        self.ui.claim("timeline text for event kind", kind, plugin)
        self.ui.event_texts[kind] = (text, plugin)


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
