"""Slot operations: the primitives a deploy strategy composes.

Each primitive records its intent in the store (a slot transition with its event) BEFORE the
side effect it announces, so a restarted controller knows what may have happened and can
resume or roll back (``Controller.resume``). Nothing here is engine-specific: containers go
through the Runtime contract, routes through the Router contract.

A draining slot keeps serving the requests it has until its grace period ends; nothing here
retires it earlier (a deploy that needs the slot waits for it: ``end_drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.core.builds import BuiltRevision
from dockyard.core.errors import Conflict, DockyardError, NotFound, PortPoolExhausted, SourceError
from dockyard.core.health import HealthOutcome, wait_healthy
from dockyard.core.models import (
    Color,
    Deployment,
    DeploymentSpec,
    Event,
    Revision,
    Slot,
    SlotState,
)
from dockyard.core.plugins import emit_event
from dockyard.core.policy import effective_limits, effective_scratch, network_policy
from dockyard.core.router import Route, Upstream, route_prefix
from dockyard.core.runtime import (
    GATEWAY_ENV,
    LABEL_COLOR,
    LABEL_DEPLOYMENT,
    LABEL_REVISION,
    ContainerSpec,
    Limits,
)
from dockyard.core.services import Services
from dockyard.core.source import FetchedSource, Source, SourceRequest
from dockyard.core.states import transition
from dockyard.core.views import BuildFacts

log = logging.getLogger(__name__)

S = SlotState
#: Build log lines kept per slot (its latest build).
BUILD_LOG_LINES = 2000
#: How long a switch may take to show through the proxy before it is rolled back.
SWITCH_TIMEOUT_S = 10.0
#: The longest a deploy waits for a draining slot (the longest grace period a spec may ask).
MAX_DRAIN_WAIT_S = 3600.0


def container_name(deployment_id: str, color: Color) -> str:
    """Deterministic container name of a slot."""
    return f"dockyard-{deployment_id}-{color}"


def lease_owner(deployment_id: str, color: Color) -> str:
    """Owner string of a slot's host-port lease (``<deployment>:<color>``)."""
    return f"{deployment_id}:{color}"


@dataclass(frozen=True)
class DrainWait:
    """An operation waiting for a draining slot's grace period to end before using it."""

    color: Color
    since: float
    until: float


