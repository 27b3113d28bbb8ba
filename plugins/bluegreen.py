"""The blue/green strategy: build into the idle slot, probe, promote, drain the old one.

A deploy puts the new revision in the slot that is not promoted, leases a port, starts the
container and probes it; when healthy (and ``auto_promote``) the route switches to it in one
verified write and the previously promoted slot drains for ``grace_period_s`` before its
container is removed. A revision that never gets healthy ends FAILED and is removed while
the promoted slot keeps serving. ``switch`` promotes the other slot: at once when it still
runs (healthy or draining), or by restarting its retained revision when it was retired.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from dockyard.core.errors import Conflict, DockyardError
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Color, Deployment, DeploymentSpec, Slot, SlotState
from dockyard.core.strategy import Strategy

S = SlotState


class BlueGreen(Strategy):
    """Two slots, one promoted; switches are health-gated."""

    name = "bluegreen"

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings

    @staticmethod
    def idle_color(slots: dict[Color, Slot]) -> Color:
        """The slot a new revision goes to: the one not promoted (blue when neither is)."""
        if slots[Color.BLUE].state is S.PROMOTED:
            return Color.GREEN
        if slots[Color.GREEN].state is S.PROMOTED:
            return Color.BLUE
        # Neither promoted: reuse the slot that is not holding a live container if possible.
        for color in (Color.BLUE, Color.GREEN):
            if slots[color].state in (S.IDLE, S.RETIRED, S.FAILED):
                return color
        return Color.BLUE

    async def deploy(self, ops: Any, deployment: Deployment) -> None:
        slots = await ops.slots(deployment.id)
        slot = await ops.reset(slots[self.idle_color(slots)])
        await self._roll_out(ops, deployment, slot, deployment.spec)

    async def _roll_out(
        self, ops: Any, deployment: Deployment, slot: Slot, spec: DeploymentSpec
    ) -> None:
        slot = await ops.move(
            slot, S.BUILDING, revision_id=None, data={"generation": deployment.generation}
        )
        try:
            revision, built = await ops.build(slot, spec)
            slot = await ops.stage(slot, spec, revision, built)
            outcome = await ops.wait_healthy(slot, spec)
            if not outcome.healthy:
                await ops.fail(slot, "health_check_failed", outcome.reason or "not healthy")
                return
            slot = await ops.move(slot, S.HEALTHY, data={"probes": outcome.probes})
            if spec.auto_promote:
                await ops.promote(deployment, slot)
        except DockyardError as exc:
            # A failed build's refused hosts (build proxy) stay with the FAILED event.
            refused = exc.detail.get("build_refused")
            data = {"build_refused": list(refused)} if refused is not None else None
            await ops.fail(slot, exc.reason, exc.message, data=data)
            raise
        except BaseException as exc:  # cancelled, or a bug: never leave a slot half-made
            await ops.fail(
                slot,
                getattr(ops, "cancel_reason", "cancelled") if _cancelled(exc) else "internal_error",
                str(exc) or type(exc).__name__,
            )
            raise

    async def switch(self, ops: Any, deployment: Deployment) -> None:
        slots = await ops.slots(deployment.id)
        promoted = next((s for s in slots.values() if s.state is S.PROMOTED), None)
        other = slots[promoted.color.other] if promoted else None
        if other is None:
            candidates = [s for s in slots.values() if s.state in (S.HEALTHY, S.DRAINING)]
            other = (
                candidates[0]
                if candidates
                else next(
                    (s for s in slots.values() if s.state is S.RETIRED and s.revision_id), None
                )
            )
        if other is None:
            raise Conflict(f"deployment {deployment.id} has no other revision to switch to")
        if other.state in (S.HEALTHY, S.DRAINING):
            await ops.promote(deployment, other)
            return
        if other.state is S.RETIRED and other.revision_id:
            revision = await ops.store.get_revision(other.revision_id)
            if revision is None or revision.spec is None:
                raise Conflict(f"the {other.color} slot has no revision to restart; redeploy")
            # The same commit and inputs: the source comes from the cache, the image is reused.
            spec = msgspec.structs.replace(revision.spec, ref=revision.commit, auto_promote=True)
            slot = await ops.reset(other)
            await self._roll_out(ops, deployment, slot, spec)
            return
        raise Conflict(f"the {other.color} slot is {other.state}; nothing to switch to")


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)


@hookimpl
def dockyard_register_strategies(register: Any) -> None:
    register("bluegreen", BlueGreen)
