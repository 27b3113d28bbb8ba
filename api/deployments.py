"""The v1 deployment routes: deploy, redeploy, switch, delete, status, events and logs."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED
from msgspec import UNSET, Meta, UnsetType

from dockyard.api.errors import errors
from dockyard.core.controller import Controller as DeploymentController
from dockyard.core.errors import ValidationError
from dockyard.core.models import (
    BuildMode,
    Color,
    Deployment,
    DeploymentSpec,
    EnvMap,
    Event,
    GitRef,
    HealthCheck,
    Model,
    Port,
    RelPath,
    Resources,
    SlotHealth,
    SlotState,
)
from dockyard.core.plugins import Registrar
from dockyard.core.store import MAX_STATUS_PAGE, DeploymentStatus, StatusFilter, StatusPage
from dockyard.core.views import OperationState

#: ``GET /v1/status``'s own query parameters; any other names a status filter.
STATUS_PARAMS = ("limit", "cursor", "state")
#: Operations whose query takes every registered status filter (listed in the schema).
STATUS_FILTERED_OPERATIONS = ("status",)
BOOLEANS = {"true": True, "false": False}


def status_filters(
    request: Request[Any, Any, Any], own: tuple[str, ...], filters: Registrar[str]
) -> dict[str, bool]:
    """The status filters of a request's query (``?<filter>=true|false``): every parameter
    that is not one of the route's ``own`` must be a registered filter, and its value true
    or false (a 400 naming the parameter otherwise)."""
    found: dict[str, bool] = {}
    for name in sorted(set(request.query_params.keys()) - set(own)):
        if name not in filters:
            raise ValidationError(f"{name}: no loaded plugin registers this status filter")
        values = request.query_params.getall(name)
        value = BOOLEANS.get(values[-1].strip().lower()) if len(values) == 1 else None
        if value is None:
            raise ValidationError(f"{name}: must be true or false", field=name)
        found[name] = value
    return found


def labelled(where: StatusFilter, filters: Registrar[str], name: str, wanted: bool) -> StatusFilter:
    """``where`` narrowed by the status filter ``name`` (``dockyard_register_status_filters``):
    deployments with its label when ``wanted``, without it otherwise (one filter of each
    sense per request: a second is a 400 naming it)."""
    if name not in filters:
        raise ValidationError(f"{name}: no loaded plugin registers this status filter")
    label = filters.get(name)
    taken = where.with_label if wanted else where.without_label
    if taken is not None:
        raise ValidationError(f"{name}: one status filter set to {str(wanted).lower()} at a time")
    if wanted:
        return msgspec.structs.replace(where, with_label=label)
    return msgspec.structs.replace(where, without_label=label)


SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
#: A deployment id in a path: the pattern is in the schema, and checked (400 when wrong).
DeploymentId = Annotated[
    str,
    PathParameter(
        pattern=SLUG.pattern,
        max_length=40,
        description="the deployment's id: lower-case letters, digits and '-', 1-40 chars",
    ),
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
REDACTED = "<redacted>"
MAX_WAIT_S = 900.0
#: Deployments per status page unless ``limit`` says otherwise.
STATUS_PAGE = 100


class SlotView(Model):
    color: Color
    state: SlotState
    revision_id: str | None
    commit: str | None
    host_port: int | None
    container_name: str | None
    health: SlotHealth
    reason: str | None
    message: str | None
    updated_at: float


class DrainWaitView(Model):
    """The draining slot a running operation waits for before it deploys into it."""

    color: Color
    since: float
    until: float


class OperationView(Model):
    kind: str
    running: bool
    started_at: float
    finished_at: float | None
    error: dict[str, Any] | None
    waiting_for_drain: DrainWaitView | None = None


class DeploymentView(Model):
    """A deployment as the API shows it. Env values and build args are never shown."""

    id: str
    spec: DeploymentSpec
    generation: int
    created_at: float
    updated_at: float
    promoted: Color | None
    url: str | None
    slots: list[SlotView]
    operation: OperationView | None


class StatusSlotView(Model):
    """A slot in the status list (``GET /v1/repos/{id}`` has every field)."""

    color: Color
    state: SlotState
    commit: str | None
    host_port: int | None
    health: SlotHealth
    reason: str | None
    message: str | None


class StatusItemView(Model):
    """A deployment in the status list: no spec (``GET /v1/repos/{id}`` shows it)."""

    id: str
    repo: str
    ref: str | None
    generation: int
    updated_at: float
    promoted: Color | None
    url: str | None
    slots: list[StatusSlotView]
    operation: OperationView | None


class StatusView(Model):
    """One page of deployments by id; ``cursor`` fetches the next page (None: the last)."""

    deployments: list[StatusItemView]
    cursor: str | None = None


class RedeployRequest(Model):
    """Fields to change before deploying into the idle slot; absent fields keep their value."""

    ref: GitRef | UnsetType | None = UNSET
    subdir: RelPath | UnsetType = UNSET
    build_mode: BuildMode | UnsetType = UNSET
    dockerfile: RelPath | UnsetType = UNSET
    image: Annotated[str, Meta(max_length=255)] | UnsetType | None = UNSET
    command: (
        Annotated[list[Annotated[str, Meta(max_length=1024)]], Meta(max_length=64)] | UnsetType
    ) = UNSET
    build_args: EnvMap | UnsetType = UNSET
    build_network: bool | UnsetType = UNSET
    env: EnvMap | UnsetType = UNSET
    container_port: Port | UnsetType = UNSET
    health: HealthCheck | UnsetType = UNSET
    resources: Resources | UnsetType = UNSET
    grace_period_s: Annotated[float, Meta(ge=0, le=3600)] | UnsetType = UNSET
    auto_promote: bool | UnsetType = UNSET


class LogsView(Model):
    deployment_id: str
    slot: Color | None
    source: Literal["container", "build"]
    lines: list[str]


class DeletedView(Model):
    deleted: str


def _redact(spec: DeploymentSpec) -> DeploymentSpec:
    return msgspec.structs.replace(
        spec,
        env={k: REDACTED for k in spec.env},
        build_args={k: REDACTED for k in spec.build_args},
    )


def _check_id(deployment_id: str) -> str:
    if not SLUG.match(deployment_id):
        raise ValidationError(
            f"id: {deployment_id[:60]!r} is not a valid deployment id "
            "(lower-case letters, digits and '-', 1-40 chars)"
        )
    return deployment_id


def _operation_view(op: OperationState | None, *, drain: bool = True) -> OperationView | None:
    if op is None:
        return None
    wait = op.waiting_for_drain if drain else None
    return OperationView(
        kind=op.kind,
        running=op.running,
        started_at=op.started_at,
        finished_at=op.finished_at,
        error=op.error,
        waiting_for_drain=DrainWaitView(color=wait[0], since=wait[1], until=wait[2])
        if wait
        else None,
    )


def render_status(controller: DeploymentController, item: DeploymentStatus) -> StatusItemView:
    """A status-list entry, from what the store read in one query (no I/O here)."""
    promoted = next((s for s in item.slots if s.state is SlotState.PROMOTED), None)
    return StatusItemView(
        id=item.id,
        repo=item.repo,
        ref=item.ref,
        generation=item.generation,
        updated_at=item.updated_at,
        promoted=promoted.color if promoted else None,
        url=controller.url_for(item.id, promoted),
        slots=[
            StatusSlotView(
                color=slot.color,
                state=slot.state,
                commit=item.commits.get(slot.revision_id) if slot.revision_id else None,
                host_port=slot.host_port,
                health=slot.health,
                reason=slot.reason,
                message=slot.message,
            )
            for slot in item.slots
        ],
        operation=_operation_view(controller.operation_state(item.id), drain=False),
    )


#: Status pages already rendered: (controller, query) -> (the store's page, its items'
#: operations, the view). A store keeps a page object until anything is written, so a repeat
#: of the same query with nothing written and no operation changed is served the same view
#: (no per-item rendering: the allocations it saved were the status list's p99).
_RENDERED: dict[tuple[Any, ...], tuple[StatusPage, list[OperationState | None], StatusView]] = {}
#: How many rendered pages are kept (a status screen polls a few queries).
RENDERED_KEPT = 8


def _rendered_status(
    controller: DeploymentController, page: StatusPage, query: tuple[Any, ...]
) -> StatusView:
    """The view of ``page``: the one rendered before when the store returned the very same
    page object (nothing written since) and every item's operation is as it was then."""
    key = (id(controller), *query)
    operations = [controller.operation_state(item.id) for item in page.deployments]
    kept = _RENDERED.get(key)
    if kept is not None and kept[0] is page and kept[1] == operations:
        return kept[2]
    view = StatusView(
        deployments=[render_status(controller, item) for item in page.deployments],
        cursor=page.cursor,
    )
    _RENDERED.pop(key, None)
    _RENDERED[key] = (page, operations, view)
    while len(_RENDERED) > RENDERED_KEPT:
        _RENDERED.pop(next(iter(_RENDERED)))
    return view


