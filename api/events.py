"""Live events: a journal of every event dockyard observes, and a server-sent-events stream
of it that resumes from a sequence number.

:class:`EventHub` is a plugin object registered by the app's lifespan: its ``dockyard_event``
hook appends each event to the journal (``<data_dir>/events.sqlite3``, SQLite, the newest
:data:`JOURNAL_KEEP` entries) and wakes the streams. A journal entry's ``id`` is the stream's
sequence number: slot transitions and other deployment events (whose store ``seq`` it
keeps), and the evaluation service's ``evaluation`` events, which the store's per-deployment
history does not hold. Entries name their deployment and, when there is one, their
evaluation, so a stream can follow one deployment or one evaluation.

A stream first replays the journal after ``Last-Event-ID`` (or ``?after=``), then follows
live events. Each client has a bounded buffer (:data:`CLIENT_BUFFER` events): a client too
slow to keep up is not dropped but caught up from the journal, so no event is missed or
sent twice. A comment line every :data:`HEARTBEAT_S` seconds keeps proxies from closing an
idle stream.

Routes (scope ``read``): ``GET /v1/events`` (JSON page of the journal) and
``GET /v1/events/stream`` (``text/event-stream``), both filtered by ``deployment`` or
``evaluation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from dockyard.core import logs
from dockyard.core import metrics as m
from dockyard.core.errors import ValidationError
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Color, Event, Model, SlotState

log = logging.getLogger(__name__)

#: Journal entries kept (older ones are pruned as new ones come).
JOURNAL_KEEP = 100_000
#: Events buffered per stream client before it is caught up from the journal instead.
CLIENT_BUFFER = 256
#: Seconds between heartbeat comments on an idle stream.
HEARTBEAT_S = 15.0
#: Entries sent per journal read while replaying.
REPLAY_BATCH = 500
ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


class StreamEvent(Model):
    """One journal entry: a dockyard event with its stream sequence number ``id``."""

    id: int
    deployment_id: str
    kind: str
    at: float
    evaluation_id: str | None = None
    seq: int | None = None
    color: Color | None = None
    from_state: SlotState | None = None
    to_state: SlotState | None = None
    reason: str | None = None
    message: str | None = None
    data: dict[str, Any] = {}
    request_id: str | None = None


class EventJournal:
    """The durable, bounded journal (SQLite; one writer: this process's event loop)."""

    def __init__(self, path: Path, keep: int = JOURNAL_KEEP) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keep = keep
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A journal, not the source of truth: survive a crash of dockyard, not of the host.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " deployment_id TEXT NOT NULL, evaluation_id TEXT, body BLOB NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_dep ON journal(deployment_id, id)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_eval ON journal(evaluation_id, id)")

    def close(self) -> None:
        self._db.close()

    def append(self, entry: StreamEvent) -> StreamEvent:
        body = msgspec.json.encode(msgspec.structs.replace(entry, id=0))
        cursor = self._db.execute(
            "INSERT INTO journal (deployment_id, evaluation_id, body) VALUES (?, ?, ?)",
            (entry.deployment_id, entry.evaluation_id, body),
        )
        new_id = int(cursor.lastrowid or 0)
        if new_id % 1000 == 0:
            self._db.execute("DELETE FROM journal WHERE id <= ?", (new_id - self.keep,))
        return msgspec.structs.replace(entry, id=new_id)

    def read(
        self,
        after: int = 0,
        *,
        deployment: str | None = None,
        evaluation: str | None = None,
        limit: int = REPLAY_BATCH,
        newest: bool = False,
    ) -> list[StreamEvent]:
        """Entries with ``id > after``, oldest first, filtered by deployment or evaluation;
        with ``newest``, the last ``limit`` of them (still oldest first)."""
        where, args = "id > ?", [after]
        if deployment is not None:
            where += " AND deployment_id = ?"
            args.append(deployment)
        if evaluation is not None:
            where += " AND evaluation_id = ?"
            args.append(evaluation)
        order = "DESC" if newest else "ASC"
        rows = self._db.execute(
            f"SELECT id, body FROM journal WHERE {where} ORDER BY id {order} LIMIT ?",
            (*args, limit),
        ).fetchall()
        if newest:
            rows.reverse()
        return [
            msgspec.structs.replace(msgspec.json.decode(body, type=StreamEvent), id=row_id)
            for row_id, body in rows
        ]

    def last_id(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM journal").fetchone()
        return int(row[0])


@dataclass(eq=False)
class Subscription:
    """One stream client: its filter and its bounded buffer."""

    deployment: str | None
    evaluation: str | None
    queue: asyncio.Queue[StreamEvent | None] = field(
        default_factory=lambda: asyncio.Queue(CLIENT_BUFFER)
    )
    lagged: bool = False

    def wants(self, entry: StreamEvent) -> bool:
        if self.deployment is not None and entry.deployment_id != self.deployment:
            return False
        return self.evaluation is None or entry.evaluation_id == self.evaluation


class EventHub:
    """Journals every event and fans it out to the open streams."""

    def __init__(self, journal: EventJournal, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.journal = journal
        self.heartbeat_s = heartbeat_s
        self._subscribers: set[Subscription] = set()
        #: Which evaluation a deployment belongs to (from ``evaluation`` events).
        self._evaluation_of: dict[str, str] = {}
        self.closed = False

    @classmethod
    def open(cls, data_path: Path) -> EventHub:
        return cls(EventJournal(data_path / "events.sqlite3"))

    def close(self) -> None:
        """End every stream, then close the journal."""
        self.closed = True
        for sub in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
            sub.lagged = True
        self.journal.close()

    # -- the observer --------------------------------------------------------------------
    @hookimpl
    def dockyard_event(self, event: Event) -> None:
        if self.closed:
            return
        evaluation_id = None
        if event.kind == "evaluation":
            evaluation_id = event.data.get("evaluation_id")
            if evaluation_id:
                if event.data.get("final"):
                    self._evaluation_of.pop(event.deployment_id, None)
                else:
                    self._evaluation_of[event.deployment_id] = evaluation_id
        evaluation_id = (
            evaluation_id
            or logs.current().get("evaluation_id")
            or self._evaluation_of.get(event.deployment_id)
        )
        entry = self.journal.append(
            StreamEvent(
                id=0,
                evaluation_id=evaluation_id,
                request_id=logs.request_id.get(),
                **{k: v for k, v in msgspec.structs.asdict(event).items()},
            )
        )
        self.publish(entry)

    def publish(self, entry: StreamEvent) -> None:
        for sub in self._subscribers:
            if sub.lagged or not sub.wants(entry):
                continue
            try:
                sub.queue.put_nowait(entry)
            except asyncio.QueueFull:
                sub.lagged = True  # caught up from the journal by its stream

    @contextlib.contextmanager
    def subscribe(self, deployment: str | None, evaluation: str | None) -> Iterator[Subscription]:
        sub = Subscription(deployment, evaluation)
        self._subscribers.add(sub)
        m.EVENT_STREAMS.inc()
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            m.EVENT_STREAMS.dec()

    # -- a stream ------------------------------------------------------------------------
    async def follow(
        self, after: int, *, deployment: str | None = None, evaluation: str | None = None
    ) -> AsyncIterator[StreamEvent | None]:
        """Entries after ``after``, replayed then live, each exactly once; ``None`` is a
        heartbeat (nothing happened for ``heartbeat_s``). Ends when the hub closes."""
        last = after
        with self.subscribe(deployment, evaluation) as sub:
            while not self.closed:
                # Replay (and catch up a lagging client) from the journal.
                while True:
                    sub.lagged = False
                    batch = self.journal.read(last, deployment=deployment, evaluation=evaluation)
                    for entry in batch:
                        last = entry.id
                        yield entry
                    if len(batch) < REPLAY_BATCH and not sub.lagged:
                        break
                while not sub.lagged and not self.closed:
                    try:
                        entry = await asyncio.wait_for(sub.queue.get(), self.heartbeat_s)
                    except TimeoutError:
                        yield None
                        continue
                    if entry is None:
                        break
                    if entry.id > last:
                        last = entry.id
                        yield entry
                while not sub.queue.empty():
                    sub.queue.get_nowait()


def _hub(state: State) -> EventHub:
    hub: EventHub | None = getattr(state, "events", None)
    if hub is None:
        raise ValidationError("the event journal is not running")
    return hub


def check_id(name: str, value: str | None) -> str | None:
    """``value`` if it looks like an id (400 naming ``name`` otherwise)."""
    if value is not None and not ID_RE.match(value):
        raise ValidationError(f"{name}: not a valid id")
    return value


def last_event_id(header: str | None, after: int) -> int:
    """Where a stream resumes: ``Last-Event-ID`` when given (it wins), else ``after``."""
    if header is None or header.strip() == "":
        return after
    try:
        value = int(header.strip())
    except ValueError:
        raise ValidationError("Last-Event-ID: must be an event sequence number") from None
    if not 0 <= value < 2**53:
        raise ValidationError("Last-Event-ID: must be an event sequence number from 0 to 2^53-1")
    return value


async def sse_messages(
    hub: EventHub,
    after: int,
    deployment: str | None,
    evaluation: str | None,
    *,
    named: bool = True,
) -> AsyncIterator[ServerSentEventMessage]:
    """The stream's messages: ``id`` is the journal sequence number, ``event`` the event's
    kind (unless ``named`` is off, for ``EventSource.onmessage``), ``data`` its JSON."""
    yield ServerSentEventMessage(data=None, retry=2000, comment="dockyard events")
    async for entry in hub.follow(after, deployment=deployment, evaluation=evaluation):
        if entry is None:
            yield ServerSentEventMessage(data=None, comment="heartbeat")
        else:
            yield ServerSentEventMessage(
                data=msgspec.json.encode(entry).decode(),
                event=entry.kind if named else None,
                id=entry.id,
            )


DeploymentFilter = Annotated[
    str | None,
    QueryParameter(pattern=ID_RE.pattern, description="only this deployment's events"),
]
EvaluationFilter = Annotated[
    str | None,
    QueryParameter(pattern=ID_RE.pattern, description="only this evaluation's events"),
]


class EventRoutes(Controller):
    """The event journal, as a page or a live stream."""

    path = "/v1/events"
    tags = ["events"]
    opt = {"scope": "read"}

    @get("/", operation_id="listAllEvents", summary="Journal entries after a sequence number")
    async def page(
        self,
        state: State,
        after: Annotated[int, QueryParameter(ge=0, le=2**53 - 1)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=5000)] = 1000,
        deployment: DeploymentFilter = None,
        evaluation: EvaluationFilter = None,
        newest: Annotated[
            bool, QueryParameter(description="the last `limit` entries instead of the first")
        ] = False,
    ) -> list[StreamEvent]:
        return _hub(state).journal.read(
            after,
            deployment=check_id("deployment", deployment),
            evaluation=check_id("evaluation", evaluation),
            limit=limit,
            newest=newest,
        )

    @get(
        "/stream",
        operation_id="streamEvents",
        summary="Server-sent events, replayed after Last-Event-ID, then live",
        media_type="text/event-stream",
    )
    async def stream(
        self,
        request: Request[Any, Any, Any],
        state: State,
        after: Annotated[int, QueryParameter(ge=0, le=2**53 - 1)] = 0,
        deployment: DeploymentFilter = None,
        evaluation: EvaluationFilter = None,
        last_id: Annotated[
            str,
            HeaderParameter(
                name="Last-Event-ID",
                pattern=r"^[0-9]{0,15}$",
                required=False,
                description="resume after this event sequence number",
            ),
        ] = "",
    ) -> ServerSentEvent:
        hub = _hub(state)
        start = last_event_id(last_id, after)
        return ServerSentEvent(
            sse_messages(
                hub,
                start,
                check_id("deployment", deployment),
                check_id("evaluation", evaluation),
            ),
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
