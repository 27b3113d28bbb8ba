"""The evaluation plugin: evaluate miners' agents from their git code.

It mounts the ``/v1/integration`` routes (``dockyard.api.integration``) through
``dockyard_api_handlers``; the app's lifespan runs one :class:`EvaluationService` beside
the deployment controller while this plugin is loaded. Agent protocols come from
``dockyard_register_protocols`` (``dockyard.plugins.protocols``).
"""

from __future__ import annotations

from typing import Any

from dockyard.core.hookspecs import hookimpl
from dockyard.plugins.evaluation.models import (
    Batch,
    EvaluateBatchRequest,
    EvaluateMinerRequest,
    Evaluation,
    Miner,
    TaskResult,
)
from dockyard.plugins.evaluation.service import EVALUATION_LABEL, EvaluationService

__all__ = [
    "EVALUATION_LABEL",
    "Batch",
    "EvaluateBatchRequest",
    "EvaluateMinerRequest",
    "Evaluation",
    "EvaluationService",
    "Miner",
    "TaskResult",
    "dockyard_api_handlers",
]

#: The name this plugin registers under (``DOCKYARD_DISABLE_PLUGINS=evaluation`` removes
#: the routes and the service).
PLUGIN_NAME = "evaluation"


@hookimpl
def dockyard_api_handlers(register: Any) -> None:
    """Mount the validator integration routes."""
    from dockyard.api.integration import IntegrationRoutes

    register("integration", IntegrationRoutes)
