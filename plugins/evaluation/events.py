"""Evaluation changes as dockyard events (``kind="evaluation"``), for the observers.

The evaluation service hands one to ``dockyard_event`` each time it stores an evaluation:
the telemetry plugin counts outcomes from it, the event stream and the status page show it.
It carries the evaluation's state, queue position, progress and per-task outcomes, never its
tasks, environment or answers. Such events are not in the store's per-deployment history
(the evaluation outlives its deployment); the event journal keeps them.
"""

from __future__ import annotations

from typing import Any

from dockyard.core.models import Event
from dockyard.core.plugins import emit_event
from dockyard.plugins.evaluation.models import Evaluation


def evaluation_event(evaluation: Evaluation) -> Event:
    """The event that says where ``evaluation`` stands now."""
    data: dict[str, Any] = {
        "evaluation_id": evaluation.id,
        "state": evaluation.state,
        "final": evaluation.final,
        "ok": evaluation.ok,
        "reason": evaluation.reason,
        "batch_id": evaluation.batch_id,
        "queue_position": evaluation.queue_position,
        "repo": evaluation.miner.github_url,
        "commit": evaluation.commit,
        "progress": {
            "tasks_total": evaluation.progress.tasks_total,
            "tasks_done": evaluation.progress.tasks_done,
            "tasks_ok": evaluation.progress.tasks_ok,
        },
        "results": [
            {
                "task_id": r.task_id,
                "outcome": r.outcome,
                "reason": r.reason,
                "duration_s": r.duration_s,
            }
            for r in evaluation.results
        ],
        "deploy_s": evaluation.deploy_s,
        "total_s": evaluation.total_s,
    }
    return Event(
        deployment_id=evaluation.deployment_id,
        kind="evaluation",
        reason=evaluation.reason,
        message=evaluation.message,
        at=evaluation.updated_at,
        data=data,
    )


async def announce(pm: Any, evaluation: Evaluation) -> None:
    """Tell the ``dockyard_event`` observers where ``evaluation`` stands."""
    await emit_event(pm, evaluation_event(evaluation))
