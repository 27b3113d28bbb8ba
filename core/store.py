"""The state-store contract: what every store plugin (SQLite by default) provides.

The contract suite ``dockyard.testing.store_contract`` checks any implementation:
deployments, revisions, slots, the append-only event history, host-port leases that are
never handed out twice, even to two processes at once, and records plugins own
(:class:`PluginRecord`, namespaced by plugin).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from dockyard.core.models import (
    Color,
    Deployment,
    DeploymentSpec,
    Event,
    Model,
    Revision,
    Slot,
    SlotState,
    now,
)

#: Most deployments one page of :meth:`StateStore.list_status` holds.
MAX_STATUS_PAGE = 1000


#: A plugin record's namespace (the owning plugin's name) and label names.
RECORD_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class PluginRecord(Model):
    """A record a plugin owns, kept by the store apart from deployments (so it outlives
    them): a JSON object ``value`` under ``(namespace, key)``, and string ``labels`` the
    store can filter on. The namespace is the plugin's name (the evaluation plugin keeps
    its evaluations under ``evaluation``)."""

    namespace: Annotated[str, Meta(pattern=RECORD_NAME)]
    key: Annotated[str, Meta(min_length=1, max_length=255)]
    value: dict[str, Any] = {}
    labels: dict[Annotated[str, Meta(pattern=RECORD_NAME)], str] = {}
    created_at: float = msgspec.field(default_factory=now)
    updated_at: float = msgspec.field(default_factory=now)


class DeploymentStatus(Model):
    """One deployment as the status list shows it: bookkeeping and both slots, without the
    spec (``get_deployment`` has it). ``commits`` maps the slots' revision ids to their
    commits."""

    id: str
    repo: str
    generation: int
    created_at: float
    updated_at: float
    slots: list[Slot]
    ref: str | None = None
    commits: dict[str, str] = {}


class StatusPage(Model):
    """One page of the status list, ordered by id; ``cursor`` (the last id of the page)
    fetches the next one, None when this is the last."""

    deployments: list[DeploymentStatus]
    cursor: str | None = None


class StatusFilter(Model):
    """Which deployments the status list holds: ``state``, one of a deployment's slots is
    in that state; ``with_label`` / ``without_label``, its spec has / lacks that label."""

    state: SlotState | None = None
    with_label: str | None = None
    without_label: str | None = None

    def matches(self, deployment: Deployment, slots: list[Slot]) -> bool:
        labels = deployment.spec.labels
        return (
            (self.state is None or any(s.state == self.state for s in slots))
            and (self.with_label is None or self.with_label in labels)
            and (self.without_label is None or self.without_label not in labels)
        )


class StateStore(abc.ABC):
    """Durable state. Built by the factory a plugin registers through
    ``dockyard_register_stores`` and used between ``open()`` and ``close()``."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema and get ready."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers a trivial read."""

    # deployments ------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_deployment(self, spec: DeploymentSpec) -> Deployment:
        """Store a new deployment and its two IDLE slots; Conflict if the id exists."""

    @abc.abstractmethod
    async def update_deployment(self, spec: DeploymentSpec) -> Deployment:
        """Replace a deployment's spec, bumping its generation; NotFound if missing."""

    @abc.abstractmethod
    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        """One deployment, or None."""

    @abc.abstractmethod
    async def list_deployments(self) -> list[Deployment]:
        """Every deployment, ordered by id."""

    async def list_status(
        self,
        *,
        after: str | None = None,
        limit: int = MAX_STATUS_PAGE,
        where: StatusFilter | None = None,
    ) -> StatusPage:
        """Up to ``limit`` deployments with an id greater than ``after`` that match
        ``where``, ordered by id, each with its slots (blue first) and their revisions'
        commits, in a fixed number of reads however many deployments there are.

        This default composes the other reads (one per deployment and slot); a store
        should override it with one query, as the SQLite store does.
        """
        limit = max(0, min(limit, MAX_STATUS_PAGE))
        where = where or StatusFilter()
        page: list[DeploymentStatus] = []
        more = False
        for deployment in await self.list_deployments():
            if after is not None and deployment.id <= after:
                continue
            slots = await self.list_slots(deployment.id)
            if not where.matches(deployment, slots):
                continue
            if len(page) == limit:
                more = True
                break
            commits = {}
            for slot in slots:
                if slot.revision_id and slot.revision_id not in commits:
                    revision = await self.get_revision(slot.revision_id)
                    if revision is not None:
                        commits[slot.revision_id] = revision.commit
            page.append(
                DeploymentStatus(
                    id=deployment.id,
                    repo=deployment.spec.repo,
                    ref=deployment.spec.ref,
                    generation=deployment.generation,
                    created_at=deployment.created_at,
                    updated_at=deployment.updated_at,
                    slots=slots,
                    commits=commits,
                )
            )
        return StatusPage(deployments=page, cursor=page[-1].id if more and page else None)

    @abc.abstractmethod
    async def delete_deployment(self, deployment_id: str) -> None:
        """Remove a deployment with its slots, revisions, events and every port lease whose
        owner is ``<id>`` or starts with ``<id>:``. An unknown id is not an error."""

    # revisions --------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_revision(self, revision: Revision) -> Revision:
        """Store an immutable revision; Conflict if its id exists."""

    @abc.abstractmethod
    async def get_revision(self, revision_id: str) -> Revision | None:
        """One revision, or None."""

    @abc.abstractmethod
    async def list_revisions(self, deployment_id: str) -> list[Revision]:
        """A deployment's revisions, oldest first."""

    # slots ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def get_slot(self, deployment_id: str, color: Color) -> Slot:
        """A deployment's slot; NotFound if the deployment does not exist."""

    @abc.abstractmethod
    async def list_slots(self, deployment_id: str) -> list[Slot]:
        """Both slots, blue first."""

    @abc.abstractmethod
    async def save_slot(self, slot: Slot, event: Event | None = None) -> Slot:
        """Write a slot (and its event) in one transaction, checked against the stored slot:
        a change of state must be legal, must come with an event, and ``event.from_state``
        (when set) must equal the stored state; a save without an event only updates fields
        of an unchanged state. IllegalTransition otherwise. The event gets its ``seq``."""

    @abc.abstractmethod
    async def save_slots(self, changes: Sequence[tuple[Slot, Event | None]]) -> list[Slot]:
        """Write several slots (each with its event) in ONE transaction, each checked as
        :meth:`save_slot` checks one, in order: all are written or none is. A promotion
        uses it to move the old slot to DRAINING and the new one to PROMOTED together, so
        no crash can leave a deployment with neither (or both) promoted."""

    # events -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def append_event(self, event: Event) -> Event:
        """Append to the history; returns the event with its sequence number."""

    @abc.abstractmethod
    async def list_events(
        self, deployment_id: str, *, after: int = 0, limit: int = 1000
    ) -> list[Event]:
        """A deployment's events with ``seq > after``, oldest first."""

    # port leases ------------------------------------------------------------------------
    @abc.abstractmethod
    async def lease_port(self, owner: str) -> int:
        """Lease the lowest free port of the pool to ``owner`` (``<deployment id>`` or
        ``<deployment id>:<anything>``); PortPoolExhausted when none. A port is never leased
        twice, even across processes sharing the store."""

    @abc.abstractmethod
    async def release_port(self, port: int) -> None:
        """Return a port to the pool; releasing a free port is not an error."""

    @abc.abstractmethod
    async def list_leases(self) -> dict[int, str]:
        """Every leased port and its owner."""

    # plugin records ---------------------------------------------------------------------
    @abc.abstractmethod
    async def put_record(self, record: PluginRecord) -> PluginRecord:
        """Create or replace ``record`` (by namespace and key); replacing keeps the first
        ``created_at``. Returns what is stored. Independent of deployments."""

    @abc.abstractmethod
    async def get_record(self, namespace: str, key: str) -> PluginRecord | None:
        """One record, or None."""

    @abc.abstractmethod
    async def list_records(
        self,
        namespace: str,
        *,
        labels: Mapping[str, str] | None = None,
        updated_before: float | None = None,
    ) -> list[PluginRecord]:
        """A namespace's records, oldest first (by ``created_at``, then insertion): those
        carrying every label in ``labels`` (same value) and, with ``updated_before``,
        last written before that time."""

    @abc.abstractmethod
    async def delete_record(self, namespace: str, key: str) -> None:
        """Remove a record; an unknown one is not an error."""


StoreFactory = Callable[..., StateStore]
