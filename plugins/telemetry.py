"""The telemetry plugin: every stored event moves dockyard's metrics and writes one log line.

It implements ``dockyard_event`` only. Build, fetch and deploy timings come from the events'
own timestamps (``BUILDING`` -> ``source_fetched`` -> ``image_ready`` -> ``PROMOTED`` or
``FAILED``), switch timings from the ``PROMOTED`` event's ``switch_ms`` and ``router``
(evaluation outcomes are counted by the evaluation plugin: ``plugins/evaluation/metrics.py``).
The log line is written in the context of the operation that stored the event, so it
carries the request, deployment and evaluation ids (``core/logs.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from dockyard.core import metrics as m
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Event, SlotState

log = logging.getLogger("dockyard.events")


class _Deploys:
    """Start times of deploys in progress, per (deployment, colour)."""

    def __init__(self) -> None:
        self.started: dict[tuple[str, str], float] = {}
        self.fetched: dict[tuple[str, str], float] = {}

    def forget(self, key: tuple[str, str]) -> None:
        self.started.pop(key, None)
        self.fetched.pop(key, None)


_state = _Deploys()


def _seconds(later: float, earlier: float | None) -> float | None:
    return max(0.0, later - earlier) if earlier is not None else None


def _transition(event: Event) -> None:
    key = (event.deployment_id, str(event.color))
    to = event.to_state
    m.SLOT_TRANSITIONS.labels(to_state=str(to)).inc()
    if to is SlotState.BUILDING:
        _state.forget(key)
        _state.started[key] = event.at
    elif to is SlotState.FAILED:
        reason = event.reason or "unknown"
        if event.from_state is SlotState.BUILDING and key in _state.fetched:
            m.BUILDS.labels(outcome="failed", reason=reason).inc()
            took = _seconds(event.at, _state.fetched[key])
            if took is not None:
                m.BUILD_SECONDS.labels(outcome="failed").observe(took)
        if key in _state.started:
            m.DEPLOYS.labels(outcome="failed", reason=reason).inc()
            m.DEPLOY_SECONDS.labels(outcome="failed").observe(
                _seconds(event.at, _state.started[key]) or 0.0
            )
        _state.forget(key)
    elif to is SlotState.HEALTHY and key in _state.started:
        m.DEPLOY_SECONDS.labels(outcome="healthy").observe(
            _seconds(event.at, _state.started[key]) or 0.0
        )
    elif to is SlotState.PROMOTED:
        switch_ms = event.data.get("switch_ms")
        if isinstance(switch_ms, int | float):
            router = str(event.data.get("router") or "unknown")
            m.SWITCH_SECONDS.labels(router=router).observe(switch_ms / 1000)
        if key in _state.started:
            m.DEPLOYS.labels(outcome="promoted", reason="none").inc()
            m.DEPLOY_SECONDS.labels(outcome="promoted").observe(
                _seconds(event.at, _state.started[key]) or 0.0
            )
        _state.forget(key)


def describe(event: Event) -> str:
    """One line for the log: what happened to which slot."""
    where = f"{event.deployment_id}/{event.color}" if event.color else event.deployment_id
    if event.kind == "slot_transition":
        text = f"{where}: {event.from_state} -> {event.to_state}"
    elif event.kind == "evaluation":
        text = f"evaluation {event.data.get('evaluation_id')}: {event.data.get('state')}"
    else:
        text = f"{where}: {event.kind}"
    extra = " ".join(str(x) for x in (event.reason, event.message) if x)
    return f"{text} ({extra})" if extra else text


@hookimpl
def dockyard_event(event: Event) -> Any:
    """Move the metrics and log the event (never raises into the caller's work)."""
    try:
        if event.kind == "slot_transition":
            _transition(event)
        elif event.kind == "source_fetched":
            key = (event.deployment_id, str(event.color))
            took = _seconds(event.at, _state.started.get(key))
            if took is not None:
                m.FETCH_SECONDS.observe(took)
            received = event.data.get("bytes")
            if isinstance(received, int) and received > 0:
                m.FETCH_BYTES.inc(received)
            _state.fetched[key] = event.at
        elif event.kind == "image_ready":
            key = (event.deployment_id, str(event.color))
            m.BUILDS.labels(outcome="ok", reason="none").inc()
            took = _seconds(event.at, _state.fetched.get(key))
            if took is not None:
                m.BUILD_SECONDS.labels(outcome="ok").observe(took)
    finally:
        extra: dict[str, Any] = {"event": event.kind, "seq": event.seq}
        if event.color:
            extra["color"] = str(event.color)
        if event.kind == "evaluation" and event.data.get("evaluation_id"):
            extra["evaluation_id"] = event.data["evaluation_id"]
        log.info(describe(event), extra={**extra, "deployment_id": event.deployment_id})
