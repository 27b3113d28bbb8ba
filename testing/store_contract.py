"""The state-store contract: every store plugin passes this one suite.

A test module runs it with ``from dockyard.testing.store_contract import *`` and
``pytest --dockyard-store=NAME`` (see :mod:`dockyard.testing.plugin`): the store plugin
registered as NAME is made through its factory with ``Settings(data_dir=..., port_range_...)``
on a private directory and a host-port pool (both ends included); two stores made on the
same directory share their state, as two controller processes sharing one store do.

Conventions the suite pins beyond the ABC's signatures:

- a new deployment starts at some generation and every update adds exactly one;
- ``list_slots``, ``list_revisions`` and ``list_events`` of an unknown deployment are empty;
  ``add_revision``, ``append_event`` and ``save_slot`` for one raise NotFound;
- deleting an unknown deployment is not an error;
- a port lease owner is ``<deployment id>`` or ``<deployment id>:<anything>`` (the deployer
  uses ``<deployment id>:<color>``); deleting a deployment frees exactly those leases;
- ``save_slot`` refuses, with IllegalTransition and without writing anything, a move the
  state machine does not connect, a move to FAILED without a reason, and a write whose
  ``event.from_state`` is not the stored state (the caller's read is stale); a same-state
  save is a field update; an event of another deployment or another ``to_state`` than the
  slot's is refused too;
- plugin records (``put_record``/``get_record``/``list_records``/``delete_record``) are
  kept per namespace, listed oldest first by ``created_at``, filtered by exact label values
  and ``updated_before``; a replacement keeps ``created_at``; a namespace or key that does
  not match :class:`~dockyard.core.store.PluginRecord` is a ValidationError.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dockyard.core.errors import (
    Conflict,
    DockyardError,
    IllegalTransition,
    NotFound,
    PortPoolExhausted,
    ValidationError,
)
from dockyard.core.models import (
    Color,
    DeploymentSpec,
    Event,
    Revision,
    Slot,
    SlotHealth,
    SlotState,
)
from dockyard.core.states import TRANSITIONS, transition
from dockyard.core.store import PluginRecord, StateStore, StatusFilter, StatusPage
from dockyard.testing.plugin import StoreFactory

S = SlotState
PortRange = tuple[int, int]
MakeStore = Callable[..., Awaitable[StateStore]]


POOL: PortRange = (47000, 47009)


@pytest.fixture
async def make_store(
    dockyard_store_factory: StoreFactory, tmp_path: Path
) -> AsyncIterator[MakeStore]:
    """Open stores of the kind under contract (by default on one shared directory); every
    store made is closed at teardown."""
    factory = dockyard_store_factory
    opened: list[StateStore] = []

    async def make(port_range: PortRange = POOL, directory: Path | None = None) -> StateStore:
        store = factory(directory or tmp_path / "store", port_range)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> StateStore:
    """One open store over :data:`POOL`."""
    return await make_store()


def spec(deployment_id: str = "app", **fields: Any) -> DeploymentSpec:
    return DeploymentSpec(
        id=deployment_id, repo=f"https://github.com/acme/{deployment_id}", **fields
    )


def revision(revision_id: str, deployment_id: str = "app", **fields: Any) -> Revision:
    return Revision(
        id=revision_id,
        deployment_id=deployment_id,
        repo=f"https://github.com/acme/{deployment_id}",
        commit="a" * 40,
        **fields,
    )


def move_event(slot: Slot, to: SlotState, **fields: Any) -> Event:
    return Event(
        deployment_id=slot.deployment_id,
        kind="slot_transition",
        color=slot.color,
        from_state=slot.state,
        to_state=to,
        **fields,
    )


async def move(store: StateStore, slot: Slot, to: SlotState) -> Slot:
    """Save the legal move of ``slot`` to ``to`` with its event, as the deployer does."""
    reason = "test_failure" if to is S.FAILED else None
    return await store.save_slot(transition(slot, to, reason=reason), move_event(slot, to))


def path_to(target: SlotState) -> list[SlotState]:
    """The shortest list of moves from IDLE to ``target`` (empty for IDLE)."""
    parents: dict[SlotState, SlotState | None] = {S.IDLE: None}
    queue = deque([S.IDLE])
    while queue:
        state = queue.popleft()
        for nxt in sorted(TRANSITIONS[state]):
            if nxt not in parents:
                parents[nxt] = state
                queue.append(nxt)
    steps: list[SlotState] = []
    cursor: SlotState | None = target
    while cursor is not None and cursor is not S.IDLE:
        steps.append(cursor)
        cursor = parents[cursor]
    return steps[::-1]


async def slot_in(store: StateStore, state: SlotState, color: Color = Color.BLUE) -> Slot:
    slot = await store.get_slot("app", color)
    for step in path_to(state):
        slot = await move(store, slot, step)
    return slot


# ---------------------------------------------------------------- lifecycle
async def test_open_store_answers_ping(store: StateStore) -> None:
    assert await store.ping() is True
    assert isinstance(store.name, str) and store.name


async def test_state_survives_reopening(make_store: MakeStore) -> None:
    first = await make_store()
    created = await first.create_deployment(spec())
    port = await first.lease_port("app:blue")
    stored = await first.append_event(Event(deployment_id="app", kind="created"))
    await first.close()
    second = await make_store()
    assert await second.get_deployment("app") == created
    assert await second.list_leases() == {port: "app:blue"}
    assert await second.list_events("app") == [stored]


# ---------------------------------------------------------------- deployments
async def test_create_deployment_stores_it_with_two_idle_slots(store: StateStore) -> None:
    created = await store.create_deployment(spec(env={"A": "1"}))
    assert created.spec == spec(env={"A": "1"})
    assert created.id == "app"
    assert created.created_at <= created.updated_at
    assert await store.get_deployment("app") == created
    slots = await store.list_slots("app")
    assert [(s.deployment_id, s.color, s.state) for s in slots] == [
        ("app", Color.BLUE, S.IDLE),
        ("app", Color.GREEN, S.IDLE),
    ]
    for slot in slots:
        assert await store.get_slot("app", slot.color) == slot
        assert slot.host_port is None and slot.container_id is None and slot.revision_id is None


async def test_create_deployment_twice_is_a_conflict(store: StateStore) -> None:
    first = await store.create_deployment(spec())
    with pytest.raises(Conflict):
        await store.create_deployment(spec(ref="main"))
    assert await store.get_deployment("app") == first


async def test_list_deployments_is_ordered_by_id(store: StateStore) -> None:
    assert await store.list_deployments() == []
    for deployment_id in ("mid", "zeta", "alpha"):
        await store.create_deployment(spec(deployment_id))
    assert [d.id for d in await store.list_deployments()] == ["alpha", "mid", "zeta"]


async def test_get_unknown_deployment_is_none(store: StateStore) -> None:
    assert await store.get_deployment("nope") is None


async def test_update_deployment_replaces_spec_and_bumps_generation(store: StateStore) -> None:
    created = await store.create_deployment(spec())
    updated = await store.update_deployment(spec(ref="v2"))
    assert updated.spec.ref == "v2"
    assert updated.generation == created.generation + 1
    assert updated.created_at == created.created_at
    assert updated.updated_at >= created.updated_at
    assert await store.get_deployment("app") == updated
    again = await store.update_deployment(spec(ref="v3"))
    assert again.generation == created.generation + 2


async def test_update_unknown_deployment_is_not_found(store: StateStore) -> None:
    with pytest.raises(NotFound):
        await store.update_deployment(spec("nope"))
    assert await store.get_deployment("nope") is None


async def test_delete_removes_everything_of_the_deployment(store: StateStore) -> None:
    await store.create_deployment(spec())
    await store.create_deployment(spec("app-2"))
    await store.add_revision(revision("r1"))
    await store.add_revision(revision("r2", "app-2"))
    await slot_in(store, S.STAGING)
    await store.append_event(Event(deployment_id="app", kind="created"))
    kept_event = await store.append_event(Event(deployment_id="app-2", kind="created"))
    mine = [await store.lease_port(owner) for owner in ("app:blue", "app:green", "app")]
    others = {await store.lease_port(owner): owner for owner in ("app-2:blue", "apple", "x")}

    await store.delete_deployment("app")

    assert await store.get_deployment("app") is None
    assert [d.id for d in await store.list_deployments()] == ["app-2"]
    assert await store.list_slots("app") == []
    with pytest.raises(NotFound):
        await store.get_slot("app", Color.BLUE)
    assert await store.get_revision("r1") is None
    assert await store.list_revisions("app") == []
    assert await store.list_events("app") == []
    leases = await store.list_leases()
    assert leases == others
    assert not set(mine) & set(leases)
    # The other deployment is untouched.
    assert [r.id for r in await store.list_revisions("app-2")] == ["r2"]
    assert await store.list_events("app-2") == [kept_event]
    assert len(await store.list_slots("app-2")) == 2


async def test_deleted_id_can_be_created_afresh(store: StateStore) -> None:
    await store.create_deployment(spec())
    await slot_in(store, S.BUILDING)
    old = await store.append_event(Event(deployment_id="app", kind="created"))
    await store.delete_deployment("app")
    await store.create_deployment(spec())
    assert [s.state for s in await store.list_slots("app")] == [S.IDLE, S.IDLE]
    assert await store.list_events("app") == []
    new = await store.append_event(Event(deployment_id="app", kind="created"))
    assert new.seq is not None and old.seq is not None and new.seq > old.seq


async def test_delete_unknown_deployment_is_not_an_error(store: StateStore) -> None:
    port = await store.lease_port("ghost:blue")
    await store.delete_deployment("ghost")
    assert port not in await store.list_leases()


# ---------------------------------------------------------------- the status list
async def _status_world(store: StateStore) -> None:
    """Deployments d00..d11: every third an evaluation's (labelled), every fourth with a
    PROMOTED green slot on a revision, d05 with a FAILED blue slot."""
    for i in range(12):
        labels = {"dockyard_evaluation": f"ev-{i}"} if i % 3 == 0 else {}
        await store.create_deployment(spec(f"d{i:02}", labels=labels, ref=f"v{i}"))
        if i % 4 == 0:
            made = revision(f"r{i}", f"d{i:02}")
            await store.add_revision(msgspec.structs.replace(made, commit=f"{i:x}" * 40))
            slot = await store.get_slot(f"d{i:02}", Color.GREEN)
            for step in path_to(S.PROMOTED):
                new = transition(slot, step, revision_id=f"r{i}")
                slot = await store.save_slot(new, move_event(slot, step))
    slot = await store.get_slot("d05", Color.BLUE)
    for step in path_to(S.FAILED):
        reason = "test_failure" if step is S.FAILED else None
        slot = await store.save_slot(transition(slot, step, reason=reason), move_event(slot, step))


async def _pages(store: StateStore, limit: int, where: StatusFilter | None = None) -> list[str]:
    ids: list[str] = []
    cursor = None
    for _ in range(100):
        page = await store.list_status(after=cursor, limit=limit, where=where)
        assert len(page.deployments) <= limit
        ids += [d.id for d in page.deployments]
        if page.cursor is None:
            return ids
        assert page.cursor == page.deployments[-1].id
        cursor = page.cursor
    raise AssertionError("the status list never ended")


async def test_status_list_matches_the_single_reads(store: StateStore) -> None:
    assert await store.list_status() == StatusPage(deployments=[], cursor=None)
    await _status_world(store)
    page = await store.list_status()
    assert page.cursor is None
    assert [d.id for d in page.deployments] == [f"d{i:02}" for i in range(12)]
    for item in page.deployments:
        deployment = await store.get_deployment(item.id)
        assert deployment is not None
        assert (item.repo, item.ref, item.generation) == (
            deployment.spec.repo,
            deployment.spec.ref,
            deployment.generation,
        )
        assert (item.created_at, item.updated_at) == (
            deployment.created_at,
            deployment.updated_at,
        )
        assert item.slots == await store.list_slots(item.id)  # both, blue first
        expected = {}
        for slot in item.slots:
            if slot.revision_id:
                found = await store.get_revision(slot.revision_id)
                assert found is not None
                expected[slot.revision_id] = found.commit
        assert item.commits == expected
    assert page.deployments[4].commits == {"r4": "4" * 40}
    assert page.deployments[4].slots[1].state is S.PROMOTED
    # The default (composed) implementation of the ABC agrees with the store's own.
    assert await StateStore.list_status(store) == page


@pytest.mark.parametrize("limit", [1, 5, 12, 13])
async def test_status_list_pages_without_gaps_or_repeats(store: StateStore, limit: int) -> None:
    await _status_world(store)
    assert await _pages(store, limit) == [f"d{i:02}" for i in range(12)]
    last = await store.list_status(after="d11")
    assert last.deployments == [] and last.cursor is None
    middle = await store.list_status(after="d04x", limit=2)  # any string is a position
    assert [d.id for d in middle.deployments] == ["d05", "d06"] and middle.cursor == "d06"


async def test_status_list_sees_deployments_added_and_removed_between_pages(
    store: StateStore,
) -> None:
    await _status_world(store)
    first = await store.list_status(limit=4)
    await store.delete_deployment("d05")
    await store.create_deployment(spec("d055"))
    await store.create_deployment(spec("a-before"))  # before the cursor: not in later pages
    rest = await _pages_after(store, first.cursor, 4)
    assert rest == ["d04", "d055", "d06", "d07", "d08", "d09", "d10", "d11"]


async def _pages_after(store: StateStore, cursor: str | None, limit: int) -> list[str]:
    ids: list[str] = []
    while cursor is not None:
        page = await store.list_status(after=cursor, limit=limit)
        ids += [d.id for d in page.deployments]
        cursor = page.cursor
    return ids


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (StatusFilter(state=S.PROMOTED), [0, 4, 8]),
        (StatusFilter(state=S.FAILED), [5]),
        (StatusFilter(state=S.DRAINING), []),
        (StatusFilter(state=S.IDLE), list(range(12))),  # any slot: each has an IDLE one
        (StatusFilter(with_label="dockyard_evaluation"), [0, 3, 6, 9]),
        (StatusFilter(without_label="dockyard_evaluation"), [1, 2, 4, 5, 7, 8, 10, 11]),
        (StatusFilter(with_label="other"), []),
        (StatusFilter(without_label="other"), list(range(12))),
        (StatusFilter(with_label='x"y'), []),  # a name that is no label: nothing matches
        (StatusFilter(state=S.PROMOTED, without_label="dockyard_evaluation"), [4, 8]),
    ],
)
async def test_status_list_filters_page_correctly(
    store: StateStore, where: StatusFilter, expected: list[int]
) -> None:
    await _status_world(store)
    wanted = [f"d{i:02}" for i in expected]
    for limit in (1, 2, 1000):
        assert await _pages(store, limit, where) == wanted
    assert [d.id for d in (await StateStore.list_status(store, where=where)).deployments] == wanted


# ---------------------------------------------------------------- revisions
async def test_revisions_are_stored_and_listed_oldest_first(store: StateStore) -> None:
    await store.create_deployment(spec())
    await store.create_deployment(spec("other"))
    newer = await store.add_revision(revision("r-new", created_at=2000.0))
    older = await store.add_revision(
        revision("r-old", created_at=1000.0, provenance={"builder": "test"}, spec=spec())
    )
    await store.add_revision(revision("r-other", "other"))
    assert await store.get_revision("r-old") == older
    assert await store.list_revisions("app") == [older, newer]
    assert await store.list_revisions("nope") == []
    assert await store.get_revision("nope") is None


async def test_revision_id_is_unique(store: StateStore) -> None:
    await store.create_deployment(spec())
    first = await store.add_revision(revision("r1"))
    with pytest.raises(Conflict):
        await store.add_revision(revision("r1", image_tag="other"))
    assert await store.get_revision("r1") == first


async def test_revision_of_unknown_deployment_is_not_found(store: StateStore) -> None:
    with pytest.raises(NotFound):
        await store.add_revision(revision("r1", "nope"))
    assert await store.get_revision("r1") is None


# ---------------------------------------------------------------- slots
async def test_slots_of_unknown_deployment(store: StateStore) -> None:
    assert await store.list_slots("nope") == []
    with pytest.raises(NotFound):
        await store.get_slot("nope", Color.GREEN)
    with pytest.raises(NotFound):
        await store.save_slot(Slot(deployment_id="nope", color=Color.BLUE))


async def test_save_slot_writes_slot_and_event_together(store: StateStore) -> None:
    await store.create_deployment(spec())
    idle = await store.get_slot("app", Color.GREEN)
    building = transition(idle, S.BUILDING, revision_id="r1")
    saved = await store.save_slot(building, move_event(idle, S.BUILDING, data={"g": 1}))
    assert saved == building
    assert await store.get_slot("app", Color.GREEN) == building
    assert (await store.get_slot("app", Color.BLUE)).state is S.IDLE
    [event] = await store.list_events("app")
    assert event.seq is not None
    assert (event.kind, event.color, event.from_state, event.to_state, event.data) == (
        "slot_transition",
        Color.GREEN,
        S.IDLE,
        S.BUILDING,
        {"g": 1},
    )


async def test_a_move_without_an_event_is_refused(store: StateStore) -> None:
    """A save without an event may only update fields: a stale field update (the monitor
    read PROMOTED, the slot is DRAINING meanwhile) must never move the slot back."""
    await store.create_deployment(spec())
    idle = await store.get_slot("app", Color.BLUE)
    with pytest.raises(IllegalTransition, match="needs an event"):
        await store.save_slot(transition(idle, S.BUILDING))
    assert (await store.get_slot("app", Color.BLUE)).state is S.IDLE
    assert await store.list_events("app") == []


async def test_save_slot_fills_in_the_event_seq(store: StateStore) -> None:
    await store.create_deployment(spec())
    idle = await store.get_slot("app", Color.BLUE)
    event = move_event(idle, S.BUILDING)
    await store.save_slot(transition(idle, S.BUILDING), event)
    assert event.seq == (await store.list_events("app"))[-1].seq


async def test_same_state_update_changes_fields(store: StateStore) -> None:
    await store.create_deployment(spec())
    promoted = await slot_in(store, S.PROMOTED)
    health = SlotHealth(status="healthy", last_latency_ms=3.5, checked_at=1.0)
    updated = msgspec.structs.replace(promoted, health=health, host_port=47001)
    assert await store.save_slot(updated) == updated
    assert await store.get_slot("app", Color.BLUE) == updated


@pytest.mark.parametrize("src", list(S), ids=str)
@pytest.mark.parametrize("dst", list(S), ids=str)
async def test_save_slot_accepts_exactly_the_legal_moves(
    store: StateStore, src: SlotState, dst: SlotState
) -> None:
    await store.create_deployment(spec())
    slot = await slot_in(store, src)
    events_before = await store.list_events("app")
    wanted = msgspec.structs.replace(slot, state=dst, reason="why", message="moved")
    if dst is src or dst in TRANSITIONS[src]:
        assert await store.save_slot(wanted, move_event(slot, dst)) == wanted
        assert await store.get_slot("app", Color.BLUE) == wanted
        assert len(await store.list_events("app")) == len(events_before) + 1
    else:
        with pytest.raises(IllegalTransition):
            await store.save_slot(wanted, move_event(slot, dst))
        assert await store.get_slot("app", Color.BLUE) == slot
        assert await store.list_events("app") == events_before


async def test_move_to_failed_needs_a_reason(store: StateStore) -> None:
    await store.create_deployment(spec())
    building = await slot_in(store, S.BUILDING)
    failed = msgspec.structs.replace(building, state=S.FAILED, reason=None)
    with pytest.raises(IllegalTransition):
        await store.save_slot(failed, move_event(building, S.FAILED))
    assert await store.get_slot("app", Color.BLUE) == building


async def test_stale_read_is_refused(store: StateStore) -> None:
    await store.create_deployment(spec())
    read = await store.get_slot("app", Color.BLUE)
    await move(store, read, S.BUILDING)
    # A second writer that read the slot while IDLE moves it again: refused, nothing written.
    with pytest.raises(IllegalTransition):
        await move(store, read, S.BUILDING)
    assert len(await store.list_events("app")) == 1


async def test_event_that_does_not_describe_the_write_is_refused(store: StateStore) -> None:
    await store.create_deployment(spec())
    await store.create_deployment(spec("other"))
    idle = await store.get_slot("app", Color.BLUE)
    building = transition(idle, S.BUILDING)
    for event in (
        move_event(idle, S.STAGING),  # says another state
        msgspec.structs.replace(move_event(idle, S.BUILDING), deployment_id="other"),
    ):
        with pytest.raises(DockyardError):
            await store.save_slot(building, event)
    assert await store.get_slot("app", Color.BLUE) == idle
    assert await store.list_events("app") == await store.list_events("other") == []


async def test_concurrent_moves_from_one_read_exactly_one_wins(store: StateStore) -> None:
    await store.create_deployment(spec())
    read = await store.get_slot("app", Color.BLUE)
    results = await asyncio.gather(
        *(move(store, read, S.BUILDING) for _ in range(8)), return_exceptions=True
    )
    assert sum(isinstance(r, Slot) for r in results) == 1
    assert all(isinstance(r, (Slot, IllegalTransition)) for r in results)
    assert len(await store.list_events("app")) == 1


async def test_a_full_blue_green_cycle(store: StateStore) -> None:
    await store.create_deployment(spec())
    blue = await slot_in(store, S.PROMOTED, Color.BLUE)
    green = await slot_in(store, S.HEALTHY, Color.GREEN)
    blue = await move(store, blue, S.DRAINING)
    green = await move(store, green, S.PROMOTED)
    blue = await move(store, blue, S.RETIRED)
    blue = await move(store, blue, S.IDLE)
    states = {s.color: s.state for s in await store.list_slots("app")}
    assert states == {Color.BLUE: S.IDLE, Color.GREEN: S.PROMOTED}
    moves = [(e.color, e.to_state) for e in await store.list_events("app")]
    assert moves[-4:] == [
        (Color.BLUE, S.DRAINING),
        (Color.GREEN, S.PROMOTED),
        (Color.BLUE, S.RETIRED),
        (Color.BLUE, S.IDLE),
    ]


# ---------------------------------------------------------------- events
async def test_save_slots_moves_both_slots_in_one_transaction(store: StateStore) -> None:
    """A promotion: the old slot to DRAINING and the new one to PROMOTED, together, with
    both events in order."""
    await store.create_deployment(spec())
    blue = await slot_in(store, S.PROMOTED, Color.BLUE)
    green = await slot_in(store, S.HEALTHY, Color.GREEN)
    before = len(await store.list_events("app"))
    draining, promoted = transition(blue, S.DRAINING), transition(green, S.PROMOTED)
    events = [move_event(blue, S.DRAINING), move_event(green, S.PROMOTED)]
    saved = await store.save_slots([(draining, events[0]), (promoted, events[1])])
    assert saved == [draining, promoted]
    states = {s.color: s.state for s in await store.list_slots("app")}
    assert states == {Color.BLUE: S.DRAINING, Color.GREEN: S.PROMOTED}
    stored = (await store.list_events("app"))[before:]
    assert [(e.color, e.to_state) for e in stored] == [
        (Color.BLUE, S.DRAINING),
        (Color.GREEN, S.PROMOTED),
    ]
    assert [e.seq for e in events] == [e.seq for e in stored]


async def test_save_slots_writes_nothing_when_one_change_is_refused(store: StateStore) -> None:
    """The second change is stale (the green slot moved meanwhile): the first, legal on
    its own, is not written either, and no event is appended."""
    await store.create_deployment(spec())
    blue = await slot_in(store, S.PROMOTED, Color.BLUE)
    green = await slot_in(store, S.HEALTHY, Color.GREEN)
    await move(store, green, S.RETIRED)
    before = await store.list_events("app")
    with pytest.raises(IllegalTransition):
        await store.save_slots(
            [
                (transition(blue, S.DRAINING), move_event(blue, S.DRAINING)),
                (transition(green, S.PROMOTED), move_event(green, S.PROMOTED)),
            ]
        )
    assert (await store.get_slot("app", Color.BLUE)) == blue
    assert (await store.get_slot("app", Color.GREEN)).state is S.RETIRED
    assert await store.list_events("app") == before


async def test_events_get_increasing_seqs_and_list_oldest_first(store: StateStore) -> None:
    await store.create_deployment(spec())
    await store.create_deployment(spec("other"))
    appended = []
    for i in range(5):
        appended.append(
            await store.append_event(
                Event(deployment_id="app", kind="probe", message=f"#{i}", data={"i": i})
            )
        )
        await store.append_event(Event(deployment_id="other", kind="noise"))
    seqs = [e.seq for e in appended if e.seq is not None]
    assert len(seqs) == len(appended)
    assert seqs == sorted(set(seqs))  # strictly increasing
    listed = await store.list_events("app")
    assert listed == appended
    assert [e.data["i"] for e in listed] == list(range(5))


async def test_list_events_after_and_limit(store: StateStore) -> None:
    await store.create_deployment(spec())
    events = [await store.append_event(Event(deployment_id="app", kind="k")) for _ in range(6)]
    cut = events[2].seq
    assert cut is not None
    assert await store.list_events("app", after=cut) == events[3:]
    assert await store.list_events("app", limit=2) == events[:2]
    assert await store.list_events("app", after=cut, limit=1) == events[3:4]
    assert await store.list_events("app", after=events[-1].seq or 0) == []
    assert await store.list_events("nope") == []


async def test_events_are_append_only(store: StateStore) -> None:
    await store.create_deployment(spec())
    first = await store.append_event(Event(deployment_id="app", kind="a", seq=999_999))
    assert first.seq != 999_999  # the store assigns seq
    before = await store.list_events("app")
    await move(store, await store.get_slot("app", Color.BLUE), S.BUILDING)
    await store.update_deployment(spec(ref="v2"))
    await store.append_event(Event(deployment_id="app", kind="b"))
    after = await store.list_events("app")
    assert after[: len(before)] == before
    assert len(after) == len(before) + 2


async def test_event_of_unknown_deployment_is_not_found(store: StateStore) -> None:
    with pytest.raises(NotFound):
        await store.append_event(Event(deployment_id="nope", kind="k"))


# ---------------------------------------------------------------- port leases
async def test_lease_lowest_free_port_and_release(store: StateStore) -> None:
    assert await store.list_leases() == {}
    first = await store.lease_port("app:blue")
    second = await store.lease_port("app:green")
    assert (first, second) == (POOL[0], POOL[0] + 1)
    assert await store.list_leases() == {first: "app:blue", second: "app:green"}
    await store.release_port(first)
    await store.release_port(first)  # releasing a free port is fine
    await store.release_port(1)  # so is a port outside the pool
    assert await store.list_leases() == {second: "app:green"}
    assert await store.lease_port("other") == first


async def test_pool_exhaustion_with_a_tiny_range(make_store: MakeStore) -> None:
    store = await make_store((48000, 48002))
    ports = [await store.lease_port(f"d{i}") for i in range(3)]
    assert ports == [48000, 48001, 48002]
    with pytest.raises(PortPoolExhausted):
        await store.lease_port("late")
    assert sorted(await store.list_leases()) == ports
    await store.release_port(48001)
    assert await store.lease_port("late") == 48001
    with pytest.raises(PortPoolExhausted):
        await store.lease_port("later")


async def test_single_port_pool(make_store: MakeStore) -> None:
    store = await make_store((48100, 48100))
    assert await store.lease_port("a") == 48100
    with pytest.raises(PortPoolExhausted):
        await store.lease_port("b")


async def test_concurrent_leases_never_collide(store: StateStore) -> None:
    size = POOL[1] - POOL[0] + 1
    results = await asyncio.gather(
        *(store.lease_port(f"app:{i}") for i in range(size + 3)), return_exceptions=True
    )
    ports = [r for r in results if isinstance(r, int)]
    assert sorted(ports) == list(range(POOL[0], POOL[1] + 1))
    assert sum(isinstance(r, PortPoolExhausted) for r in results) == 3
    leases = await store.list_leases()
    assert sorted(leases) == sorted(ports)
    for i, result in enumerate(results):
        if isinstance(result, int):
            assert leases[result] == f"app:{i}"


async def test_two_handles_on_one_store_never_double_lease(make_store: MakeStore) -> None:
    one, two = await make_store(), await make_store()
    results = await asyncio.gather(
        *(store.lease_port(f"app:{i}") for i, store in enumerate([one, two] * 5))
    )
    assert sorted(results) == list(range(POOL[0], POOL[1] + 1))
    assert await one.list_leases() == await two.list_leases()
    with pytest.raises(PortPoolExhausted):
        await two.lease_port("late")


# ---------------------------------------------------------------- plugin records
def record(key: str, namespace: str = "flow", **fields: Any) -> PluginRecord:
    values: dict[str, Any] = {"labels": {"state": "queued"}, "value": {"id": key, "tasks": [1, 2]}}
    values.update(fields)
    return PluginRecord(namespace=namespace, key=key, **values)


async def test_plugin_records_are_saved_replaced_and_read_back(store: StateStore) -> None:
    assert await store.get_record("flow", "ev-1") is None
    first = await store.put_record(record("ev-1", created_at=100.0, updated_at=100.0))
    assert await store.get_record("flow", "ev-1") == first
    later = record(
        "ev-1",
        labels={"state": "finished", "finished": "true"},
        created_at=999.0,
        updated_at=200.0,
        value={"id": "ev-1", "nested": {"results": [{"task_id": "t", "ok": True}]}},
    )
    saved = await store.put_record(later)
    assert saved.created_at == 100.0  # a replacement keeps when it was created
    got = await store.get_record("flow", "ev-1")
    assert got == saved
    assert got is not None and got.value["nested"]["results"][0]["ok"] is True
    assert got.labels == {"state": "finished", "finished": "true"}


async def test_plugin_records_are_listed_oldest_first_and_filtered_by_labels(
    store: StateStore,
) -> None:
    await store.put_record(record("c", created_at=3.0, labels={"finished": "false"}))
    await store.put_record(
        record("a", created_at=1.0, labels={"finished": "false", "batch_id": "b1"})
    )
    await store.put_record(
        record("b", created_at=2.0, labels={"finished": "true", "batch_id": "b1"})
    )

    async def keys(**labels: str) -> list[str]:
        return [r.key for r in await store.list_records("flow", labels=labels)]

    assert await keys() == ["a", "b", "c"]
    assert await keys(finished="false") == ["a", "c"]
    assert await keys(finished="true") == ["b"]
    assert await keys(batch_id="b1") == ["a", "b"]
    assert await keys(batch_id="b1", finished="false") == ["a"]
    assert await keys(batch_id="nope") == []


async def test_plugin_records_are_filtered_by_age(store: StateStore) -> None:
    await store.put_record(record("old", created_at=1.0, updated_at=10.0))
    await store.put_record(record("new", created_at=2.0, updated_at=20.0))
    older = await store.list_records("flow", updated_before=15.0)
    assert [r.key for r in older] == ["old"]
    assert await store.list_records("flow", updated_before=5.0) == []


async def test_plugin_records_are_kept_apart_by_namespace(store: StateStore) -> None:
    await store.put_record(record("k", namespace="one", value={"who": "one"}))
    await store.put_record(record("k", namespace="two", value={"who": "two"}))
    one, two = await store.get_record("one", "k"), await store.get_record("two", "k")
    assert one is not None and one.value == {"who": "one"}
    assert two is not None and two.value == {"who": "two"}
    await store.delete_record("one", "k")
    assert await store.get_record("one", "k") is None
    assert [r.namespace for r in await store.list_records("two")] == ["two"]


async def test_a_plugin_record_with_a_bad_namespace_or_key_is_refused(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="namespace"):
        await store.put_record(record("k", namespace="bad space"))
    with pytest.raises(ValidationError, match="key"):
        await store.put_record(record(""))
    assert await store.list_records("bad space") == []


async def test_plugin_records_outlive_deployments_and_are_deleted_alone(
    store: StateStore,
) -> None:
    await store.create_deployment(spec("ev-1"))
    await store.put_record(record("ev-1"))
    await store.delete_deployment("ev-1")
    assert await store.get_record("flow", "ev-1") is not None
    await store.delete_record("flow", "ev-1")
    await store.delete_record("flow", "ev-1")  # unknown: not an error
    assert await store.get_record("flow", "ev-1") is None
    assert await store.list_records("flow") == []


async def test_plugin_records_are_shared_between_stores_on_one_directory(
    make_store: MakeStore,
) -> None:
    first, second = await make_store(), await make_store()
    await first.put_record(record("ev-9", labels={"state": "running"}))
    got = await second.get_record("flow", "ev-9")
    assert got is not None and got.labels == {"state": "running"}
