"""The slot state machine: the only place that knows which moves are legal.

IDLE -> BUILDING -> STAGING -> HEALTHY -> PROMOTED -> DRAINING -> RETIRED, FAILED (with a
reason) from any working state, a draining slot may be promoted again (rollback inside the
grace period), a healthy slot that is never promoted may retire, and a RETIRED or FAILED slot
returns to IDLE before it is used again.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from dockyard.core.errors import IllegalTransition
from dockyard.core.models import Slot, SlotState, now

S = SlotState

#: Working states: a container is (being) made or runs for the slot.
WORKING: frozenset[SlotState] = frozenset(
    {S.BUILDING, S.STAGING, S.HEALTHY, S.PROMOTED, S.DRAINING}
)

TRANSITIONS: Mapping[SlotState, frozenset[SlotState]] = {
    S.IDLE: frozenset({S.BUILDING}),
    S.BUILDING: frozenset({S.STAGING, S.FAILED}),
    S.STAGING: frozenset({S.HEALTHY, S.FAILED}),
    S.HEALTHY: frozenset({S.PROMOTED, S.RETIRED, S.FAILED}),
    S.PROMOTED: frozenset({S.DRAINING, S.FAILED}),
    S.DRAINING: frozenset({S.RETIRED, S.PROMOTED, S.FAILED}),
    S.RETIRED: frozenset({S.IDLE}),
    S.FAILED: frozenset({S.IDLE}),
}


def is_legal(src: SlotState, dst: SlotState) -> bool:
    """Whether the state machine connects ``src`` to ``dst``."""
    return dst in TRANSITIONS[src]


def transition(
    slot: Slot,
    to: SlotState,
    *,
    reason: str | None = None,
    message: str | None = None,
    **changes: object,
) -> Slot:
    """Return ``slot`` moved to ``to`` with ``changes`` applied, or raise IllegalTransition.

    FAILED needs a reason (a stable code; ``message`` is for people); every other state
    clears the previous reason and message unless given.
    """
    to = SlotState(to)
    if not is_legal(slot.state, to):
        raise IllegalTransition(
            f"slot {slot.deployment_id}/{slot.color} cannot go from {slot.state} to {to}",
            src=str(slot.state),
            dst=str(to),
        )
    if to is S.FAILED and not reason:
        raise IllegalTransition("a move to FAILED needs a reason")
    return msgspec.structs.replace(
        slot, state=to, reason=reason, message=message, updated_at=now(), **changes
    )