class SlotOps:
    """Intent-first operations on one controller's deployments."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.store = services.store
        self.runtime = services.runtime
        #: When each drain ends: (deployment, colour) -> (the DRAINING move's time, deadline).
        self.drains: dict[tuple[str, Color], tuple[float, float]] = {}
        #: Operations waiting for a drain to end, by deployment (shown in the API).
        self.waiting: dict[str, DrainWait] = {}
        #: What each deployment's latest build resolved (commit, image), by deployment.
        self.facts: dict[str, BuildFacts] = {}
        #: The reason a cancelled operation's slot fails with (``controller_stopped`` once
        #: the controller stops).
        self.cancel_reason = "cancelled"

    # -- records -------------------------------------------------------------------------
    async def event(self, deployment_id: str, kind: str, **fields: Any) -> Event:
        """Append an event that is not a slot transition, and tell the observers."""
        stored = await self.store.append_event(
            Event(deployment_id=deployment_id, kind=kind, **fields)
        )
        await emit_event(self.services.pm, stored)
        return stored

    async def move(
        self,
        slot: Slot,
        to: SlotState,
        *,
        reason: str | None = None,
        message: str | None = None,
        data: dict[str, Any] | None = None,
        **changes: Any,
    ) -> Slot:
        """Transition ``slot`` (legal moves only), store it with its event, notify."""
        new, event = self._move_record(
            slot, to, reason=reason, message=message, data=data, **changes
        )
        saved = await self.store.save_slot(new, event)
        await emit_event(self.services.pm, event)
        return saved

    async def slots(self, deployment_id: str) -> dict[Color, Slot]:
        """Both slots; NotFound when the deployment is gone (deleted meanwhile)."""
        slots = {s.color: s for s in await self.store.list_slots(deployment_id)}
        if len(slots) != len(Color):
            raise NotFound(f"deployment {deployment_id!r} does not exist")
        return slots

    # -- source and image ----------------------------------------------------------------
    def source_for(self, url: str) -> Source:
        for source in self.services.sources.values():
            if source.accepts(url):
                return source
        raise SourceError(f"repo: no source plugin accepts {url!r}", reason="invalid_repo_url")

    async def fetch(self, spec: DeploymentSpec) -> FetchedSource:
        request = SourceRequest(
            repo=spec.repo,
            ref=spec.ref,
            subdir=spec.subdir,
            dockerfile=spec.dockerfile if spec.build_mode == "dockerfile" else None,
        )
        return await self.source_for(spec.repo).fetch(request)

    def build_log_path(self, deployment_id: str, color: Color) -> Path:
        """The log of the latest build in a slot, kept whether the build worked or not."""
        return self.services.settings.data_path / "builds" / deployment_id / f"{color}.log"

    async def build(self, slot: Slot, spec: DeploymentSpec) -> tuple[Revision, BuiltRevision]:
        """Fetch and build ``spec`` for a slot in BUILDING; store the revision.

        A source refused after its commit was known (``dockerfile_not_found``, a symlink
        leaving the checkout, ...) still records that commit: event ``source_refused``.
        """
        self.facts.pop(spec.id, None)
        try:
            source = await self.fetch(spec)
        except SourceError as exc:
            commit = exc.detail.get("commit")
            if isinstance(commit, str) and commit:
                self.facts[spec.id] = BuildFacts(commit=commit)
                await self.event(
                    spec.id,
                    "source_refused",
                    color=slot.color,
                    reason=exc.reason,
                    message=exc.message,
                    data={"commit": commit},
                )
            raise
        facts = self.facts[spec.id] = BuildFacts(
            commit=source.commit, resolved_ref=source.resolved_ref
        )
        await self.event(
            spec.id,
            "source_fetched",
            color=slot.color,
            data={
                "commit": source.commit,
                "ref": source.resolved_ref,
                "cached": source.cached,
                "files": source.files,
                "bytes": source.bytes_received,
            },
        )
        lines: deque[str] = deque(maxlen=BUILD_LOG_LINES)
        path = self.build_log_path(spec.id, slot.color)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            built = await self.services.builder.build(spec, source, on_log=lines.append)
            if not lines:
                lines.extend(built.log[-BUILD_LOG_LINES:])
        except DockyardError as exc:
            if not lines:
                lines.extend(str(line) for line in exc.detail.get("log_tail", []))
            lines.append(f"dockyard: {exc.reason}: {exc.message}")
            raise
        finally:
            path.write_text("\n".join(lines) + ("\n" if lines else ""))
        revision = Revision(
            id=f"{spec.id}-{source.commit[:12]}-{built.inputs_hash[:8]}",
            deployment_id=spec.id,
            repo=source.repo,
            commit=source.commit,
            ref=spec.ref,
            subdir=spec.subdir,
            dockerfile=spec.dockerfile,
            build_mode=spec.build_mode,
            build_args_hash=built.build_args_hash,
            image_id=built.image_id,
            image_tag=built.image,
            provenance={
                "resolved_ref": source.resolved_ref or "",
                "inputs": built.inputs_hash,
                "reused_image": str(built.reused).lower(),
            },
            spec=spec,
        )
        facts.image, facts.image_reused = built.image, built.reused
        facts.revision_id = revision.id
        existing = await self.store.get_revision(revision.id)
        if existing is None:
            with contextlib.suppress(Conflict):
                await self.store.add_revision(revision)
        await self.event(
            spec.id,
            "image_ready",
            color=slot.color,
            data={
                "revision": revision.id,
                "image": built.image,
                "reused": built.reused,
            },
        )
        return revision, built

    # -- containers ----------------------------------------------------------------------
    def limits(self, spec: DeploymentSpec) -> Limits:
        """The spec's resources, lowered to the operator's caps (``core/policy.py``)."""
        return effective_limits(spec, self.services.settings)

    async def stage(
        self, slot: Slot, spec: DeploymentSpec, revision: Revision, built: BuiltRevision | None
    ) -> Slot:
        """BUILDING -> STAGING: lease a port, record it, then start the container."""
        name = container_name(spec.id, slot.color)
        port = await self.lease_bindable_port(lease_owner(spec.id, slot.color))
        try:
            slot = await self.move(
                slot,
                S.STAGING,
                revision_id=revision.id,
                host_port=port,
                container_name=name,
                container_id=None,
            )
        except BaseException:
            await self.store.release_port(port)
            raise
        return await self.start_container(slot, spec, revision, built)

    async def lease_bindable_port(self, owner: str, *, attempts: int = 32) -> int:
        """Lease a port that nothing on the host listens on right now.

        The store never hands a port out twice, but something outside it may still hold
        one: a container just removed whose engine has not let go of its port yet, or
        another program. Such ports are skipped (held while searching, then returned).
        """
        skipped: list[int] = []
        try:
            for _ in range(attempts):
                port = await self.store.lease_port(owner)
                if _bindable(port):
                    return port
                skipped.append(port)
            raise PortPoolExhausted(
                f"no free host port: {len(skipped)} leased ports were busy on the host",
                busy=skipped,
            )
        finally:
            for port in skipped:
                await self.store.release_port(port)

    async def start_container(
        self, slot: Slot, spec: DeploymentSpec, revision: Revision, built: BuiltRevision | None
    ) -> Slot:
        """(Re)start a slot's container on its recorded name and port."""
        assert slot.container_name is not None and slot.host_port is not None
        await self.runtime.remove(slot.container_name)  # a leftover of a crash: ours by name
        mounts = built.mounts if built else []
        command = built.command if built else list(spec.command)
        settings = self.services.settings
        egress, gateway = network_policy(settings)
        info = await self.runtime.run(
            ContainerSpec(
                name=slot.container_name,
                image=revision.image_tag or "",
                container_port=spec.container_port,
                host_port=slot.host_port,
                command=command,
                mounts=mounts,
                env={"PORT": str(spec.container_port), **spec.env},
                labels={
                    **spec.labels,
                    **self.services.labels(
                        **{
                            LABEL_DEPLOYMENT: spec.id,
                            LABEL_COLOR: str(slot.color),
                            LABEL_REVISION: revision.id,
                        }
                    ),
                },
                limits=self.limits(spec),
                egress=egress,
                gateway=gateway,
                gateway_env=dict(spec.gateway_env or {GATEWAY_ENV: ""}),
                tmpfs=effective_scratch(built.tmpfs if built else {}, settings),
                workdir=spec.workdir or (built.workdir if built else None),
            )
        )
        await self._note_unenforced(slot)
        return await self.store.save_slot(_replace(slot, container_id=info.id), None)

    async def _note_unenforced(self, slot: Slot) -> None:
        """Say in the deployment's events when this host cannot hold the container's
        resource limits or network policy (``limits_not_enforced``)."""
        runtime_info = self.services.runtime_info or await self.runtime.info()
        notes = [n for n in (runtime_info.limits_note, runtime_info.egress_note) if n]
        if runtime_info.limits_enforced and runtime_info.egress_enforced:
            return
        await self.event(
            slot.deployment_id,
            "limits_not_enforced",
            color=slot.color,
            message=" ".join(notes) or "this runtime cannot enforce every limit",
            data={
                "resources": runtime_info.limits_enforced,
                "network": runtime_info.egress_enforced,
            },
        )

    async def wait_healthy(self, slot: Slot, spec: DeploymentSpec) -> HealthOutcome:
        """Probe a STAGING slot until healthy or its deadline."""
        assert slot.host_port is not None and slot.container_name is not None
        name = slot.container_name

        async def running() -> bool:
            info = await self.runtime.inspect(name)
            return bool(info and info.running)

        url = f"http://127.0.0.1:{slot.host_port}{spec.health.path}"
        return await wait_healthy(url, spec.health, still_running=running)

    async def clear(self, slot: Slot) -> None:
        """Remove a slot's container and free its port (no state change)."""
        if slot.container_name:
            try:
                await self.runtime.stop(slot.container_name, timeout_s=5)
            finally:
                await self.runtime.remove(slot.container_name)
        if slot.host_port:
            await self.store.release_port(slot.host_port)

    async def fail(
        self, slot: Slot, reason: str, message: str, *, data: dict[str, Any] | None = None
    ) -> Slot:
        """Move a working slot to FAILED, then remove what it ran. ``data`` goes with the
        transition's event (e.g. ``build_refused``: the hosts a build's proxy refused, also
        kept with the build's facts for the deploy's outcome)."""
        facts = self.facts.get(slot.deployment_id)
        if facts is not None and data and data.get("build_refused") is not None:
            facts.build_refused = [str(host) for host in data["build_refused"]]
        current = await self.store.get_slot(slot.deployment_id, slot.color)
        if current.state not in (S.FAILED, S.IDLE, S.RETIRED):
            current = await self.move(current, S.FAILED, reason=reason, message=message, data=data)
        try:
            await self.clear(current)
        except DockyardError as exc:
            log.warning("cleaning %s/%s failed: %s", slot.deployment_id, slot.color, exc)
        return await self.store.save_slot(
            _replace(current, container_id=None, host_port=None), None
        )

    async def retire(self, slot: Slot, *, message: str | None = None) -> Slot:
        """DRAINING or HEALTHY -> RETIRED: remove the container, free the port; the revision
        stays recorded so the slot can be switched back to (its image is kept)."""
        slot = await self.move(slot, S.RETIRED, message=message)
        await self.clear(slot)
        return await self.store.save_slot(_replace(slot, container_id=None, host_port=None), None)

    async def reset(self, slot: Slot) -> Slot:
        """Make a slot usable: RETIRED/FAILED -> IDLE. A draining slot is first left to
        finish its grace period (``end_drain``); an unpromoted healthy one (it serves no
        route) is retired at once."""
        if slot.state is S.DRAINING:
            slot = await self.end_drain(slot)
        if slot.state is S.HEALTHY:
            slot = await self.retire(slot, message="replaced by a new deploy")
        if slot.state in (S.RETIRED, S.FAILED):
            slot = await self.move(slot, S.IDLE, revision_id=slot.revision_id)
        return slot

    # -- drains --------------------------------------------------------------------------
    def drain_deadline(self, slot: Slot, grace_period_s: float) -> float:
        """When a DRAINING slot's grace period ends: as recorded when it started draining,
        else (after a restart) its DRAINING time plus ``grace_period_s``."""
        recorded = self.drains.get((slot.deployment_id, slot.color))
        if recorded is not None and recorded[0] == slot.updated_at:
            return recorded[1]
        return slot.updated_at + grace_period_s

    async def end_drain(self, slot: Slot) -> Slot:
        """Wait (bounded by the grace period, at most an hour) until a DRAINING slot's
        grace period is over, then retire it; return the slot as it is then.

        The wait is recorded as a ``drain_wait`` event and shown on the operation
        (``waiting``) while it lasts. A slot that stopped draining meanwhile is returned
        unchanged."""
        deployment = await self.store.get_deployment(slot.deployment_id)
        if deployment is None:
            raise NotFound(f"deployment {slot.deployment_id!r} does not exist")
        until = self.drain_deadline(slot, deployment.spec.grace_period_s)
        remaining = min(until - time.time(), MAX_DRAIN_WAIT_S)
        if remaining > 0:
            await self.event(
                slot.deployment_id,
                "drain_wait",
                color=slot.color,
                message=f"waiting {remaining:.1f} s for the {slot.color} slot to finish draining",
                data={"seconds": round(remaining, 3), "until": until},
            )
            self.waiting[slot.deployment_id] = DrainWait(
                color=slot.color, since=time.time(), until=until
            )
            try:
                await asyncio.sleep(remaining)
            finally:
                self.waiting.pop(slot.deployment_id, None)
        current = await self.store.get_slot(slot.deployment_id, slot.color)
        if current.state is not S.DRAINING or current.updated_at != slot.updated_at:
            return current
        return await self.retire_drained(current)

    async def retire_drained(self, slot: Slot) -> Slot:
        """Retire a DRAINING slot whose grace period is over (``drain_ended`` says how many
        requests the proxy still had in flight to it, when it can tell)."""
        if slot.host_port:
            router = self.services.router
            inflight = await router.inflight(Upstream(port=slot.host_port))
            await self.event(
                slot.deployment_id,
                "drain_ended",
                color=slot.color,
                data={"inflight": inflight, "router": router.name},
            )
        self.drains.pop((slot.deployment_id, slot.color), None)
        return await self.retire(slot, message="grace period over")

    # -- routing -------------------------------------------------------------------------
    def route(self, deployment: Deployment, slot: Slot) -> Route:
        """The route that serves ``slot``: verified through the proxy on the health path,
        tagged with the slot's colour and revision."""
        assert slot.host_port is not None
        return Route(
            deployment_id=deployment.id,
            prefix=route_prefix(deployment.id),
            upstream=Upstream(port=slot.host_port),
            probe_path=deployment.spec.health.path,
            tag=f"{slot.color}:{slot.revision_id or ''}",
        )

    async def promote(self, deployment: Deployment, target: Slot) -> Slot:
        """Point the route at ``target`` (one write, verified), then record the switch in
        one store transaction: the old promoted slot goes DRAINING as ``target`` goes
        PROMOTED, so exactly one slot is PROMOTED whatever point a crash hits.

        When the proxy does not serve the new upstream in time, the route goes back to the
        promoted slot and the switch fails (``switch_failed``)."""
        router = self.services.router
        route = self.route(deployment, target)
        slots = await self.slots(deployment.id)
        started = time.monotonic()
        await router.apply(route)
        if not await router.verify(route, timeout_s=SWITCH_TIMEOUT_S):
            old = slots[target.color.other]
            if old.state is S.PROMOTED and old.host_port:
                with contextlib.suppress(DockyardError):
                    await router.apply(self.route(deployment, old))
            raise DockyardError(
                f"router {router.name} did not serve the new upstream within "
                f"{SWITCH_TIMEOUT_S:g} s",
                reason="switch_failed",
            )
        switch_ms = round((time.monotonic() - started) * 1000, 1)
        slots = await self.slots(deployment.id)
        old = slots[target.color.other]
        moves = []
        if old.state is S.PROMOTED:
            grace = deployment.spec.grace_period_s
            until = time.time() + grace
            moves.append(
                self._move_record(old, S.DRAINING, data={"grace_period_s": grace, "until": until})
            )
        moves.append(
            self._move_record(
                slots[target.color],
                S.PROMOTED,
                data={
                    "url": router.url_for(deployment.id),
                    "switch_ms": switch_ms,
                    "router": router.name,
                },
            )
        )
        # One transaction: a crash leaves the old slot promoted or the new one, never
        # neither; the route already serves the new one and a restart re-applies the
        # route of whichever the store says.
        saved = await self.store.save_slots(moves)
        if len(saved) == 2:  # the old slot drains until its grace period is over
            self.drains[(deployment.id, old.color)] = (saved[0].updated_at, until)
        for _, event in moves:
            await emit_event(self.services.pm, event)
        return saved[-1]

    @staticmethod
    def _move_record(
        slot: Slot, to: SlotState, *, data: dict[str, Any] | None = None, **changes: Any
    ) -> tuple[Slot, Event]:
        """The slot after a legal move and the event that records it (nothing stored)."""
        new = transition(slot, to, **changes)
        event = Event(
            deployment_id=slot.deployment_id,
            kind="slot_transition",
            color=slot.color,
            from_state=slot.state,
            to_state=to,
            reason=changes.get("reason"),
            message=changes.get("message"),
            data=data or {},
        )
        return new, event


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP listener could bind ``host:port`` now (as engines do, with
    SO_REUSEADDR: connections in TIME_WAIT do not count, a listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _replace(slot: Slot, **changes: Any) -> Slot:
    import msgspec

    return msgspec.structs.replace(slot, **changes)
