"""Properties that must hold for any input: the slot state machine, stored slots, port leases
under concurrency (tasks and processes), and a SQLite file whose writer is killed mid-write.

Bounded to a few dozen seconds: few examples where a process is spawned per example.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from dockyard.core.config import Settings
from dockyard.core.errors import IllegalTransition, PortPoolExhausted, StoreError
from dockyard.core.models import Color, DeploymentSpec, Event, Slot, SlotState
from dockyard.core.plugins import Registrar
from dockyard.core.states import TRANSITIONS, WORKING, is_legal, transition
from dockyard.plugins import sqlite_store
from dockyard.plugins.sqlite_store import SqliteStore, schema_version
from tests.conftest import ROOT

S = SlotState
T = TypeVar("T")
STATES = list(S)
COLORS = list(Color)
REASONS = st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=12))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (hypothesis drives sync test functions)."""
    return asyncio.run(coro)


def spec(deployment_id: str = "app") -> DeploymentSpec:
    return DeploymentSpec(id=deployment_id, repo=f"https://github.com/acme/{deployment_id}")


# ================================================================ the state machine
def test_every_pair_of_states_is_legal_exactly_when_listed() -> None:
    for src, dst in itertools.product(STATES, STATES):
        slot = Slot(deployment_id="app", color=Color.BLUE, state=src)
        listed = dst in TRANSITIONS[src]
        assert is_legal(src, dst) is listed
        if listed:
            moved = transition(slot, dst, reason="because")
            assert moved.state is dst
            assert moved.reason == "because"
        else:
            with pytest.raises(IllegalTransition) as info:
                transition(slot, dst, reason="because")
            assert info.value.detail == {"src": str(src), "dst": str(dst)}


def test_the_graph_is_what_the_docs_say() -> None:
    assert set(TRANSITIONS) == set(STATES)
    assert {src for src in STATES if S.FAILED in TRANSITIONS[src]} == WORKING
    assert {src for src in STATES if S.IDLE in TRANSITIONS[src]} == {S.RETIRED, S.FAILED}
    for state in STATES:  # every state is reachable from IDLE and leads back to IDLE
        seen, frontier = {S.IDLE}, [S.IDLE]
        while frontier:
            nxt = {d for s in frontier for d in TRANSITIONS[s]} - seen
            seen |= nxt
            frontier = list(nxt)
        assert state in seen


@given(
    start=st.sampled_from(STATES),
    moves=st.lists(st.tuples(st.sampled_from(STATES), REASONS), max_size=30),
)
def test_random_walks_follow_the_table(
    start: SlotState, moves: list[tuple[SlotState, str | None]]
) -> None:
    slot = Slot(deployment_id="app", color=Color.GREEN, state=start, host_port=40001)
    for dst, reason in moves:
        before = msgspec.structs.replace(slot)
        legal = dst in TRANSITIONS[slot.state]
        needs_reason = dst is S.FAILED and not reason
        try:
            moved = transition(slot, dst, reason=reason, message="m", revision_id="r")
        except IllegalTransition:
            assert not legal or needs_reason
            assert slot == before  # a refused move changes nothing
            continue
        assert legal and not needs_reason
        assert slot == before  # transition returns a new slot, never mutates
        assert (moved.state, moved.reason, moved.message) == (dst, reason, "m")
        assert moved.revision_id == "r" and moved.host_port == 40001
        assert moved.updated_at >= before.updated_at
        slot = moved


@given(src=st.sampled_from(sorted(WORKING)), reason=st.sampled_from([None, ""]))
def test_failed_always_needs_a_reason(src: SlotState, reason: str | None) -> None:
    slot = Slot(deployment_id="app", color=Color.BLUE, state=src)
    with pytest.raises(IllegalTransition):
        transition(slot, S.FAILED, reason=reason)
    assert transition(slot, S.FAILED, reason="crashed").reason == "crashed"


