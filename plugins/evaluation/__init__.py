"""The evaluation plugin: evaluate miners' agents from their git code.

Built like any third-party plugin, with nothing about it in ``core/`` or ``api/``:

- its HTTP surface (the ``/v1/integration`` routes, :mod:`.routes`), the ``evaluations``
  dependency they use and a lifespan that runs one :class:`EvaluationService` beside the
  deployment controller come through ``dockyard_api_plugins``;
- its evaluations are plugin records in the store (namespace ``evaluation``, :mod:`.records`);
- its options are ``[plugins.evaluation]`` (:mod:`.options`);
- its own hook, ``dockyard_register_protocols`` (:mod:`.hookspecs`), is added through
  ``dockyard_add_hookspecs``; the built-in protocols come from ``dockyard.plugins.protocols``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from litestar.datastructures import State

from dockyard.core.hookspecs import hookimpl
from dockyard.plugins.evaluation import hookspecs
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
    from dockyard.api.plugins import ApiRegistrar, PluginContext

__all__ = [
    "EVALUATION_LABEL",
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
]


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
    service = EvaluationService(context.controller)
    context.app.state.evaluations = service
    try:
        await service.start()
        yield
    finally:
        await service.stop()


@hookimpl
def dockyard_api_plugins(register: ApiRegistrar) -> None:
    """Mount the validator integration routes with their service."""
    from dockyard.plugins.evaluation.routes import IntegrationRoutes

    EvaluationConfig.from_settings(register.settings)  # a bad option fails at startup
    register.route(IntegrationRoutes)
    register.dependency("evaluations", _evaluations)
    register.lifespan(_serve)
