"""Domain models (msgspec): deployment specs, revisions, slots and events.

Every model derives from :class:`Model`, one configured base: unknown fields are refused,
fields are keyword-only. Constraints live in reusable ``Annotated`` aliases so that msgspec
validates them at decode time and Litestar shows them in OpenAPI. Stored fields that are added
later always get defaults, so old rows keep decoding.
"""

from __future__ import annotations

import enum
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from dockyard.core.errors import Unprocessable, ValidationError


class Model(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The one base for every dockyard model."""


# ---------------------------------------------------------------- reusable constraints
Slug = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$",
        max_length=40,
        description="lower-case letters, digits and '-', 1-40 chars, no leading/trailing '-'",
    ),
]
RepoUrl = Annotated[str, Meta(min_length=1, max_length=512)]
GitRef = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9._/+-]{1,255}$", description="branch, tag or 40-hex commit")
]
RelPath = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9._/+ -]{0,255}$", max_length=255, description="relative path")
]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
EnvValue = Annotated[str, Meta(pattern=r"^[^\x00\r\n]*$", max_length=4096)]
EnvMap = Annotated[dict[EnvName, EnvValue], Meta(max_length=64)]
Port = Annotated[int, Meta(ge=1, le=65535)]
Seconds = Annotated[float, Meta(gt=0, le=3600)]
HttpPath = Annotated[str, Meta(pattern=r"^/[A-Za-z0-9._~/%?=&+-]{0,255}$")]
ContainerPath = Annotated[
    str,
    Meta(pattern=r"^/[A-Za-z0-9._/+-]{0,255}$", description="absolute path inside the container"),
]
#: What a gateway variable appends to the gateway's URL (``""`` or ``/openai/v1``).
UrlSuffix = Annotated[str, Meta(pattern=r"^(/[A-Za-z0-9._~/-]{0,255})?$")]
#: Variables that carry the LLM gateway's address: name -> suffix appended to its URL.
GatewayEnv = Annotated[dict[EnvName, UrlSuffix], Meta(max_length=16)]


#: How a model's own checks (``__post_init__``: what a field's type or pattern cannot say)
#: start their message. msgspec keeps only the message of such an error, and the API tells
#: these (422: matches the schema, refused as asked) from schema mismatches (400) by it.
REFUSED = "refused: "


def now() -> float:
    """Wall-clock time in seconds, the one timestamp format of the store and the API."""
    return time.time()


# ---------------------------------------------------------------- specs
class HealthCheck(Model):
    """How dockyard probes a container before promoting it (probes are sent by dockyard)."""

    path: HttpPath = "/health"
    interval_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0
    healthy_threshold: Annotated[int, Meta(ge=1, le=20)] = 1
    startup_delay_s: Annotated[float, Meta(ge=0, le=600)] = 0.0
    deadline_s: Annotated[float, Meta(gt=0, le=1800)] = 60.0
    failure_threshold: Annotated[int, Meta(ge=1, le=100)] = 3
    on_failure: Literal["none", "restart", "rollback"] = "none"


class Resources(Model):
    """Per-container limits. They can only lower the operator's caps, never raise them."""

    memory_mb: Annotated[int, Meta(ge=16, le=65536)] = 512
    cpus: Annotated[float, Meta(gt=0, le=64)] = 1.0
    pids: Annotated[int, Meta(ge=16, le=32768)] = 256
    tmpfs_mb: Annotated[int, Meta(ge=1, le=4096)] = 64


BuildMode = Literal["dockerfile", "image"]


class DeploymentSpec(Model):
    """What an operator or validator asks for: a named app built from a git repository."""

    id: Slug
    repo: RepoUrl
    ref: GitRef | None = None
    subdir: RelPath = ""
    build_mode: BuildMode = "dockerfile"
    dockerfile: RelPath = "Dockerfile"
    image: Annotated[str, Meta(max_length=255)] | None = None
    command: Annotated[list[Annotated[str, Meta(max_length=1024)]], Meta(max_length=64)] = []
    build_args: EnvMap = {}
    build_network: bool = False
    env: EnvMap = {}
    container_port: Port = 8000
    health: HealthCheck = msgspec.field(default_factory=HealthCheck)
    resources: Resources = msgspec.field(default_factory=Resources)
    grace_period_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    auto_promote: bool = True
    labels: Annotated[dict[EnvName, EnvValue], Meta(max_length=32)] = {}
    #: Seconds a container may run before it is stopped (slot FAILED, ``lifetime_exceeded``);
    #: can only lower the operator's ``max_container_lifetime_s``.
    max_lifetime_s: Annotated[float, Meta(gt=0, le=30 * 86400)] | None = None
    #: The container's working directory; None: the image's (``build_mode: "image"``: the
    #: source mount, ``/app``).
    workdir: ContainerPath | None = None
    #: ``build_mode: "image"``: MiB of the tmpfs at ``/app/logs`` (rw, noexec; 0: none), as
    #: the validator's sandbox gives agents. Counts against ``max_tmpfs_mb``.
    logs_tmpfs_mb: Annotated[int, Meta(ge=0, le=4096)] = 64
    #: Variables that carry the operator's gateway (``agent_gateway``) when there is one:
    #: name -> suffix of its URL; None: ``{"OPENAI_BASE_URL": ""}``.
    gateway_env: GatewayEnv | None = None

    def __post_init__(self) -> None:
        if self.workdir is not None and ".." in self.workdir.split("/"):
            raise ValueError("workdir must be an absolute path without '..'")
        for name in ("subdir", "dockerfile"):
            value: str = getattr(self, name)
            parts = value.split("/")
            if value.startswith("/") or ".." in parts:
                raise ValueError(f"{REFUSED}{name} must be a relative path inside the repository")
        if self.build_mode == "image" and not self.image:
            raise ValueError(f"{REFUSED}image is required when build_mode is 'image'")


# ---------------------------------------------------------------- runtime records
class Color(enum.StrEnum):
    """A deployment's two slots."""

    BLUE = "blue"
    GREEN = "green"

    @property
    def other(self) -> Color:
        return Color.GREEN if self is Color.BLUE else Color.BLUE


class SlotState(enum.StrEnum):
    """A slot's life. Legal moves live in :mod:`dockyard.core.states`."""

    IDLE = "IDLE"
    BUILDING = "BUILDING"
    STAGING = "STAGING"
    HEALTHY = "HEALTHY"
    PROMOTED = "PROMOTED"
    DRAINING = "DRAINING"
    RETIRED = "RETIRED"
    FAILED = "FAILED"


class Revision(Model):
    """An immutable resolved source and the image built from it, with provenance."""

    id: str
    deployment_id: Slug
    repo: RepoUrl
    commit: Annotated[str, Meta(pattern=r"^[0-9a-f]{40}$")]
    ref: str | None = None
    subdir: str = ""
    dockerfile: str = "Dockerfile"
    build_mode: BuildMode = "dockerfile"
    build_args_hash: str = ""
    image_id: str | None = None
    image_tag: str | None = None
    created_at: float = msgspec.field(default_factory=now)
    provenance: dict[str, str] = {}
    spec: DeploymentSpec | None = None  # the spec it was built from, to restart it later


class SlotHealth(Model):
    """The latest view of a slot's probes."""

    status: Literal["unknown", "healthy", "unhealthy"] = "unknown"
    last_latency_ms: float | None = None
    consecutive_failures: int = 0
    checked_at: float | None = None


class Slot(Model):
    """One of a deployment's two places for a container (blue or green)."""

    deployment_id: Slug
    color: Color
    state: SlotState = SlotState.IDLE
    revision_id: str | None = None
    container_id: str | None = None
    container_name: str | None = None
    host_port: int | None = None
    health: SlotHealth = msgspec.field(default_factory=SlotHealth)
    reason: str | None = None
    message: str | None = None
    updated_at: float = msgspec.field(default_factory=now)


class Deployment(Model):
    """A stored deployment: its spec plus bookkeeping."""

    spec: DeploymentSpec
    created_at: float = msgspec.field(default_factory=now)
    updated_at: float = msgspec.field(default_factory=now)
    generation: int = 0

    @property
    def id(self) -> str:
        return self.spec.id


class Event(Model):
    """One entry of the append-only history: every transition, with its timing."""

    deployment_id: str
    kind: str
    seq: int | None = None
    color: Color | None = None
    from_state: SlotState | None = None
    to_state: SlotState | None = None
    reason: str | None = None
    message: str | None = None
    at: float = msgspec.field(default_factory=now)
    data: dict[str, Any] = {}


# ---------------------------------------------------------------- decoding helpers
def decode_spec(data: bytes | str | dict[str, Any]) -> DeploymentSpec:
    """Decode and validate a deployment spec; errors name the offending field."""
    try:
        if isinstance(data, dict):
            return msgspec.convert(data, DeploymentSpec)
        return msgspec.json.decode(data, type=DeploymentSpec)
    except msgspec.ValidationError as exc:
        if str(exc).startswith(REFUSED):
            raise Unprocessable(f"invalid deployment spec: {exc}") from None
        raise ValidationError(f"invalid deployment spec: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValidationError(f"deployment spec is not valid JSON: {exc}") from None