# ================================================================ a stored slot
class StoredSlots(RuleBasedStateMachine):
    """Random moves, field updates, stale writes and leases through one SqliteStore; the
    store must agree with a plain model after every step."""

    POOL = (49000, 49003)
    leased = Bundle("leased")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self.store = SqliteStore(Path(self.tmp.name) / "dockyard.db", port_range=self.POOL)
        self.call(self.store.open())
        self.call(self.store.create_deployment(spec()))
        self.states: dict[Color, SlotState] = dict.fromkeys(COLORS, S.IDLE)
        self.ports: dict[Color, int | None] = dict.fromkeys(COLORS)
        self.events = 0
        self.leases: dict[int, str] = {}

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.call(self.store.close())
        self.call(self.loop.shutdown_default_executor())
        self.loop.close()
        self.tmp.cleanup()

    @rule(
        color=st.sampled_from(COLORS),
        to=st.sampled_from(STATES),
        reason=st.sampled_from([None, "", "boom"]),
        with_event=st.booleans(),
    )
    def move(self, color: Color, to: SlotState, reason: str | None, with_event: bool) -> None:
        read = self.call(self.store.get_slot("app", color))
        wanted = msgspec.structs.replace(read, state=to, reason=reason)
        event = None
        if with_event:
            event = Event(
                deployment_id="app",
                kind="slot_transition",
                color=color,
                from_state=read.state,
                to_state=to,
            )
        src = self.states[color]
        legal = to is src or (
            with_event and is_legal(src, to) and not (to is S.FAILED and not reason)
        )
        try:
            saved = self.call(self.store.save_slot(wanted, event))
        except IllegalTransition:
            assert not legal
            return
        assert legal and saved == wanted
        self.states[color] = to
        self.events += with_event

    @rule(color=st.sampled_from(COLORS), port=st.one_of(st.none(), st.integers(1, 65535)))
    def update_fields(self, color: Color, port: int | None) -> None:
        read = self.call(self.store.get_slot("app", color))
        self.call(self.store.save_slot(msgspec.structs.replace(read, host_port=port)))
        self.ports[color] = port

    @rule(color=st.sampled_from(COLORS), claimed=st.sampled_from(STATES))
    def stale_write_is_refused(self, color: Color, claimed: SlotState) -> None:
        current = self.states[color]
        if claimed is current:
            return
        read = self.call(self.store.get_slot("app", color))
        stale = msgspec.structs.replace(read, state=claimed)
        event = Event(deployment_id="app", kind="slot_transition", from_state=claimed)
        with pytest.raises(IllegalTransition):
            self.call(self.store.save_slot(stale, event))

    @rule(target=leased, owner=st.sampled_from(["app:blue", "app:green", "other:blue"]))
    def lease(self, owner: str) -> Any:
        size = self.POOL[1] - self.POOL[0] + 1
        if len(self.leases) == size:
            with pytest.raises(PortPoolExhausted):
                self.call(self.store.lease_port(owner))
            return multiple()
        port = self.call(self.store.lease_port(owner))
        free = sorted(set(range(self.POOL[0], self.POOL[1] + 1)) - set(self.leases))
        assert port == free[0]
        self.leases[port] = owner
        return port

    @rule(port=consumes(leased))
    def release(self, port: int) -> None:
        self.call(self.store.release_port(port))
        self.leases.pop(port, None)

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        slots = self.call(self.store.list_slots("app"))
        assert [s.color for s in slots] == COLORS
        assert {s.color: s.state for s in slots} == self.states
        assert {s.color: s.host_port for s in slots} == self.ports
        events = self.call(self.store.list_events("app"))
        assert len(events) == self.events
        seqs = [e.seq or 0 for e in events]
        assert seqs == sorted(set(seqs))
        assert self.call(self.store.list_leases()) == self.leases


TestStoredSlots = StoredSlots.TestCase
TestStoredSlots.settings = settings(
    max_examples=15,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ================================================================ port leases
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.integers(1, 10),
    tasks=st.integers(1, 16),
    handles=st.integers(1, 3),
    release_some=st.booleans(),
)
def test_concurrent_tasks_never_share_a_port(
    pool: int, tasks: int, handles: int, release_some: bool
) -> None:
    ports = (49100, 49100 + pool - 1)

    async def scenario(directory: Path) -> None:
        stores = [SqliteStore(directory / "dockyard.db", port_range=ports) for _ in range(handles)]
        for store in stores:
            await store.open()
        try:

            async def one(i: int) -> int | None:
                store = stores[i % handles]
                try:
                    port = await store.lease_port(f"d{i}:blue")
                except PortPoolExhausted:
                    return None
                if release_some and i % 3 == 0:
                    await store.release_port(port)
                    return None
                return port

            got = await asyncio.gather(*(one(i) for i in range(tasks)))
            held = [p for p in got if p is not None]
            assert len(held) == len(set(held))
            assert all(ports[0] <= p <= ports[1] for p in held)
            leases = await stores[0].list_leases()
            assert sorted(leases) == sorted(held)
            for i, port in enumerate(got):
                if port is not None:
                    assert leases[port] == f"d{i}:blue"
            if not release_some:
                assert len(held) == min(tasks, pool)
        finally:
            for store in stores:
                await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        run(scenario(Path(tmp)))


