"""What the controller answers: a deployment as callers render it, and the outcome of a
deploy, so nothing outside ``core/`` reads the store, the event log or private tasks to
learn a result.

- :class:`DeployOutcome`: what a deploy (create, redeploy, switch) came to: the URL of the
  promoted slot, the commit and image it built, or why it failed;
- :class:`DeploymentState`: a deployment with its slots (and their commits), the promoted
  slot's URL and the current operation, for the API and the status page;
- :func:`promoted_url`: the one place that knows what "the promoted slot's URL" is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dockyard.core.models import Color, Deployment, Slot, SlotState

if TYPE_CHECKING:
    from dockyard.core.router import Router


def promoted_url(router: Router, deployment_id: str, promoted: Slot | None) -> str | None:
    """Where clients reach a deployment: its route on the proxy, else the promoted slot's
    loopback port; None while nothing is promoted."""
    if promoted is None or promoted.state is not SlotState.PROMOTED:
        return None
    return router.url_for(deployment_id) or (
        f"http://127.0.0.1:{promoted.host_port}" if promoted.host_port else None
    )


@dataclass
class BuildFacts:
    """What the latest build of a deployment resolved: kept from the fetch on (a source
    refused after its commit was known still records it) until the deployment is deleted."""

    commit: str | None = None
    resolved_ref: str | None = None
    image: str | None = None
    image_reused: bool = False
    revision_id: str | None = None
    #: ``host:port`` a failed build's proxy refused (its summary, as data).
    build_refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeployOutcome:
    """What a deploy came to, once its operation ended.

    ``ok``: the operation ended without error and a slot is promoted, reachable at
    ``url``. Otherwise ``reason`` and ``message`` say why (the slot that failed during the
    operation, else the operation's error, else ``not_promoted``); a slot promoted before a
    failed redeploy keeps serving and is still reported (``url``, ``promoted``).
    ``commit``/``image`` are known from the fetch and build on, whether the deploy then
    worked or not; ``build_refused``: the hosts a failed build's proxy refused.
    """

    deployment_id: str
    url: str | None = None
    promoted: Color | None = None
    commit: str | None = None
    resolved_ref: str | None = None
    image: str | None = None
    image_reused: bool = False
    reason: str | None = None
    message: str | None = None
    build_refused: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.url is not None and self.reason is None


@dataclass(frozen=True)
class SlotWithCommit:
    """A slot as callers render it: the slot and the commit of its revision."""

    slot: Slot
    commit: str | None


@dataclass(frozen=True)
class OperationState:
    """The deployment's current (or last) operation; ``waiting_for_drain`` while it waits
    for a draining slot's grace period: ``(color, since, until)``."""

    kind: str
    running: bool
    started_at: float
    finished_at: float | None
    error: dict[str, Any] | None
    waiting_for_drain: tuple[Color, float, float] | None = None


@dataclass(frozen=True)
class DeploymentState:
    """A deployment as callers render it."""

    deployment: Deployment
    slots: list[SlotWithCommit] = field(default_factory=list)
    promoted: Slot | None = None
    url: str | None = None
    operation: OperationState | None = None
