"""The evaluation plugin's Prometheus metrics, registered in dockyard's registry
(``dockyard.core.metrics.REGISTRY``, served by ``GET /metrics``) when the plugin loads.

Counters and histograms move with the service's final ``evaluation`` events (the plugin
observes them through ``dockyard_event``, each evaluation counted once); the gauges of what
is unfinished right now are refreshed from the running service at every scrape (the plugin
registers :func:`refresh_gauges` through ``ApiRegistrar.scrape``). Their names are part of
the README's "Metrics" table.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import OrderedDict
from typing import Any

from litestar.datastructures import State
from prometheus_client import Counter, Gauge, Histogram

from dockyard.core.metrics import REGISTRY, SLOW_BUCKETS
from dockyard.core.models import Event

#: The states an unfinished evaluation is in (``dockyard_evaluations_active``).
ACTIVE_STATES = ("queued", "deploying", "running", "session", "cleaning")
#: Evaluations whose final state was already counted (bounded, oldest forgotten first).
_COUNTED_MAX = 10000

EVALUATIONS = Counter(
    "dockyard_evaluations",
    "Finished evaluations by final state and zero-score reason ('none' when it scored)",
    ["state", "reason"],
    registry=REGISTRY,
)
EVALUATIONS_ACTIVE = Gauge(
    "dockyard_evaluations_active",
    "Unfinished evaluations by state (read at scrape time)",
    ["state"],
    registry=REGISTRY,
)
EVALUATION_SECONDS = Histogram(
    "dockyard_evaluation_duration_seconds",
    "Evaluation phases: deploying to agent ready ('deploy'), created to finished ('total')",
    ["phase"],
    buckets=SLOW_BUCKETS,
    registry=REGISTRY,
)
EVALUATION_QUEUE = Gauge(
    "dockyard_evaluation_queue_depth",
    "Evaluations waiting for admission (read at scrape time)",
    registry=REGISTRY,
)
EVALUATION_AGENTS = Gauge(
    "dockyard_evaluation_running_agents",
    "Evaluations admitted and holding an agent (read at scrape time)",
    registry=REGISTRY,
)
TASKS = Counter(
    "dockyard_evaluation_tasks",
    "Relayed tasks by outcome (ok, failed, timeout, cancelled)",
    ["outcome"],
    registry=REGISTRY,
)
TASK_SECONDS = Histogram(
    "dockyard_evaluation_task_duration_seconds",
    "Time an agent took to answer one task, by outcome",
    ["outcome"],
    buckets=SLOW_BUCKETS,
    registry=REGISTRY,
)

_counted: OrderedDict[str, None] = OrderedDict()


def count_final(event: Event) -> None:
    """Count a final ``evaluation`` event: its state and reason, phases, tasks (once per
    evaluation; other events are ignored)."""
    data = event.data
    evaluation_id = str(data.get("evaluation_id") or "")
    if event.kind != "evaluation" or not data.get("final") or not evaluation_id:
        return
    if evaluation_id in _counted:
        return
    _counted[evaluation_id] = None
    while len(_counted) > _COUNTED_MAX:
        _counted.popitem(last=False)
    EVALUATIONS.labels(state=str(data.get("state")), reason=str(data.get("reason") or "none")).inc()
    for phase in ("deploy", "total"):
        value = data.get(f"{phase}_s")
        if isinstance(value, int | float):
            EVALUATION_SECONDS.labels(phase=phase).observe(value)
    for result in data.get("results") or []:
        outcome = str(result.get("outcome"))
        TASKS.labels(outcome=outcome).inc()
        duration = result.get("duration_s")
        if isinstance(duration, int | float):
            TASK_SECONDS.labels(outcome=outcome).observe(duration)


def refresh_gauges(state: State) -> None:
    """Set the scrape-time gauges from the app's evaluation service (zero without one)."""
    service: Any = getattr(state, "evaluations", None)
    active: Tally[str] = Tally()
    queue = admitted = 0
    if service is not None:
        active, queue, admitted = service.occupancy()
    for name in ACTIVE_STATES:
        EVALUATIONS_ACTIVE.labels(state=name).set(active[name])
    EVALUATION_QUEUE.set(queue)
    EVALUATION_AGENTS.set(admitted)
