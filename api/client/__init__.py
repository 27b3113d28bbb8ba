"""dockyard's Python client (``dockyard.client``; aiohttp, asyncio).

- :class:`DockyardClient`: the whole REST API (deployments as JSON, evaluations typed);
- :class:`ValidatorIntegration`: ``evaluate_miner_from_github(...)`` and a batch call;
- :mod:`dockyard.client.models`: the typed views (``Evaluation``, ``TaskResult``,
  ``TaskSolution``, ``Batch``, ``Session``).

The package lives in ``api/client/`` and is installed twice over the same files: as
``dockyard.client`` (its name) and as ``dockyard.api.client`` (where the CLI and older code
import it from). Both import everything from ``dockyard.client.*``, so the classes are the
same objects whichever name is used.
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
