"""Typed views of what the API returns about evaluations, for client code.

They accept fields a newer dockyard adds (unknown fields are ignored), so a client keeps
working across server upgrades. ``TaskSolution`` is the validator's own format.

This module is also the one home of the parts of an evaluation's wire format that the
server writes as they are (:class:`TaskResult`, :class:`Session`, :class:`Progress`,
:class:`BatchProgress`, :data:`FINAL_STATES`): the evaluation plugin's models
(``dockyard.plugins.evaluation.models``) use these classes, so both sides decode one
definition. It imports nothing but msgspec, so the client never loads the server.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

#: States an evaluation ends in; it never leaves them.
FINAL_STATES = frozenset({"finished", "failed", "cancelled", "expired"})
TaskOutcome = Literal["pending", "running", "ok", "failed", "timeout", "cancelled"]


class View(msgspec.Struct, kw_only=True):
    """Base of the client's views: keyword-only, tolerant of new fields."""


class TaskSolution(View):
    """What the validator records per task: ``TaskSolution{task_id, actions,
    web_agent_id, recording}``."""

    task_id: str
    actions: list[dict[str, Any]] = []
    web_agent_id: str | None = None
    recording: Any = None


class TaskResult(View):
    """One task's answer in the validator's format (the solution) plus dockyard's
    measurements: the raw answers, timing and outcome."""

    task_id: str
    outcome: TaskOutcome = "pending"
    reason: str | None = None
    message: str | None = None
    actions: list[dict[str, Any]] = []
    web_agent_id: str | None = None
    recording: Any = None
    raw: list[Any] = []
    steps: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None

    def solution(self) -> TaskSolution:
        return TaskSolution(
            task_id=self.task_id,
            actions=self.actions,
            web_agent_id=self.web_agent_id,
            recording=self.recording,
        )


class Session(View):
    """A stateful agent handed to the validator: it posts steps to ``step_url`` (the agent
    through the router) until it finishes the evaluation or ``expires_at`` passes."""

    url: str
    step_url: str
    protocol: str
    ttl_s: float
    opened_at: float
    expires_at: float
    closed_at: float | None = None
    closed_by: Literal["validator", "ttl", "cancel"] | None = None
    report: list[Any] = []


class Progress(View):
    tasks_total: int = 0
    tasks_done: int = 0
    tasks_ok: int = 0


class MinerView(View):
    github_url: str
    ref: str | None = None
    subdir: str = ""
    uid: int | None = None
    hotkey: str | None = None
    web_agent_id: str | None = None


class Evaluation(View):
    """One miner's evaluation. ``reason`` is the stable zero-score reason (None when the
    agent answered at least one task); ``commit`` the exact commit evaluated."""

    id: str
    state: str
    ok: bool = False
    reason: str | None = None
    message: str | None = None
    detail_reason: str | None = None
    batch_id: str | None = None
    queue_position: int | None = None
    miner: MinerView | None = None
    protocol: str = "step"
    mode: str = "relay"
    commit: str | None = None
    resolved_ref: str | None = None
    build_log_tail: list[str] = []
    build_refused: list[str] = []
    image: str | None = None
    image_reused: bool | None = None
    image_kept: bool | None = None
    agent_url: str | None = None
    results: list[TaskResult] = []
    progress: Progress = msgspec.field(default_factory=Progress)
    session: Session | None = None
    cleaned_up: bool = False
    created_at: float | None = None
    started_at: float | None = None
    deployed_at: float | None = None
    finished_at: float | None = None
    deploy_s: float | None = None
    total_s: float | None = None

    @property
    def finished(self) -> bool:
        """Whether it ended (and was cleaned up): finished, failed, cancelled or expired."""
        return self.state in FINAL_STATES

    def solutions(self) -> list[TaskSolution]:
        """Every task's answer in the validator's format, in task order."""
        return [result.solution() for result in self.results]


class BatchProgress(View):
    total: int = 0
    finished: int = 0
    ok: int = 0
    queued: int = 0
    running: int = 0


class Batch(View):
    """A batch; each member shows its result as soon as it finishes."""

    id: str
    state: str
    concurrency: int | None = None
    progress: BatchProgress = msgspec.field(default_factory=BatchProgress)
    evaluations: list[Evaluation] = []

    @property
    def finished(self) -> bool:
        return self.state == "finished"


class EvaluationList(View):
    evaluations: list[Evaluation] = []