LEASER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from dockyard.core.errors import PortPoolExhausted
    from dockyard.plugins.sqlite_store import SqliteStore

    path, start, end, count, name, go = sys.argv[1:]

    async def main():
        while time.time() < float(go):
            time.sleep(0.001)
        store = SqliteStore(path, port_range=(int(start), int(end)))
        await store.open()  # every process opens (and migrates) a fresh file at once

        async def one(i):
            try:
                return await store.lease_port(f"{name}:{i}")
            except PortPoolExhausted:
                return None

        got = await asyncio.gather(*(one(i) for i in range(int(count))))
        await store.close()
        print(json.dumps(got))

    asyncio.run(main())
    """
)


def test_processes_never_share_a_port(tmp_path: Path) -> None:
    db = tmp_path / "dockyard.db"
    start, end, processes, each = 49200, 49239, 4, 12  # 48 requests for 40 ports
    go = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                LEASER,
                str(db),
                str(start),
                str(end),
                str(each),
                f"p{n}",
                str(go),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    results: dict[str, list[int | None]] = {}
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results[f"p{n}"] = json.loads(out)
    leased = {
        port: f"{name}:{i}"
        for name, got in results.items()
        for i, port in enumerate(got)
        if port is not None
    }
    every = [p for got in results.values() for p in got if p is not None]
    assert len(every) == len(set(every)) == end - start + 1  # no port twice, pool full
    assert sum(p is None for got in results.values() for p in got) == processes * each - 40

    async def table() -> dict[int, str]:
        store = SqliteStore(db, port_range=(start, end))
        await store.open()
        try:
            return await store.list_leases()
        finally:
            await store.close()

    assert run(table()) == leased


# ================================================================ a writer killed mid-write
WRITER = textwrap.dedent(
    """
    import asyncio, random, sys
    import msgspec
    from dockyard.core.errors import DockyardError
    from dockyard.core.models import Color, DeploymentSpec, Event, Revision
    from dockyard.core.states import TRANSITIONS, transition
    from dockyard.plugins.sqlite_store import SqliteStore

    path, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed)
    BIG = {f"K{i}": "v" * 900 for i in range(40)}  # specs span several pages

    async def main():
        store = SqliteStore(path, port_range=(49300, 49315))
        await store.open()
        n = 0
        while True:
            n += 1
            ids = [d.id for d in await store.list_deployments()]
            op = rnd.random()
            if not ids or op < 0.15:
                did = f"w{seed}-{n}"
                await store.create_deployment(
                    DeploymentSpec(id=did, repo="https://github.com/a/b", env=BIG)
                )
                await store.add_revision(
                    Revision(id=f"r{n}", deployment_id=did, repo="x", commit="a" * 40)
                )
            elif op < 0.2 and len(ids) > 4:
                await store.delete_deployment(rnd.choice(ids))
            elif op < 0.3:
                did = rnd.choice(ids)
                await store.update_deployment(
                    DeploymentSpec(id=did, repo="https://github.com/a/b", env=BIG, ref=f"v{n}")
                )
            elif op < 0.4:
                await store.append_event(
                    Event(deployment_id=rnd.choice(ids), kind="note", data={"n": n, "pad": BIG})
                )
            else:
                did, color = rnd.choice(ids), rnd.choice(list(Color))
                slot = await store.get_slot(did, color)
                to = rnd.choice(sorted(TRANSITIONS[slot.state]))
                owner = f"{did}:{color}"
                port = slot.host_port
                if port is None and to == "STAGING":
                    try:
                        port = await store.lease_port(owner)  # lease first, then record
                    except DockyardError:
                        port = None
                if to in ("IDLE", "RETIRED", "FAILED"):
                    port = None
                moved = transition(slot, to, reason="r" if to == "FAILED" else None,
                                   host_port=port)
                event = Event(deployment_id=did, kind="slot_transition", color=color,
                              from_state=slot.state, to_state=to, data={"n": n})
                await store.save_slot(moved, event)
                if slot.host_port is not None and port is None:
                    await store.release_port(slot.host_port)  # record first, then release
            if n == 3:
                print("ready", flush=True)

    asyncio.run(main())
    """
)


async def _open_and_close(db: Path) -> None:
    store = SqliteStore(db)
    await store.open()
    await store.close()


def check_consistent(db: Path) -> None:
    """Reopen ``db`` with the store and check every invariant a crash must not break."""
    with contextlib.closing(sqlite3.connect(db)) as raw:  # recovers the WAL, if any
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    run(_open_and_close(db))  # a writer killed before or during migration is finished now
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == schema_version()
        slot_rows = raw.execute("SELECT deployment_id, color, state, body FROM slots").fetchall()
        for deployment_id, color, state, body in slot_rows:
            decoded = msgspec.json.decode(body, type=Slot)
            assert (decoded.deployment_id, decoded.color, decoded.state) == (
                deployment_id,
                color,
                state,
            )
        event_seqs = [row[0] for row in raw.execute("SELECT seq FROM events ORDER BY seq")]
        high = raw.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        assert not event_seqs or (high is not None and high[0] >= event_seqs[-1])

    async def through_the_store() -> None:
        store = SqliteStore(db, port_range=(49300, 49315))
        await store.open()
        try:
            assert await store.ping()
            leases = await store.list_leases()
            last_seq = 0
            for deployment in await store.list_deployments():
                slots = await store.list_slots(deployment.id)
                assert [s.color for s in slots] == COLORS  # exactly two, never half a pair
                events = await store.list_events(deployment.id, limit=100_000)
                seqs = [e.seq or 0 for e in events]
                assert seqs == sorted(set(seqs))  # strictly increasing
                last_seq = max([last_seq, *seqs])
                for slot in slots:
                    # A slot and its transition event are written together or not at all.
                    moves = [e for e in events if e.kind == "slot_transition"]
                    mine = [e for e in moves if e.color == slot.color]
                    assert (mine[-1].to_state if mine else S.IDLE) == slot.state
                    if slot.host_port is not None:  # a recorded port is always leased
                        assert leases.get(slot.host_port) == f"{deployment.id}:{slot.color}"
                await store.list_revisions(deployment.id)  # every row decodes
            # Still writable after the crash.
            await store.create_deployment(spec("after-crash"))
            event = await store.append_event(Event(deployment_id="after-crash", kind="k"))
            assert (event.seq or 0) > last_seq
            await store.delete_deployment("after-crash")
        finally:
            await store.close()

    run(through_the_store())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    delay=st.floats(0.0, 0.4),
    wait_ready=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(delay=0.15, wait_ready=True, seed=7)  # always at least one kill mid-write
def test_writer_killed_mid_write_leaves_a_consistent_file(
    delay: float, wait_ready: bool, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "dockyard.db"
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(seed)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if wait_ready:  # otherwise the kill may land in start-up, open or migration
                assert writer.stdout is not None
                line = writer.stdout.readline()
                assert line.strip() == "ready", writer.stderr.read() if writer.stderr else ""
            time.sleep(delay)
            assert writer.poll() is None, writer.communicate()[1]
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.communicate(timeout=30)
        assert writer.returncode == -signal.SIGKILL
        check_consistent(db)


# ================================================================ the SQLite file itself
async def test_file_is_private_wal_and_fully_synchronous(tmp_path: Path) -> None:
    cfg = Settings(data_dir=str(tmp_path / "data"), port_range_start=49400, port_range_end=49410)
    register: Registrar[Any] = Registrar("store")
    sqlite_store.dockyard_register_stores(register=register)
    store = register.get("sqlite")(cfg)
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "data" / "dockyard.db"
    assert store.port_range == (49400, 49410)
    assert stat.S_IMODE(os.stat(tmp_path / "data").st_mode) & 0o077 == 0
    await store.open()
    try:
        assert stat.S_IMODE(os.stat(store.path).st_mode) & 0o077 == 0
        pragmas = await store._run(
            "read pragmas",
            lambda c: [
                c.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "user_version")
            ],
        )
        assert pragmas == ["wal", 2, 1, schema_version()]  # synchronous 2 is FULL
    finally:
        await store.close()
    assert await store.ping() is False


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "dockyard.db"
    store = SqliteStore(db)
    await store.open()
    await store.close()
    with sqlite3.connect(db) as raw:
        raw.execute(f"PRAGMA user_version = {schema_version() + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer than this dockyard"):
        await SqliteStore(db).open()


async def test_a_strangers_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA application_id = 42")
    raw.close()
    with pytest.raises(StoreError, match="not a dockyard database"):
        await SqliteStore(db).open()


async def test_migrations_apply_in_order_one_transaction_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "dockyard.db"
    store = SqliteStore(db)
    await store.open()
    await store.create_deployment(spec())
    await store.close()
    base = list(sqlite_store.MIGRATIONS)

    broken = [*base, ("CREATE TABLE notes (body TEXT)", "THIS IS NOT SQL")]
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", broken)
    with pytest.raises(StoreError):
        await SqliteStore(db).open()
    with sqlite3.connect(db) as raw:  # the failed step left nothing behind
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(base)
        assert not raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'notes'").fetchone()
    raw.close()

    steps = [
        *base,
        ("CREATE TABLE notes (body TEXT)",),
        ("ALTER TABLE notes ADD COLUMN at REAL", "INSERT INTO notes VALUES ('hello', 1.0)"),
    ]
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", steps)
    upgraded = SqliteStore(db)
    await upgraded.open()
    try:
        assert await upgraded.get_deployment("app") is not None
        rows = await upgraded._run(
            "read notes", lambda c: c.execute("SELECT * FROM notes").fetchall()
        )
        assert rows == [("hello", 1.0)]
        version = await upgraded._run(
            "read version", lambda c: c.execute("PRAGMA user_version").fetchone()[0]
        )
        assert version == len(steps)
    finally:
        await upgraded.close()


async def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "dockyard.db")
    with pytest.raises(StoreError, match="not open"):
        await store.list_deployments()
