"""The deployment controller: operations, their locks and background tasks, drains, the
health monitor of promoted slots, and resuming after a restart.

One operation per deployment at a time (a second gets Conflict -> 409); different
deployments proceed in parallel. An operation is admitted under the deployment's lock:
validation, the stored spec and the start of its task happen while holding it, and the
task keeps holding it until it ends, so a request answered 409 has changed nothing.
Operations run as background tasks owned by the controller (and so by the app's
lifespan); callers may wait for them with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from dockyard.core.deployer import SWITCH_TIMEOUT_S, SlotOps, container_name, lease_owner
from dockyard.core.errors import Conflict, DockyardError, NotFound
from dockyard.core.health import probe_once
from dockyard.core.logs import bind as bind_log_ids
from dockyard.core.models import (
    Color,
    Deployment,
    DeploymentSpec,
    Event,
    Slot,
    SlotHealth,
    SlotState,
    now,
)
from dockyard.core.plugins import Registrar, check_spec
from dockyard.core.policy import check_spec as check_caps
from dockyard.core.policy import effective_lifetime
from dockyard.core.router import Route
from dockyard.core.runtime import LABEL_COLOR, LABEL_DEPLOYMENT
from dockyard.core.services import Services
from dockyard.core.source import Source
from dockyard.core.store import StatusFilter, StatusPage
from dockyard.core.strategy import Strategy
from dockyard.core.views import (
    BuildFacts,
    DeploymentState,
    DeployOutcome,
    OperationState,
    SlotWithCommit,
    promoted_url,
)

log = logging.getLogger(__name__)
#: Deployments per store read when the router watch reads every slot.
ROUTE_CHECK_PAGE = 100
S = SlotState
T = TypeVar("T")
#: How long a stop waits, in all, for cancelled operations to clean up.
STOP_TIMEOUT_S = 30.0


@dataclass
class Operation:
    """A running or finished operation on one deployment."""

    kind: str
    started_at: float
    task: asyncio.Task[None]
    finished_at: float | None = None
    error: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return not self.task.done()


@dataclass
class Controller:
    """Owns every deployment's operations for one dockyard process."""

    services: Services
    strategy: Strategy
    monitor_interval_s: float = 5.0
    router_watch_interval_s: float = 2.0
    ops: SlotOps = field(init=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _operations: dict[str, Operation] = field(default_factory=dict)
    _admitting: dict[str, str] = field(default_factory=dict)  # id -> kind being admitted
    _deleting: dict[str, asyncio.Event] = field(default_factory=dict)  # set once deleted
    _timers: dict[tuple[str, Color], tuple[asyncio.Task[None], float]] = field(default_factory=dict)
    _monitor: asyncio.Task[None] | None = None
    _router_watch: asyncio.Task[None] | None = None
    _router_ok: bool = True

    def __post_init__(self) -> None:
        self.ops = SlotOps(self.services)

    @classmethod
    def from_services(cls, services: Services) -> Controller:
        factory = services.pm.registries.strategies.get(services.settings.strategy)
        return cls(
            services=services,
            strategy=factory(services.settings),
            monitor_interval_s=services.settings.monitor_interval_s,
            router_watch_interval_s=services.settings.router_watch_interval_s,
        )

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Resume from the stored state, restore routes, start the health monitor."""
        await self.resume()
        if self.monitor_interval_s > 0:
            self._monitor = asyncio.create_task(self._monitor_loop(), name="health-monitor")
        if self.router_watch_interval_s > 0:
            self._router_watch = asyncio.create_task(self._router_loop(), name="router-watch")

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Cancel the monitor, drain timers and running operations, and wait (at most
        ``timeout_s`` in all) while they clean up: a cancelled operation's slot ends FAILED
        with ``controller_stopped`` and its container and port are removed."""
        self.ops.cancel_reason = "controller_stopped"
        tasks: list[asyncio.Task[Any]] = [t for t, _ in self._timers.values() if not t.done()]
        if self._monitor:
            tasks.append(self._monitor)
        if self._router_watch:
            tasks.append(self._router_watch)
        tasks += [op.task for op in self._operations.values() if op.running]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning("%s did not end within %g s of the stop", task.get_name(), timeout_s)

    def _lock(self, deployment_id: str) -> asyncio.Lock:
        return self._locks.setdefault(deployment_id, asyncio.Lock())

    # -- queries -------------------------------------------------------------------------
    async def get(self, deployment_id: str) -> Deployment:
        deployment = await self.services.store.get_deployment(deployment_id)
        if deployment is None:
            raise NotFound(f"deployment {deployment_id!r} does not exist")
        return deployment

    def operation(self, deployment_id: str) -> Operation | None:
        return self._operations.get(deployment_id)

    def url_for(self, deployment_id: str, promoted: Slot | None) -> str | None:
        """The promoted slot's URL (:func:`dockyard.core.views.promoted_url`)."""
        return promoted_url(self.services.router, deployment_id, promoted)

    def operation_state(self, deployment_id: str) -> OperationState | None:
        """The current (or last) operation, with the drain it waits for, if any."""
        op = self._operations.get(deployment_id)
        if op is None:
            return None
        wait = self.ops.waiting.get(deployment_id) if op.running else None
        return OperationState(
            kind=op.kind,
            running=op.running,
            started_at=op.started_at,
            finished_at=op.finished_at,
            error=op.error,
            waiting_for_drain=(wait.color, wait.since, wait.until) if wait else None,
        )

    async def state(self, deployment_id: str) -> DeploymentState:
        """A deployment as callers render it: slots with their commits, the promoted
        slot's URL, the operation. NotFound when it does not exist."""
        deployment = await self.get(deployment_id)
        store = self.services.store
        slots = await store.list_slots(deployment_id)
        rendered = []
        for slot in slots:
            revision = await store.get_revision(slot.revision_id) if slot.revision_id else None
            rendered.append(SlotWithCommit(slot=slot, commit=revision.commit if revision else None))
        promoted = next((s for s in slots if s.state is S.PROMOTED), None)
        return DeploymentState(
            deployment=deployment,
            slots=rendered,
            promoted=promoted,
            url=self.url_for(deployment_id, promoted),
            operation=self.operation_state(deployment_id),
        )

    async def outcome(self, deployment_id: str) -> DeployOutcome:
        """What the deployment's latest deploy came to so far (see :meth:`finished`)."""
        facts = self.ops.facts.get(deployment_id) or BuildFacts()
        known = {
            "commit": facts.commit,
            "resolved_ref": facts.resolved_ref,
            "image": facts.image,
            "image_reused": facts.image_reused,
            "build_refused": tuple(facts.build_refused),
        }
        try:
            slots = await self.services.store.list_slots(deployment_id)
        except NotFound:
            slots = []
        promoted = next((s for s in slots if s.state is S.PROMOTED), None)
        url = self.url_for(deployment_id, promoted)
        op = self._operations.get(deployment_id)
        since = op.started_at if op else 0.0
        # A slot that failed during the latest operation, or its error: the deploy failed
        # (the slot promoted before, if any, keeps serving and is still reported).
        failed = next((s for s in slots if s.state is S.FAILED and s.updated_at >= since), None)
        error = (op.error if op else None) or {}
        color = promoted.color if promoted is not None and url is not None else None
        if failed is None and not error and color is not None:
            return DeployOutcome(deployment_id, url=url, promoted=color, **known)
        reason = (failed.reason if failed else None) or error.get("reason") or "not_promoted"
        message = (failed.message if failed else None) or error.get("message") or reason
        return DeployOutcome(
            deployment_id, url=url, promoted=color, reason=reason, message=message, **known
        )

    async def finished(self, deployment_id: str, timeout_s: float) -> DeployOutcome:
        """Wait (at most ``timeout_s``) for the deployment's operation to end, then what it
        came to. TimeoutError when it is still running."""
        if not await self.wait(deployment_id, timeout_s):
            raise TimeoutError(f"the operation on {deployment_id!r} took over {timeout_s:g} s")
        return await self.outcome(deployment_id)

    async def deployments(self) -> list[Deployment]:
        """Every deployment."""
        return await self.services.store.list_deployments()

    @property
    def status_filters(self) -> Registrar[str]:
        """The deployments list's filters plugins register: name -> the label it tests
        (``dockyard_register_status_filters``)."""
        filters: Registrar[str] = self.services.pm.registries.status_filters
        return filters

    async def status_page(
        self, *, after: str | None, limit: int, where: StatusFilter | None = None
    ) -> StatusPage:
        """One page of deployments with their slots, from one store query."""
        return await self.services.store.list_status(after=after, limit=limit, where=where)

    async def events(self, deployment_id: str, *, after: int = 0, limit: int = 1000) -> list[Event]:
        """A deployment's history after sequence number ``after``; NotFound when unknown."""
        await self.get(deployment_id)
        return await self.services.store.list_events(deployment_id, after=after, limit=limit)

    async def logs(
        self, deployment_id: str, color: Color | None, *, tail: int, build: bool = False
    ) -> tuple[Color, list[str]]:
        """The last ``tail`` lines of a slot's container log (or its build log): the slot
        asked for, else the promoted one, else the latest changed. NotFound when there is
        no such deployment or build log."""
        await self.get(deployment_id)
        slots = {s.color: s for s in await self.services.store.list_slots(deployment_id)}
        chosen = (
            slots[color]
            if color
            else (
                next((s for s in slots.values() if s.state is S.PROMOTED), None)
                or max(slots.values(), key=lambda s: s.updated_at)
            )
        )
        if build:
            path = self.ops.build_log_path(deployment_id, chosen.color)
            if not path.exists():
                raise NotFound(f"the {chosen.color} slot has no build log")
            return chosen.color, path.read_text().splitlines()[-tail:]
        if not chosen.container_name:
            return chosen.color, []
        return chosen.color, await self.services.runtime.logs(chosen.container_name, tail=tail)

    def source_for(self, url: str) -> Source:
        """The source plugin that fetches ``url``; SourceError when none accepts it."""
        return self.ops.source_for(url)

    def build_logs(self, deployment_id: str) -> list[Path]:
        """The build logs of a deployment's slots that exist (gone once it is deleted)."""
        paths = [self.ops.build_log_path(deployment_id, color) for color in Color]
        return [path for path in paths if path.is_file()]

    def build_log(self, deployment_id: str, color: Color) -> Path:
        """Where the latest build log of one slot is (or would be)."""
        return self.ops.build_log_path(deployment_id, color)

    # -- operations ----------------------------------------------------------------------
    async def create(self, spec: DeploymentSpec) -> Deployment:
        """Store a new deployment and start deploying it."""

        async def admit() -> Deployment:
            await self._admit(spec)
            deployment = await self.services.store.create_deployment(spec)
            await self.ops.event(spec.id, "created", data={"repo": spec.repo, "ref": spec.ref})
            return deployment

        return await self._operate(spec.id, "deploy", admit, self._deploy)

    async def redeploy(self, deployment_id: str, changes: dict[str, Any]) -> Deployment:
        """Apply ``changes`` to the spec (new ref, args, ...) and deploy into the idle slot.

        The new spec is validated and stored only once this request holds the deployment:
        a redeploy refused with Conflict stores nothing and records no event."""
        await self.get(deployment_id)

        async def admit() -> Deployment:
            from dockyard.core.models import decode_spec

            current = await self.get(deployment_id)
            raw = msgspec.to_builtins(current.spec)
            raw.update(changes)
            spec = decode_spec(raw)
            await self._admit(spec)
            deployment = await self.services.store.update_deployment(spec)
            await self.ops.event(
                deployment_id,
                "redeploy_requested",
                data={
                    "changed": sorted(changes),
                    "generation": deployment.generation,
                    "ref": spec.ref,
                },
            )
            return deployment

        return await self._operate(deployment_id, "redeploy", admit, self._deploy)

    async def switch(self, deployment_id: str) -> Deployment:
        """Promote the other slot (manual rollback)."""
        await self.get(deployment_id)
        return await self._operate(
            deployment_id, "switch", lambda: self.get(deployment_id), self._switch
        )

    async def delete(self, deployment_id: str, *, missing_ok: bool = False) -> None:
        """Cancel what runs, remove every container, route, port lease and record.

        The intent is recorded first (``delete_requested``): a restart finishes the delete.
        From the moment a delete starts, new operations on the deployment get Conflict and
        an operation admitted meanwhile ends before it touches anything. A second delete
        meanwhile waits for the first, then finds nothing (NotFound). With ``missing_ok``
        an id with no record is no error: what a lost record left behind under that id
        (containers, port leases, a route) is removed instead."""
        try:
            await self._delete(deployment_id)
        except NotFound:
            if not missing_ok:
                raise
            async with self._lock(deployment_id):
                await self._remove_leftovers(deployment_id)
            self._locks.pop(deployment_id, None)

    async def _delete(self, deployment_id: str) -> None:
        await self.get(deployment_id)
        while (running := self._deleting.get(deployment_id)) is not None:
            await running.wait()
        await self.get(deployment_id)
        done = self._deleting[deployment_id] = asyncio.Event()
        try:
            # The intent first: a restart finishes the delete.
            await self.ops.event(deployment_id, "delete_requested")
            op = self._operations.get(deployment_id)
            if op and op.running:
                op.task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(op.task), timeout=60)
            self._cancel_timers(deployment_id)
            async with self._lock(deployment_id):
                await self._remove_everything(deployment_id)
            self._cancel_timers(deployment_id)
            self._operations.pop(deployment_id, None)
            self._locks.pop(deployment_id, None)
        finally:
            del self._deleting[deployment_id]
            done.set()

    async def wait(self, deployment_id: str, timeout_s: float) -> bool:
        """Wait (bounded) for the current operation; True when it has finished."""
        op = self._operations.get(deployment_id)
        if op is None or not op.running:
            return True
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(op.task), timeout=timeout_s)
        return not op.running

    # -- internals -----------------------------------------------------------------------
    async def _admit(self, spec: DeploymentSpec) -> None:
        """Refuse early what would fail anyway: the operator's caps, policies, and a URL no
        source accepts."""
        check_caps(spec, self.services.settings)
        await check_spec(self.services.pm, spec)
        source = self.ops.source_for(spec.repo)
        validate = getattr(source, "validate", None)
        if validate is not None:
            validate(spec.repo, spec.ref)

    def _ensure_idle(self, deployment_id: str) -> None:
        """Refuse (Conflict) while an operation runs, is being admitted, or a delete runs."""
        if deployment_id in self._deleting:
            raise Conflict(f"deployment {deployment_id!r} is being deleted", operation="delete")
        kind = self._admitting.get(deployment_id)
        op = self._operations.get(deployment_id)
        if kind is None and op and op.running:
            kind = op.kind
        if kind is not None:
            raise Conflict(
                f"deployment {deployment_id!r} is busy: a {kind} is in progress",
                operation=kind,
            )

    def _cancel_timers(self, deployment_id: str) -> None:
        for color in Color:
            timer = self._timers.pop((deployment_id, color), None)
            if timer:
                timer[0].cancel()

    async def _operate(
        self,
        deployment_id: str,
        kind: str,
        admit: Callable[[], Awaitable[T]],
        body: Callable[[str], Awaitable[None]],
    ) -> T:
        """Admit one operation: take the deployment's lock, run ``admit`` (validate, store
        the spec, record the request), then start ``body`` in a task that inherits the lock.

        A second request meanwhile gets Conflict at once (it never waits behind this one);
        the lock may briefly be held by a drain ending or a health round, which this waits
        for. When ``admit`` raises, nothing was started and the lock is released."""
        self._ensure_idle(deployment_id)
        self._admitting[deployment_id] = kind
        try:
            new_lock = deployment_id not in self._locks
            lock = self._lock(deployment_id)
            await lock.acquire()
            handed_over = False
            try:
                if deployment_id in self._deleting:
                    raise Conflict(
                        f"deployment {deployment_id!r} is being deleted", operation="delete"
                    )
                result = await admit()
                self._start(deployment_id, kind, body, held=lock)
                handed_over = True
                return result
            finally:
                if not handed_over:
                    lock.release()
                    if new_lock and deployment_id not in self._operations:
                        await self._forget_lock(deployment_id)
        finally:
            self._admitting.pop(deployment_id, None)

    async def _forget_lock(self, deployment_id: str) -> None:
        """Drop the lock of an id that no deployment has (a refused create): nothing else
        can be waiting on it, and refused requests must not grow the table."""
        with contextlib.suppress(DockyardError):
            if await self.services.store.get_deployment(deployment_id) is None:
                self._locks.pop(deployment_id, None)

    def _start(
        self,
        deployment_id: str,
        kind: str,
        body: Callable[[str], Awaitable[None]],
        *,
        held: asyncio.Lock | None = None,
    ) -> Operation:
        """Run ``body`` as the deployment's operation, under its lock: ``held`` is the lock
        the caller holds already (released when the task ends, however it ends), else the
        task takes it."""
        lock = held or self._lock(deployment_id)

        async def guarded() -> None:
            try:
                if deployment_id in self._deleting:
                    op.error = {
                        "reason": "cancelled",
                        "message": f"{kind} was cancelled: the deployment is being deleted",
                    }
                    return
                await body(deployment_id)
            except DockyardError as exc:
                op.error = exc.to_dict()
                log.info("%s of %s failed: %s", kind, deployment_id, exc.message)
            except asyncio.CancelledError:
                op.error = {"reason": "cancelled", "message": f"{kind} was cancelled"}
                raise
            except Exception as exc:
                op.error = {"reason": "internal_error", "message": str(exc)}
                log.exception("%s of %s crashed", kind, deployment_id)
            finally:
                op.finished_at = now()
                with contextlib.suppress(Exception):
                    await self._schedule_drains(deployment_id)

        async def run() -> None:
            bind_log_ids(deployment_id=deployment_id)
            if held is not None:
                await guarded()
                return
            async with lock:
                await guarded()

        task = asyncio.create_task(run(), name=f"{kind}:{deployment_id}")
        if held is not None:
            # A task cancelled before its first step never runs its body: release here.
            task.add_done_callback(lambda _: held.release())
        op = Operation(kind=kind, started_at=now(), task=task)
        self._operations[deployment_id] = op
        return op

    async def _deploy(self, deployment_id: str) -> None:
        await self.strategy.deploy(self.ops, await self.get(deployment_id))

    async def _switch(self, deployment_id: str) -> None:
        await self.strategy.switch(self.ops, await self.get(deployment_id))

    async def _remove_everything(self, deployment_id: str) -> None:
        # The route first, so no client is sent to a container being removed; a proxy that
        # cannot be reached now loses the route later (check_routes removes stale ones).
        try:
            await self.services.router.remove(deployment_id)
        except DockyardError as exc:
            log.warning("removing the route of %s failed: %s", deployment_id, exc.message)
        for slot in await self.services.store.list_slots(deployment_id):
            with contextlib.suppress(DockyardError):
                await self.ops.clear(slot)
        leftovers = await self.services.runtime.list(
            self.services.labels(**{LABEL_DEPLOYMENT: deployment_id})
        )
        for info in leftovers:
            await self.services.runtime.remove(info.id)
        await self.services.store.delete_deployment(deployment_id)
        self.ops.facts.pop(deployment_id, None)
        shutil.rmtree(self.ops.build_log_path(deployment_id, Color.BLUE).parent, ignore_errors=True)

    async def _remove_leftovers(self, deployment_id: str) -> None:
        """What an id with no record may still hold: its route, containers labelled with
        it, port leases it owns."""
        await self.services.router.remove(deployment_id)
        runtime, store = self.services.runtime, self.services.store
        for info in await runtime.list(self.services.labels(**{LABEL_DEPLOYMENT: deployment_id})):
            await runtime.remove(info.id)
        for port, owner in (await store.list_leases()).items():
            if owner == deployment_id or owner.startswith(f"{deployment_id}:"):
                await store.release_port(port)
        self.ops.facts.pop(deployment_id, None)

    async def remove_labelled(self, label: str, keep: set[str]) -> list[str]:
        """Delete every deployment whose spec carries ``label``, and remove every container
        carrying it, except those of the deployment ids in ``keep`` (a flow reaping what a
        previous process left). Returns the deployment ids removed."""
        removed = []
        for deployment in await self.services.store.list_deployments():
            if label in deployment.spec.labels and deployment.id not in keep:
                await self.delete(deployment.id, missing_ok=True)
                removed.append(deployment.id)
        runtime = self.services.runtime
        for info in await runtime.list(self.services.labels()):
            owner = info.labels.get(LABEL_DEPLOYMENT, "")
            if label in info.labels and owner not in keep:
                log.info("reaping container %s (%s)", info.name, label)
                await runtime.remove(info.id)
        return removed

    async def remove_image(self, ref: str) -> None:
        """Remove an image a deployment no longer needs (a no-op when it is gone)."""
        await self.services.runtime.remove_image(ref)

    # -- drains --------------------------------------------------------------------------
    async def _schedule_drains(self, deployment_id: str) -> None:
        """Give every DRAINING slot a timer that retires it when its grace period ends.

        A timer belongs to one DRAINING move (identified by the slot's ``updated_at``): a
        slot promoted again and drained anew gets a new timer, and the stale one is dropped.
        """
        deployment = await self.services.store.get_deployment(deployment_id)
        if deployment is None or deployment_id in self._deleting:
            return
        for slot in await self.services.store.list_slots(deployment_id):
            key = (deployment_id, slot.color)
            if slot.state is not S.DRAINING:
                continue
            current = self._timers.get(key)
            if current is not None and not current[0].done():
                if current[1] == slot.updated_at:
                    continue
                current[0].cancel()
            until = self.ops.drain_deadline(slot, deployment.spec.grace_period_s)
            delay = max(0.0, until - time.time())
            task = asyncio.create_task(
                self._retire_after(deployment_id, slot.color, slot.updated_at, delay),
                name=f"drain:{deployment_id}:{slot.color}",
            )
            self._timers[key] = (task, slot.updated_at)

    async def _retire_after(
        self, deployment_id: str, color: Color, drained_at: float, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        async with self._lock(deployment_id):
            try:
                slot = await self.services.store.get_slot(deployment_id, color)
            except NotFound:
                return
            if slot.state is S.DRAINING and slot.updated_at == drained_at:
                await self.ops.retire_drained(slot)

    # -- monitor -------------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(self.monitor_interval_s)
                try:
                    await self.check_promoted(session)
                except Exception:
                    log.exception("health monitor round failed")

    async def check_promoted(self, session: aiohttp.ClientSession) -> None:
        """Probe every promoted slot once; act on a slot that stays unhealthy."""
        for deployment in await self.services.store.list_deployments():
            lock = self._lock(deployment.id)
            if lock.locked():
                continue  # an operation is changing it
            async with lock:
                await self._watch_containers(deployment)
                await self._check_one(session, deployment)

    async def _watch_containers(self, deployment: Deployment) -> None:
        """End running slots whose container outlived its lifetime (``lifetime_exceeded``),
        or died while no health action will replace it (``container_oom`` when the engine
        says so, else ``container_exited``)."""
        lifetime = effective_lifetime(deployment.spec, self.services.settings)
        action = deployment.spec.health.on_failure
        for slot in await self.services.store.list_slots(deployment.id):
            if slot.state not in (S.HEALTHY, S.PROMOTED, S.DRAINING) or not slot.container_name:
                continue
            try:
                info = await self.services.runtime.inspect(slot.container_name)
            except DockyardError as exc:  # e.g. removed meanwhile; the next round sees
                log.warning("watching %s failed: %s", slot.container_name, exc.message)
                continue
            if info is None or not info.running:
                if slot.state is S.PROMOTED and action != "none":
                    continue  # the probes fail and on_failure replaces it
                reason, message = _death(info)
                await self.ops.fail(slot, reason, message)
            elif lifetime and info.started_at and time.time() - info.started_at > lifetime:
                await self.ops.fail(
                    slot,
                    "lifetime_exceeded",
                    f"the container ran longer than its maximum lifetime of {lifetime:g} s",
                )

    async def _check_one(self, session: aiohttp.ClientSession, deployment: Deployment) -> None:
        spec = deployment.spec
        for slot in await self.services.store.list_slots(deployment.id):
            if slot.state is not S.PROMOTED or slot.host_port is None:
                continue
            url = f"http://127.0.0.1:{slot.host_port}{spec.health.path}"
            result = await probe_once(session, url, spec.health.timeout_s)
            failures = 0 if result.ok else slot.health.consecutive_failures + 1
            health = SlotHealth(
                status="healthy" if result.ok else "unhealthy",
                last_latency_ms=result.latency_ms,
                consecutive_failures=failures,
                checked_at=now(),
            )
            slot = await self.services.store.save_slot(
                msgspec.structs.replace(slot, health=health), None
            )
            if result.ok or failures != spec.health.failure_threshold:
                continue
            await self.ops.event(
                deployment.id,
                "promoted_unhealthy",
                color=slot.color,
                message=result.error or f"HTTP {result.status}",
                data={"action": spec.health.on_failure, "failures": failures},
            )
            if spec.health.on_failure == "rollback":
                try:
                    await self.strategy.switch(self.ops, deployment)
                except DockyardError as exc:
                    await self.ops.event(deployment.id, "rollback_failed", message=exc.message)
            elif spec.health.on_failure == "restart":
                await self._restart(deployment, slot)

    async def _restart(self, deployment: Deployment, slot: Any) -> None:
        revision = await self.services.store.get_revision(slot.revision_id or "")
        if revision is None or revision.spec is None:
            return
        spec = msgspec.structs.replace(revision.spec, ref=revision.commit)
        _, built = await self.ops.build(slot, spec)
        await self.ops.start_container(slot, spec, revision, built)
        await self.ops.event(deployment.id, "restarted", color=slot.color)

    # -- router watch --------------------------------------------------------------------
    async def _router_loop(self) -> None:
        while True:
            await asyncio.sleep(self.router_watch_interval_s)
            try:
                await self.check_routes()
            except Exception:
                log.exception("router watch round failed")

    async def _every_slot(self) -> dict[str, list[Any]]:
        """Every deployment's slots, a status page (a fixed few reads) at a time, not one
        read per deployment: a round over 1000 deployments would otherwise hold the store
        for 1000 round trips every ``router_watch_interval_s``. Pages of the API's default
        size, so the first is the one a status screen polls (the store keeps it)."""
        found: dict[str, list[Any]] = {}
        cursor = None
        while True:
            page = await self.services.store.list_status(after=cursor, limit=ROUTE_CHECK_PAGE)
            found.update((d.id, d.slots) for d in page.deployments)
            if page.cursor is None:
                return found
            cursor = page.cursor

    def _expected_route(self, deployment: Deployment, slots: list[Any]) -> Route | None:
        promoted = next((s for s in slots if s.state is S.PROMOTED and s.host_port), None)
        return self.ops.route(deployment, promoted) if promoted else None

    async def check_routes(self) -> list[str]:
        """Make the proxy serve what the state says: start a proxy we run that died,
        re-apply (and verify) the route of every promoted slot the proxy lost or holds
        differently, remove routes of deployments that no longer exist. Each deployment
        is fixed under its lock; one with an operation running is left to it. Returns the
        deployment ids whose route was restored.
        """
        router, store = self.services.router, self.services.store
        if await router.revive():
            log.warning("router %s: the proxy had stopped; started it again", router.name)
        served = await router.served()
        if served is None:
            if self._router_ok:
                log.warning("router %s does not answer; routes cannot be checked", router.name)
            self._router_ok = False
            return []
        self._router_ok = True
        restored = []
        deployments = {d.id: d for d in await store.list_deployments()}
        slots = await self._every_slot()
        for deployment in deployments.values():
            expected = self._expected_route(deployment, slots.get(deployment.id, []))
            if expected is None or served.get(deployment.id) == expected.token:
                continue
            lock = self._lock(deployment.id)
            if lock.locked():
                continue  # an operation is changing it
            async with lock:
                fresh = await store.get_deployment(deployment.id)
                if fresh is None:
                    continue
                route = self._expected_route(fresh, await store.list_slots(fresh.id))
                if route is None:
                    continue
                await router.apply(route)
                verified = await router.verify(route, timeout_s=SWITCH_TIMEOUT_S)
                await self.ops.event(
                    deployment.id,
                    "route_restored",
                    data={"router": router.name, "port": route.upstream.port, "verified": verified},
                )
                restored.append(deployment.id)
        for deployment_id in set(served) - set(deployments):
            lock = self._lock(deployment_id)
            if lock.locked():
                continue
            async with lock:
                if await store.get_deployment(deployment_id) is None:
                    log.info("removing the route of unknown deployment %s", deployment_id)
                    await router.remove(deployment_id)
            self._locks.pop(deployment_id, None)
        return restored

    # -- resume --------------------------------------------------------------------------
    async def resume(self) -> None:
        """Make the stored state true again after a (re)start, and finish or close every
        intent a previous process recorded but did not carry out.

        Slots caught mid-operation (BUILDING, STAGING) end FAILED with ``controller_restarted``
        and their container and port are removed; promoted and healthy slots whose container
        is gone end FAILED; draining slots get their drain timer back; routes of promoted
        slots are restored and routes of deployments with nothing promoted removed;
        containers and leases that no slot accounts for are reaped. Then the intents: a
        delete requested (``delete_requested``) is finished; a deployment whose stored
        generation never reached a slot (``created`` or ``redeploy_requested``, killed
        before its build began) is deployed; a HEALTHY slot of an ``auto_promote`` revision
        that was never promoted is promoted. Each resumed intent gets an
        ``operation_resumed`` event (reason ``controller_restarted``).
        """
        store, runtime = self.services.store, self.services.runtime
        known: set[str] = set()
        owners: dict[int, str] = {}
        routes = []
        pending: list[tuple[str, str, Callable[[str], Awaitable[None]], dict[str, Any]]] = []
        for deployment in await store.list_deployments():
            intents = await self._recorded_intents(deployment.id)
            if intents["delete_requested"]:
                log.info("finishing the delete of %s cut short by a restart", deployment.id)
                await self._remove_everything(deployment.id)
                continue
            unpromoted: Any = None
            for slot in await store.list_slots(deployment.id):
                if slot.state in (S.BUILDING, S.STAGING):
                    await self.ops.fail(
                        slot,
                        "controller_restarted",
                        "the controller restarted during this operation",
                    )
                    continue
                if slot.state in (S.HEALTHY, S.PROMOTED, S.DRAINING):
                    info = await runtime.inspect(slot.container_name or "")
                    if info is None or not info.running:
                        await self.ops.fail(
                            slot, "container_gone", "the container is no longer running"
                        )
                        continue
                    known.add(container_name(deployment.id, slot.color))
                    if slot.host_port:
                        owners[slot.host_port] = lease_owner(deployment.id, slot.color)
                    if slot.state is S.PROMOTED:
                        routes.append(self.ops.route(deployment, slot))
                    if slot.state is S.HEALTHY and await self._meant_to_promote(slot):
                        unpromoted = slot
            await self._schedule_drains(deployment.id)
            if deployment.generation > intents["built_generation"]:
                kind = "deploy" if intents["built_generation"] == 0 else "redeploy"
                data = {"generation": deployment.generation}
                pending.append((deployment.id, kind, self._deploy, data))
            elif unpromoted is not None:
                color = unpromoted.color
                pending.append(
                    (
                        deployment.id,
                        "promote",
                        lambda d, c=color: self._resume_promote(d, c),
                        {"color": str(color)},
                    )
                )
        for info in await runtime.list(self.services.labels()):
            expected = container_name(
                info.labels.get(LABEL_DEPLOYMENT, ""), info.labels.get(LABEL_COLOR, "")
            )  # type: ignore[arg-type]
            if info.name not in known or info.name != expected:
                log.info("reaping orphaned container %s", info.name)
                await runtime.remove(info.id)
        for port, owner in (await store.list_leases()).items():
            if owners.get(port) != owner:
                await store.release_port(port)
        router = self.services.router
        await router.restore(routes)
        served = await router.served() or {}
        for deployment_id in set(served) - {route.deployment_id for route in routes}:
            log.info("removing the route of %s: nothing of it is promoted", deployment_id)
            await router.remove(deployment_id)
        for deployment_id, kind, body, data in pending:
            await self.ops.event(
                deployment_id,
                "operation_resumed",
                reason="controller_restarted",
                message=f"the {kind} a previous dockyard recorded is carried out now",
                data={"operation": kind, **data},
            )
            self._start(deployment_id, kind, body)

    async def _recorded_intents(self, deployment_id: str) -> dict[str, Any]:
        """What a deployment's history says was asked for: the newest generation a slot
        started building (0: none) and whether a delete was requested."""
        built, delete_requested, after = 0, False, 0
        while True:
            events = await self.services.store.list_events(deployment_id, after=after)
            if not events:
                break
            for event in events:
                if event.kind == "delete_requested":
                    delete_requested = True
                elif event.kind == "slot_transition" and event.to_state is S.BUILDING:
                    built = max(built, int(event.data.get("generation") or 0))
            after = events[-1].seq or after
            if len(events) < 1000 or not events[-1].seq:
                break
        return {"built_generation": built, "delete_requested": delete_requested}

    async def _meant_to_promote(self, slot: Any) -> bool:
        """Whether a HEALTHY slot waits for a promotion a restart cut short: its revision
        was deployed with ``auto_promote``."""
        revision = await self.services.store.get_revision(slot.revision_id or "")
        return bool(revision and revision.spec and revision.spec.auto_promote)

    async def _resume_promote(self, deployment_id: str, color: Color) -> None:
        """Promote a HEALTHY slot whose promotion a restart cut short; when that fails the
        slot ends FAILED (the promoted one, if any, keeps serving)."""
        deployment = await self.get(deployment_id)
        slot = await self.services.store.get_slot(deployment_id, color)
        if slot.state is not S.HEALTHY:
            return
        try:
            await self.ops.promote(deployment, slot)
        except DockyardError as exc:
            await self.ops.fail(slot, exc.reason, exc.message)
            raise


def _death(info: Any) -> tuple[str, str]:
    """Reason and message for a container that stopped on its own (or vanished)."""
    if info is None:
        return "container_gone", "the container is no longer there"
    if info.oom_killed:
        return "container_oom", (
            f"the engine killed the container at its memory limit (exit code {info.exit_code})"
        )
    message = f"the container exited with code {info.exit_code}"
    if info.exit_code == 137:
        message += (
            " (SIGKILL, not sent by dockyard: usually the kernel's OOM killer at the memory "
            "limit; the engine did not report OOMKilled)"
        )
    return "container_exited", message