async def render(controller: DeploymentController, deployment: Deployment) -> DeploymentView:
    """The API view of a deployment, with its slots and current operation."""
    state = await controller.state(deployment.id)
    deployment = state.deployment
    views = [
        SlotView(
            color=slot.color,
            state=slot.state,
            revision_id=slot.revision_id,
            commit=commit,
            host_port=slot.host_port,
            container_name=slot.container_name,
            health=slot.health,
            reason=slot.reason,
            message=slot.message,
            updated_at=slot.updated_at,
        )
        for slot, commit in ((s.slot, s.commit) for s in state.slots)
    ]
    return DeploymentView(
        id=deployment.id,
        spec=_redact(deployment.spec),
        generation=deployment.generation,
        created_at=deployment.created_at,
        updated_at=deployment.updated_at,
        promoted=state.promoted.color if state.promoted else None,
        url=state.url,
        slots=views,
        operation=_operation_view(state.operation),
    )


WaitParam = Annotated[bool, QueryParameter(description="wait (bounded) for the operation to end")]
TimeoutParam = Annotated[
    float, QueryParameter(ge=0.1, le=MAX_WAIT_S, description="seconds to wait at most")
]


class DeploymentRoutes(Controller):
    """Deployments: create, change, watch and remove."""

    path = "/v1"
    tags = ["deployments"]
    opt = {"scope": "read"}

    async def _respond(
        self, controller: DeploymentController, deployment_id: str, wait: bool, timeout: float
    ) -> Response[DeploymentView]:
        finished = True
        if wait:
            finished = await controller.wait(deployment_id, timeout)
        view = await render(controller, await controller.get(deployment_id))
        return Response(view, status_code=HTTP_200_OK if wait and finished else HTTP_202_ACCEPTED)

    @get(
        "/status",
        operation_id="status",
        summary="Deployments by id, a page at a time: their slots, states and health",
    )
    async def status(
        self,
        request: Request[Any, Any, Any],
        controller: NamedDependency[DeploymentController],
        limit: Annotated[
            int, QueryParameter(ge=1, le=MAX_STATUS_PAGE, description="deployments per page")
        ] = STATUS_PAGE,
        cursor: Annotated[
            str | None,
            QueryParameter(
                pattern=SLUG.pattern, description="the previous page's cursor: the page after it"
            ),
        ] = None,
        slot_state: Annotated[
            SlotState | None,
            QueryParameter(name="state", description="only deployments with a slot in this state"),
        ] = None,
    ) -> StatusView:
        if cursor is not None and not SLUG.match(cursor):
            raise ValidationError(f"cursor: {cursor[:60]!r} is not a cursor this API gave out")
        where = StatusFilter(state=slot_state)
        filters = controller.status_filters
        for name, wanted in status_filters(request, STATUS_PARAMS, filters).items():
            where = labelled(where, filters, name, wanted)
        page = await controller.status_page(after=cursor, limit=limit, where=where)
        query = (cursor, limit, where.state, where.with_label, where.without_label)
        return _rendered_status(controller, page, query)

    @post(
        "/repos",
        opt={"scope": "deploy"},
        operation_id="createDeployment",
        summary="Create and deploy a repository",
        status_code=HTTP_202_ACCEPTED,
        responses=errors(409, 422, 503),
    )
    async def create(
        self,
        data: JSONBody[DeploymentSpec],
        controller: NamedDependency[DeploymentController],
        wait: WaitParam = False,
        timeout: TimeoutParam = 300.0,
    ) -> Response[DeploymentView]:
        await controller.create(data)
        return await self._respond(controller, data.id, wait, timeout)

    @get("/repos/{deployment_id:str}", operation_id="getDeployment", summary="One deployment")
    async def show(
        self, deployment_id: DeploymentId, controller: NamedDependency[DeploymentController]
    ) -> DeploymentView:
        return await render(controller, await controller.get(_check_id(deployment_id)))

    @get(
        "/repos/{deployment_id:str}/events",
        operation_id="listEvents",
        summary="A deployment's history",
    )
    async def events(
        self,
        deployment_id: DeploymentId,
        controller: NamedDependency[DeploymentController],
        after: Annotated[int, QueryParameter(ge=0, le=2**53 - 1)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=5000)] = 1000,
    ) -> list[Event]:
        return await controller.events(_check_id(deployment_id), after=after, limit=limit)

    @post(
        "/repos/{deployment_id:str}/redeploy",
        opt={"scope": "deploy"},
        operation_id="redeploy",
        summary="Deploy a new ref and/or arguments into the idle slot",
        description="A slot still draining is left to finish its grace period first: the "
        "operation waits for it (`operation.waiting_for_drain`, a `drain_wait` event).",
        status_code=HTTP_202_ACCEPTED,
        responses=errors(409, 422, 503),
    )
    async def redeploy(
        self,
        deployment_id: DeploymentId,
        controller: NamedDependency[DeploymentController],
        data: JSONBody[RedeployRequest | None] = None,
        wait: WaitParam = False,
        timeout: TimeoutParam = 300.0,
    ) -> Response[DeploymentView]:
        changes = {}
        if data is not None:
            changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not UNSET}
            changes = msgspec.to_builtins(changes)
        await controller.redeploy(_check_id(deployment_id), changes)
        return await self._respond(controller, deployment_id, wait, timeout)

    @post(
        "/repos/{deployment_id:str}/switch",
        opt={"scope": "deploy"},
        operation_id="switch",
        summary="Promote the other slot (rollback included)",
        status_code=HTTP_202_ACCEPTED,
        responses=errors(409, 503),
    )
    async def switch(
        self,
        deployment_id: DeploymentId,
        controller: NamedDependency[DeploymentController],
        wait: WaitParam = False,
        timeout: TimeoutParam = 300.0,
    ) -> Response[DeploymentView]:
        await controller.switch(_check_id(deployment_id))
        return await self._respond(controller, deployment_id, wait, timeout)

    @delete(
        "/repos/{deployment_id:str}",
        opt={"scope": "deploy"},
        operation_id="deleteDeployment",
        summary="Stop and remove everything a deployment owns",
        status_code=HTTP_200_OK,
        responses=errors(409, 502, 503),
    )
    async def remove(
        self, deployment_id: DeploymentId, controller: NamedDependency[DeploymentController]
    ) -> DeletedView:
        await controller.delete(_check_id(deployment_id))
        return DeletedView(deleted=deployment_id)

    @get(
        "/repos/{deployment_id:str}/logs",
        operation_id="logs",
        summary="Container logs (or the build log) of a deployment",
        responses=errors(502, 503),
    )
    async def logs(
        self,
        deployment_id: DeploymentId,
        controller: NamedDependency[DeploymentController],
        slot: FromQuery[Color | None] = None,
        tail: Annotated[int, QueryParameter(ge=1, le=10000)] = 200,
        strip_ansi: FromQuery[bool] = False,
        build: Annotated[bool, QueryParameter(description="the build log instead")] = False,
    ) -> LogsView:
        color, lines = await controller.logs(_check_id(deployment_id), slot, tail=tail, build=build)
        source: Literal["container", "build"] = "build" if build else "container"
        if strip_ansi:
            lines = [ANSI.sub("", line) for line in lines]
        return LogsView(deployment_id=deployment_id, slot=color, source=source, lines=lines)
