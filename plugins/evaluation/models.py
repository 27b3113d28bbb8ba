"""What a validator sends to evaluate miners, and what it gets back.

Requests are validated at decode time (field errors name the field, 400). Results follow
the validator's ``TaskSolution`` (``task_id``, ``actions``, ``web_agent_id``,
``recording``) plus what dockyard measured: the raw answers, timings, the outcome and a
stable zero-score ``reason``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# The parts of the wire format the client decodes as they are have their one home in the
# client's views (pure msgspec, so the client never imports the server).
from dockyard.client.models import (
    FINAL_STATES,
    BatchProgress,
    Progress,
    Session,
    TaskResult,
)
from dockyard.core.models import (
    BuildMode,
    ContainerPath,
    EnvMap,
    GitRef,
    HttpPath,
    Model,
    Port,
    RelPath,
    RepoUrl,
    Resources,
    now,
)

EvaluationState = Literal[
    "queued", "deploying", "running", "session", "cleaning", "finished", "failed",
    "cancelled", "expired",
]  # fmt: skip

#: An IWA task object: ``id``, ``prompt``, ``url``; other fields are passed on untouched.
Task = Annotated[dict[str, Any], Meta(max_length=64)]
Tasks = Annotated[list[Task], Meta(max_length=500)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=86400)]


class Tool(Model):
    """A tool offered to the agent in every step request (IWA's ``StepAllowedTool``)."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: Annotated[str, Meta(max_length=4096)] = ""
    #: The tool's arguments as a JSON schema.
    parameters: dict[str, Any] = {}


#: The ``tools`` of a step request; absent: the validator's browser tools.
Tools = Annotated[list[Tool], Meta(max_length=256)]


class Timeouts(Model):
    """Per-evaluation bounds; an absent one takes the operator's default (``eval_*``)."""

    request_s: Annotated[float, Meta(gt=0, le=600)] | None = None
    task_s: Annotated[float, Meta(gt=0, le=3600)] | None = None
    health_s: Annotated[float, Meta(gt=0, le=1800)] | None = None
    health_interval_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    session_ttl_s: PositiveSeconds | None = None


class Miner(Model):
    """Where a miner's agent comes from, and who the miner is."""

    github_url: RepoUrl
    ref: GitRef | None = None
    subdir: RelPath = ""
    build_mode: BuildMode = "dockerfile"
    dockerfile: RelPath = "Dockerfile"
    image: Annotated[str, Meta(max_length=255)] | None = None
    command: Annotated[list[Annotated[str, Meta(max_length=1024)]], Meta(max_length=64)] = []
    container_port: Port = 8000
    health_path: HttpPath = "/health"
    #: The agent's working directory (``image`` mode: ``/app``, the source).
    workdir: ContainerPath | None = None
    #: ``image`` mode: MiB of the ``/app/logs`` tmpfs (0: none; default 64).
    logs_tmpfs_mb: Annotated[int, Meta(ge=0, le=4096)] | None = None
    uid: Annotated[int, Meta(ge=0)] | None = None
    hotkey: Annotated[str, Meta(max_length=128)] | None = None
    web_agent_id: Annotated[str, Meta(max_length=128)] | None = None
    #: A batch may give each miner its own tasks.
    tasks: Tasks | None = None


class EvaluationOptions(Model):
    """What every evaluation of a request shares."""

    tasks: Tasks = []
    #: ``step`` as the validator speaks it; ``act`` (``/act``) and ``solve_task`` when asked.
    protocol: Annotated[str, Meta(min_length=1, max_length=64)] = "step"
    mode: Literal["relay", "session"] = "relay"
    #: The tools a relayed step request offers; absent: the validator's browser tools.
    tools: Tools | None = None
    include_reasoning: bool = False
    #: ``step`` tries ``/act`` (``act`` tries ``/step``) after a 404; the validator never does.
    path_fallback: bool = False
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    max_parallel_tasks: Annotated[int, Meta(ge=1, le=64)] | None = None
    max_steps: Annotated[int, Meta(ge=1, le=100)] | None = None
    resources: Resources = msgspec.field(default_factory=Resources)
    env: EnvMap = {}
    require_ref: bool = False
    keep_image: bool | None = None


class EvaluateMinerRequest(EvaluationOptions, kw_only=True):
    """``POST /v1/integration/evaluate-miner``."""

    miner: Miner


class EvaluateBatchRequest(EvaluationOptions, kw_only=True):
    """``POST /v1/integration/evaluate-miners-batch``: many miners, shared or own tasks."""

    miners: Annotated[list[Miner], Meta(min_length=1, max_length=256)]
    concurrency: Annotated[int, Meta(ge=1, le=256)] | None = None


class FinishSessionRequest(Model):
    """``POST /v1/integration/evaluation/{id}/finish``: what the validator saw, kept as is."""

    results: list[Any] = []


# ---------------------------------------------------------------- results
class Limits(Model):
    """The bounds an evaluation ran with, defaults resolved."""

    request_s: float
    task_s: float
    health_s: float
    health_interval_s: float
    session_ttl_s: float
    lifetime_s: float
    max_parallel_tasks: int
    max_steps: int
    keep_image: bool


class Evaluation(Model, kw_only=True):
    """One miner's evaluation: what was asked, where it stands, what came back."""

    id: str
    deployment_id: str
    state: EvaluationState = "queued"
    ok: bool = False
    reason: str | None = None
    message: str | None = None
    detail_reason: str | None = None
    batch_id: str | None = None
    batch_concurrency: int | None = None
    queue_position: int | None = None
    miner: Miner
    protocol: str = "step"
    mode: Literal["relay", "session"] = "relay"
    #: The evaluation's own tools (None: the validator's browser tools).
    tools: list[Tool] | None = None
    include_reasoning: bool = False
    path_fallback: bool = False
    limits: Limits
    resources: Resources = msgspec.field(default_factory=Resources)
    env_names: list[str] = []
    require_ref: bool = False
    tasks: list[dict[str, Any]] = []
    results: list[TaskResult] = []
    progress: Progress = msgspec.field(default_factory=Progress)
    commit: str | None = None
    resolved_ref: str | None = None
    #: A failed build's last log lines (bounded, secrets masked); the log goes with cleanup.
    build_log_tail: list[str] = []
    #: ``host:port`` the build's proxy refused (``build_proxy``), from the failed build's
    #: proxy summary; empty when none (or no proxy).
    build_refused: list[str] = []
    image: str | None = None
    image_reused: bool | None = None
    image_kept: bool | None = None
    agent_url: str | None = None
    session: Session | None = None
    cleaned_up: bool = False
    created_at: float = msgspec.field(default_factory=now)
    updated_at: float = msgspec.field(default_factory=now)
    started_at: float | None = None
    deployed_at: float | None = None
    finished_at: float | None = None
    deploy_s: float | None = None
    total_s: float | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class Batch(Model):
    """A batch of evaluations; each member's result shows as soon as it finishes."""

    id: str
    state: Literal["running", "finished"]
    concurrency: int | None
    progress: BatchProgress
    evaluations: list[Evaluation]


class EvaluationList(Model):
    evaluations: list[Evaluation]
