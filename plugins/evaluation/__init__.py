"""The evaluation plugin: evaluate miners' agents from their git code.

Built like any third-party plugin, with nothing about it in ``core/`` or ``api/``:

- its HTTP surface (the ``/v1/integration`` routes, :mod:`.routes`), the ``evaluations``
  dependency they use and a lifespan that runs one :class:`EvaluationService` beside the
  deployment controller come through ``dockyard_api_plugins``;
- its part of the status page (:mod:`.ui`: the evaluations panel, an evaluation's page,
  the chart's evaluation bars, the timeline's text for ``evaluation`` events) comes
  through the same registrar's ``ui_*`` methods, its templates as package data;
- its evaluations are plugin records in the store (namespace ``evaluation``, :mod:`.records`);
- its metrics (:mod:`.metrics`) are registered in dockyard's registry, counted from its own
  ``evaluation`` events (``dockyard_event``) and refreshed at scrape time
  (``ApiRegistrar.scrape``);
- its options are ``[plugins.evaluation]`` (:mod:`.options`);
- the event journal's ``evaluation`` tag (``dockyard_register_event_tags``,
  :class:`.events.EvaluationTagger`), the ``evaluate`` token scope
  (``dockyard_register_token_scopes``), the ``GET /v1/status?evaluation=`` filter
  (``dockyard_register_status_filters``) and how ``dockyard events`` prints its events
  (``dockyard_register_event_formats``) are registered like any plugin's;
- its commands, ``dockyard evaluate`` and ``dockyard sandbox-image`` (:mod:`.cli`), come
  through ``dockyard_cli_commands``;
- its own hook, ``dockyard_register_protocols`` (:mod:`.hookspecs`), is added through
  ``dockyard_add_hookspecs``; the built-in protocols come from ``dockyard.plugins.protocols``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from litestar.datastructures import State

from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Event
from dockyard.plugins.evaluation import events, hookspecs, metrics, records
from dockyard.plugins.evaluation.models import (
    Batch,
    EvaluateBatchRequest,
    EvaluateMinerRequest,
    Evaluation,
    Miner,
    TaskResult,
)
from dockyard.plugins.evaluation.options import PLUGIN_NAME, EvaluationConfig
from dockyard.plugins.evaluation.service import EVALUATION_LABEL, EvaluationService

if TYPE_CHECKING:
    from dockyard.api.auth import TokenScope
    from dockyard.api.cli_events import EventFormat
    from dockyard.api.cli_plugins import CliRegistrar
    from dockyard.api.plugins import ApiRegistrar, PluginContext
    from dockyard.core.event_tags import TaggerFactory
    from dockyard.core.plugins import Registrar

#: The plugin's options model (``[plugins.evaluation]``) and a line per option, for
#: ``dockyard config example``.
OPTIONS = EvaluationConfig
OPTION_MEANINGS = {
    "max_builds": "Evaluations building at once.",
    "max_agents": "Evaluated agents running at once.",
    "request_timeout_s": "Seconds an evaluated agent may take to answer one request.",
    "task_timeout_s": "Seconds one evaluation task may take.",
    "tasks_per_agent": "Tasks each evaluated agent gets by default.",
    "max_steps": "Steps per task by default.",
    "health_deadline_s": "Seconds an evaluated agent has to become healthy.",
    "session_ttl_s": "Seconds an idle evaluation session is kept.",
    "max_lifetime_s": "Seconds an evaluated agent's container may run.",
    "keep_images": "Keep an evaluation's image for the next evaluation of the same commit.",
    "gateway_env": "The variable evaluated agents find their gateway in.",
    "gateway_vars": "The gateway variables of evaluated agents: name -> URL suffix.",
    "sandbox_image": "The image build_mode image evaluations run when the miner names none.",
    "gc_max_age_days": "Days a finished evaluation's record is kept (0: no limit).",
    "gc_max_mb": "MiB of evaluation records kept, oldest removed first (0: no limit).",
}

__all__ = [
    "EVALUATION_LABEL",
    "OPTIONS",
    "OPTION_MEANINGS",
    "PLUGIN_NAME",
    "Batch",
    "EvaluateBatchRequest",
    "EvaluateMinerRequest",
    "Evaluation",
    "EvaluationConfig",
    "EvaluationService",
    "Miner",
    "TaskResult",
    "dockyard_add_hookspecs",
    "dockyard_api_plugins",
    "dockyard_cli_commands",
    "dockyard_event",
    "dockyard_register_event_formats",
    "dockyard_register_event_tags",
    "dockyard_register_gc_kinds",
    "dockyard_register_status_filters",
    "dockyard_register_token_scopes",
]


@hookimpl
def dockyard_register_gc_kinds(register: Registrar[Callable[..., Any]]) -> None:
    """Finished evaluations' records are pruned by garbage collection (``evaluations``)."""
    register("evaluations", records.gc_kind)


@hookimpl
def dockyard_register_status_filters(register: Registrar[str]) -> None:
    """``GET /v1/status?evaluation=true|false``: evaluated agents' deployments, or the rest."""
    register("evaluation", EVALUATION_LABEL)


@hookimpl
def dockyard_register_event_tags(register: Registrar[TaggerFactory]) -> None:
    """Journal entries name their evaluation: ``GET /v1/events?evaluation=ID``."""
    register(PLUGIN_NAME, events.EvaluationTagger)


@hookimpl
def dockyard_register_token_scopes(register: Registrar[TokenScope]) -> None:
    """``evaluate``: run and read evaluations (the ``/v1/integration`` routes); it grants
    nothing else, and ``admin`` grants it."""
    from dockyard.api.auth import TokenScope

    register("evaluate", TokenScope("run and read evaluations (/v1/integration)"))


@hookimpl
def dockyard_register_event_formats(register: Registrar[EventFormat]) -> None:
    """How ``dockyard events`` prints an ``evaluation`` event."""
    register("evaluation", events.format_event)


@hookimpl
def dockyard_add_hookspecs(add: Callable[[object], None]) -> None:
    """Add ``dockyard_register_protocols``, this plugin's own hook."""
    add(hookspecs)


def _evaluations(state: State) -> EvaluationService:
    return state.evaluations  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def _serve(context: PluginContext) -> AsyncIterator[None]:
    """Run the evaluation service while the app serves: started after the controller's
    resume (it ends what a restart cut short), stopped before the controller stops
    (cancelling and cleaning up running evaluations)."""
    service = EvaluationService(
        context.controller, store=context.store, pm=context.pm, settings=context.settings
    )
    context.app.state.evaluations = service
    try:
        await service.start()
        yield
    finally:
        await service.stop()


@hookimpl
def dockyard_api_plugins(register: ApiRegistrar) -> None:
    """Mount the validator integration routes with their service, and the status page's
    evaluation parts."""
    from dockyard.plugins.evaluation.routes import IntegrationRoutes
    from dockyard.plugins.evaluation.ui import add_ui

    EvaluationConfig.from_settings(register.settings)  # a bad option fails at startup
    register.route(IntegrationRoutes)
    register.dependency("evaluations", _evaluations)
    register.lifespan(_serve)
    register.scrape(metrics.refresh_gauges)
    add_ui(register)


@hookimpl
def dockyard_event(event: Event) -> None:
    """Count finished evaluations, their phases and tasks (:mod:`.metrics`)."""
    metrics.count_final(event)


@hookimpl
def dockyard_cli_commands(register: CliRegistrar) -> None:
    """Add ``dockyard evaluate`` and ``dockyard sandbox-image``."""
    from dockyard.plugins.evaluation.cli import add_commands

    add_commands(register)
