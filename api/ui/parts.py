"""What plugins add to the status page, and the per-app site they make together.

A plugin adds its parts through ``dockyard_api_plugins`` (``ApiRegistrar.ui_templates``,
``ui_panel``, ``ui_route``, ``ui_chart``, ``ui_event_text``); :class:`UiParts` keeps them with
the plugin that added each, refusing a name two plugins take. ``create_app`` builds a
:class:`UiSite` from them: one Jinja environment (dockyard's templates, then each plugin's
under its prefix, e.g. ``myplugin/panel.html``; autoescape always, ``StrictUndefined``, the
``age``/``clock`` filters), the panels in their order, the chart's series and the timeline's
text for each event kind. The status page (:mod:`dockyard.api.ui`) renders only what is here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from litestar.datastructures import State

from dockyard.core.errors import PluginError
from dockyard.core.models import Model, SlotState, now

if TYPE_CHECKING:
    from dockyard.api.events import StreamEvent

HERE = Path(__file__).parent
#: The owner dockyard's own parts are attributed to.
CORE = "dockyard"
#: Panel names, chart kinds, event kinds and template prefixes: used in ids, URLs and classes.
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
COLOUR_RE = re.compile(r"^#[0-9a-fA-F]{3}(?:[0-9a-fA-F]{3})?$")
#: Bars the chart shows, newest last.
CHART_BARS = 24


class Bar(Model):
    """One bar of the durations chart: ``label`` took ``seconds``, finishing at ``at``;
    ``kind`` is the series it belongs to (its colour and legend key)."""

    label: str
    seconds: float
    ok: bool
    kind: str
    at: float = 0.0


#: A chart series: the journal's recent entries (oldest first) -> the bars they make.
ChartSeries = Callable[[list["StreamEvent"]], list[Bar]]
#: How one event kind reads in the timeline: the entry -> a line of text (escaped when shown).
EventText = Callable[["StreamEvent"], str]
#: A panel's context: the app's state -> what its template is rendered with.
PanelContext = Callable[[State], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class UiPanel:
    """A section of ``/ui/``: ``<div id="{name}" data-fragment="/ui/fragments/{name}">``
    holding ``template`` rendered with ``await context(state)``; re-fetched when events come."""

    name: str
    title: str
    template: str
    context: PanelContext
    order: int
    plugin: str


@dataclass(frozen=True)
class UiSeries:
    kind: str
    bars: ChartSeries
    colour: str
    plugin: str


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


def deploy_bars(entries: list[StreamEvent]) -> list[Bar]:
    """dockyard's own series: deploy durations (BUILDING to PROMOTED or FAILED)."""
    started: dict[tuple[str, str], float] = {}
    bars: list[Bar] = []
    for entry in entries:
        if entry.kind != "slot_transition":
            continue
        key = (entry.deployment_id, str(entry.color))
        if entry.to_state is SlotState.BUILDING:
            started[key] = entry.at
        elif entry.to_state in (SlotState.PROMOTED, SlotState.FAILED) and key in started:
            bars.append(
                Bar(
                    label=entry.deployment_id,
                    seconds=round(entry.at - started.pop(key), 2),
                    ok=entry.to_state is SlotState.PROMOTED,
                    kind="deploy",
                    at=entry.at,
                )
            )
    return bars


def _slot_transition(entry: StreamEvent) -> str:
    return f"{entry.from_state} → {entry.to_state}"


def _check_name(what: str, name: str) -> None:
    if not NAME_RE.match(name):
        raise PluginError(f"{what} {name!r}: use 1-40 of a-z, 0-9, '_' and '-', a letter first")


@dataclass
class UiParts:
    """The status page's parts, each with the plugin that added it; dockyard's own are
    there from the start (the ``deployments``, ``chart`` and ``timeline`` panels' names,
    the ``deploy`` series, the ``slot_transition`` text)."""

    templates: dict[str, Path] = field(default_factory=dict)
    panels: dict[str, UiPanel] = field(default_factory=dict)
    routes: list[Any] = field(default_factory=list)
    series: dict[str, UiSeries] = field(default_factory=dict)
    event_texts: dict[str, tuple[EventText, str]] = field(default_factory=dict)
    _owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("deployments", "chart", "timeline"):
            self._owners[("UI panel", name)] = CORE
        self.series["deploy"] = UiSeries("deploy", deploy_bars, "#1f5fbf", CORE)
        self._owners[("chart series", "deploy")] = CORE
        self.event_texts["slot_transition"] = (_slot_transition, CORE)
        self._owners[("timeline text for event kind", "slot_transition")] = CORE

    def claim(self, what: str, name: str, plugin: str) -> None:
        """Take ``name`` for ``plugin``; a name taken already is an error naming both."""
        _check_name(what, name)
        owner = self._owners.get((what, name))
        if owner is not None:
            raise PluginError(f"{what} {name!r} added twice (by {owner!r} and {plugin!r})")
        self._owners[(what, name)] = plugin


class UiSite:
    """One app's status page: its template environment, panels, series and event texts."""

    def __init__(self, parts: UiParts) -> None:
        loader = jinja2.ChoiceLoader(
            [
                jinja2.FileSystemLoader(HERE / "templates"),
                jinja2.PrefixLoader(
                    {prefix: jinja2.FileSystemLoader(d) for prefix, d in parts.templates.items()}
                ),
            ]
        )
        self.templates = jinja2.Environment(
            loader=loader,
            autoescape=True,  # always, whatever the file name
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["age"] = lambda at: _age(now() - at) if at else "-"
        self.templates.filters["clock"] = _clock
        self.templates.globals["event_text"] = self.event_text
        self.panels = sorted(parts.panels.values(), key=lambda p: (p.order, p.name))
        self.series = dict(parts.series)
        self._texts = {kind: text for kind, (text, _) in parts.event_texts.items()}

    def render(self, template: str, **context: Any) -> str:
        return self.templates.get_template(template).render(**context)

    def panel(self, name: str) -> UiPanel | None:
        return next((p for p in self.panels if p.name == name), None)

    def event_text(self, entry: StreamEvent) -> str:
        """What the timeline says about ``entry``: its kind's text, else the kind's name."""
        text = self._texts.get(entry.kind)
        return text(entry) if text is not None else entry.kind.replace("_", " ")

    def bars(self, entries: list[StreamEvent], limit: int = CHART_BARS) -> list[Bar]:
        """Every series' bars from ``entries``, in the order they finished, the last ``limit``."""
        bars = [bar for series in self.series.values() for bar in series.bars(entries)]
        bars.sort(key=lambda bar: bar.at)
        return bars[-limit:]

    def colours(self) -> dict[str, str]:
        return {kind: series.colour for kind, series in self.series.items()}
