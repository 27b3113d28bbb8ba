"""The evaluation plugin's part of the status page (``/ui``), added through
``dockyard_api_plugins`` like any plugin's:

- the ``evaluations`` panel on ``/ui/`` (queue position, progress, reason, repository;
  ``/ui/fragments/evaluations``), from the running :class:`EvaluationService`;
- an evaluation's page, ``/ui/evaluations/{id}``, and its body alone,
  ``/ui/fragments/evaluation/{id}`` (state, score, per-task outcomes, its events), which
  follows the stream's ``?evaluation=ID`` filter;
- the chart's ``evaluation`` bars (total seconds of finished evaluations);
- how ``evaluation`` events read in the timeline.

Its templates (``templates/``, package data) are loaded as ``evaluation/*.html``. Every
read of the event journal and every use of an entry's evaluation id is in
:func:`_journal_of` and :func:`_evaluation_of`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from litestar.params import FromPath

from dockyard.api.ui import Bar, current_record, login_redirect, page
from dockyard.core.errors import DockyardError

if TYPE_CHECKING:
    from dockyard.api.events import EventHub, StreamEvent
    from dockyard.api.plugins import ApiRegistrar

TEMPLATES = Path(__file__).parent / "templates"
#: An evaluation page's events, newest last.
PAGE_EVENTS = 200
#: The panel's rows.
PANEL_ROWS = 50
#: The event tag naming an entry's evaluation (the plugin's name, see
#: ``dockyard_register_event_tags``).
TAG = "evaluation"
#: The chart's colour for evaluation bars.
COLOUR = "#7b4fc4"


def _journal_of(hub: EventHub, evaluation_id: str) -> list[StreamEvent]:
    """The newest journal entries of one evaluation, oldest first."""
    return hub.journal.read(0, tags={TAG: evaluation_id}, limit=PAGE_EVENTS, newest=True)


def _evaluation_of(entry: StreamEvent) -> str | None:
    """The evaluation a journal entry belongs to."""
    return entry.tags.get(TAG)


async def panel_context(state: State) -> dict[str, Any]:
    """The ``evaluations`` panel: the newest evaluations."""
    service = getattr(state, "evaluations", None)
    return {"evaluations": await service.list(limit=PANEL_ROWS) if service is not None else []}


def chart_bars(entries: list[StreamEvent]) -> list[Bar]:
    """Finished evaluations' total seconds."""
    bars: list[Bar] = []
    for entry in entries:
        total = entry.data.get("total_s")
        final = entry.kind == "evaluation" and bool(entry.data.get("final"))
        if final and isinstance(total, int | float):
            bars.append(
                Bar(
                    label=str(_evaluation_of(entry)),
                    seconds=float(total),
                    ok=bool(entry.data.get("ok")),
                    kind="evaluation",
                    at=entry.at,
                )
            )
    return bars


def event_text(entry: StreamEvent) -> str:
    """An ``evaluation`` event in the timeline: ``evaluation <state>``."""
    return f"evaluation {entry.data.get('state')}"


async def _evaluation_context(state: State, evaluation_id: str) -> dict[str, Any]:
    service = getattr(state, "evaluations", None)
    evaluation = None
    error = None
    if service is None:
        error = "the evaluation service is not running"
    else:
        try:
            evaluation = await service.get(evaluation_id)
        except DockyardError as exc:
            error = exc.message
    return {
        "evaluation": evaluation,
        "evaluation_id": evaluation_id,
        "error": error,
        "events": list(reversed(_journal_of(state.events, evaluation_id))),
    }


class EvaluationPages(Controller):
    """An evaluation's page and its body (under ``/ui``, behind the session guard)."""

    path = "/"

    @get("/evaluations/{evaluation_id:str}", opt={"ui_public": True})
    async def evaluation(
        self, request: Request[Any, Any, Any], state: State, evaluation_id: FromPath[str]
    ) -> Response[Any]:
        # public to the guard only so that a visitor without a session is sent to the form
        if current_record(request) is None:
            return login_redirect()
        context = await _evaluation_context(state, evaluation_id)
        return page(request, "evaluation/page.html", **context)

    @get("/fragments/evaluation/{evaluation_id:str}")
    async def evaluation_fragment(
        self, request: Request[Any, Any, Any], state: State, evaluation_id: FromPath[str]
    ) -> Response[str]:
        context = await _evaluation_context(state, evaluation_id)
        return page(request, "evaluation/body.html", **context)


def add_ui(register: ApiRegistrar) -> None:
    """Add the panel, the pages, the chart series and the timeline text."""
    register.ui_templates(TEMPLATES, prefix="evaluation")
    register.ui_panel(
        "evaluations", title="Evaluations", template="evaluation/panel.html", context=panel_context
    )
    register.ui_route(EvaluationPages)
    register.ui_chart("evaluation", chart_bars, colour=COLOUR)
    register.ui_event_text("evaluation", event_text)
