"""dockyard's Python client (``dockyard.client``; aiohttp, asyncio).

- :class:`DockyardClient`: the whole REST API (deployments as JSON, evaluations typed);
- :class:`ValidatorIntegration`: ``evaluate_miner_from_github(...)`` and a batch call;
- :mod:`dockyard.client.models`: the typed views (``Evaluation``, ``TaskResult``,
  ``TaskSolution``, ``Batch``, ``Session``).

The package lives in ``client/`` and is installed once, as ``dockyard.client``: the CLI
imports it from there too.
"""

from __future__ import annotations

from dockyard.client.models import (
    Batch,
    Evaluation,
    Session,
    TaskResult,
    TaskSolution,
)
from dockyard.client.rest import DEFAULT_URL, ApiError, DockyardClient
from dockyard.client.validator import ValidatorIntegration

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "Batch",
    "DockyardClient",
    "Evaluation",
    "Session",
    "TaskResult",
    "TaskSolution",
    "ValidatorIntegration",
]
