"""Evaluation changes as dockyard events (``kind="evaluation"``), for the observers.

The evaluation service hands one to ``dockyard_event`` each time it stores an evaluation:
the telemetry plugin counts outcomes from it, the event stream and the status page show it.
It carries the evaluation's state, queue position, progress and per-task outcomes, never its
tasks, environment or answers. Such events are not in the store's per-deployment history
(the evaluation outlives its deployment); the event journal keeps them.

The journal tags every event with the evaluation it belongs to (:class:`EvaluationTagger`,
the ``evaluation`` event tag), so ``GET /v1/events?evaluation=ID`` follows one evaluation;
``dockyard events`` prints these events with :func:`format_event`.
"""

from __future__ import annotations

from collections.abc import Mapping
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


class EvaluationTagger:
    """Which evaluation an event belongs to (the ``evaluation`` event tag): the one an
    ``evaluation`` event names, else the log context's ``evaluation_id`` (set while an
    evaluation runs), else the evaluation the event's deployment was made for (remembered
    from its ``evaluation`` events until the final one)."""

    def __init__(self) -> None:
        self._evaluation_of: dict[str, str] = {}

    def __call__(self, event: Event, context: Mapping[str, Any]) -> str | None:
        evaluation_id = None
        if event.kind == "evaluation":
            evaluation_id = event.data.get("evaluation_id")
            if evaluation_id:
                if event.data.get("final"):
                    self._evaluation_of.pop(event.deployment_id, None)
                else:
                    self._evaluation_of[event.deployment_id] = evaluation_id
        found = (
            evaluation_id
            or context.get("evaluation_id")
            or self._evaluation_of.get(event.deployment_id)
        )
        return str(found) if found else None


def format_event(event: dict[str, Any]) -> str:
    """An ``evaluation`` event as ``dockyard events`` prints it: state, progress, queue."""
    data = event.get("data") or {}
    progress = data.get("progress") or {}
    text = f"evaluation {data.get('state')}"
    if progress.get("tasks_total"):
        text += f" ({progress.get('tasks_done')}/{progress.get('tasks_total')} tasks)"
    if data.get("queue_position"):
        text += f" queue position {data['queue_position']}"
    return text
