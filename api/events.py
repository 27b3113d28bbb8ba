"""Live events: a journal of every event dockyard observes, and a server-sent-events stream
of it that resumes from a sequence number.

:class:`EventHub` is a plugin object registered by the app's lifespan: its ``dockyard_event``
hook appends each event to the journal (``<data_dir>/events.sqlite3``, SQLite, the newest
:data:`JOURNAL_KEEP` entries) and wakes the streams. A journal entry's ``id`` is the stream's
sequence number: slot transitions and other deployment events (whose store ``seq`` it
keeps), and the events plugins' services emit, which the store's per-deployment history does
not hold. Entries name their deployment and carry the **tags** plugins register
(``dockyard_register_event_tags``: a name and a tagger deciding its value per event), so a
stream can follow one deployment or one tagged unit of a plugin's work (the evaluation
plugin's ``evaluation``). Tags are kept in ``journal_tags(entry_id, name, value)``; a journal
made by the previous schema (one ``<name>_id`` column per tag) is migrated on open.

A stream first replays the journal after ``Last-Event-ID`` (or ``?after=``), then follows
live events. Each client has a bounded buffer (:data:`CLIENT_BUFFER` events): a client too
slow to keep up is not dropped but caught up from the journal, so no event is missed or
sent twice. A comment line every :data:`HEARTBEAT_S` seconds keeps proxies from closing an
idle stream.

Routes (scope ``read``): ``GET /v1/events`` (JSON page of the journal) and
``GET /v1/events/stream`` (``text/event-stream``), both filtered by ``deployment`` and by any
registered tag (``?<tag>=ID``; a name no loaded plugin registers is a 400). In the JSON,
each entry has ``tags`` and, deprecated for one release, ``<tag>_id`` for every registered
tag (null when the entry has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from dockyard.core import logs
from dockyard.core import metrics as m
from dockyard.core.errors import ValidationError
from dockyard.core.event_tags import EventTagger, tag_event
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
#: A column of the previous journal schema holding one tag (``<tag>_id``).
LEGACY_TAG_COLUMN = re.compile(r"^[a-z][a-z0-9_]{0,39}_id$")


class StreamEvent(Model):
    """One journal entry: a dockyard event with its stream sequence number ``id`` and the
    tags plugins gave it (tag name -> id)."""

    id: int
    deployment_id: str
    kind: str
    at: float
    tags: dict[str, str] = {}
    seq: int | None = None
    color: Color | None = None
    from_state: SlotState | None = None
    to_state: SlotState | None = None
    reason: str | None = None
    message: str | None = None
    data: dict[str, Any] = {}
    request_id: str | None = None


#: ``<tag>_id`` would shadow these fields of an entry's JSON: not usable as tag names.
RESERVED_TAGS = frozenset(
    name.removesuffix("_id") for name in StreamEvent.__struct_fields__ if name.endswith("_id")
)


def wire(entry: StreamEvent, tag_names: Iterable[str]) -> dict[str, Any]:
    """``entry`` as its JSON object: its fields, and (deprecated, for one release) a
    ``<tag>_id`` key for every registered tag, null when the entry has none."""
    out: dict[str, Any] = msgspec.to_builtins(entry)
    for name in tag_names:
        out[f"{name}_id"] = entry.tags.get(name)
    return out


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
            " deployment_id TEXT NOT NULL, body BLOB NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_dep ON journal(deployment_id, id)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS journal_tags (entry_id INTEGER NOT NULL,"
            " name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (entry_id, name))"
        )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS tags_by_value ON journal_tags(name, value, entry_id)"
        )
        migrate_tag_columns(self._db)

    def close(self) -> None:
        self._db.close()

    def append(self, entry: StreamEvent) -> StreamEvent:
        body = msgspec.json.encode(msgspec.structs.replace(entry, id=0))
        cursor = self._db.execute(
            "INSERT INTO journal (deployment_id, body) VALUES (?, ?)", (entry.deployment_id, body)
        )
        new_id = int(cursor.lastrowid or 0)
        if entry.tags:
            self._db.executemany(
                "INSERT INTO journal_tags (entry_id, name, value) VALUES (?, ?, ?)",
                [(new_id, name, value) for name, value in entry.tags.items()],
            )
        if new_id % 1000 == 0:
            self._db.execute("DELETE FROM journal WHERE id <= ?", (new_id - self.keep,))
            self._db.execute("DELETE FROM journal_tags WHERE entry_id <= ?", (new_id - self.keep,))
        return msgspec.structs.replace(entry, id=new_id)

    def read(
        self,
        after: int = 0,
        *,
        deployment: str | None = None,
        tags: Mapping[str, str] | None = None,
        limit: int = REPLAY_BATCH,
        newest: bool = False,
    ) -> list[StreamEvent]:
        """Entries with ``id > after``, oldest first, filtered by deployment and by tags
        (every one given must match); with ``newest``, the last ``limit`` of them (still
        oldest first)."""
        where, args = "id > ?", [after]
        if deployment is not None:
            where += " AND deployment_id = ?"
            args.append(deployment)
        for name, value in (tags or {}).items():
            where += (
                " AND id IN (SELECT entry_id FROM journal_tags"
                " WHERE name = ? AND value = ? AND entry_id > ?)"
            )
            args.extend((name, value, after))
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


def migrate_tag_columns(db: sqlite3.Connection) -> list[str]:
    """Move a previous schema's tag columns (``journal.<tag>_id``) into ``journal_tags``,
    and their keys in each entry's body into its ``tags``; then drop them. Returns the tag
    names moved. One transaction: a failure leaves the journal as it was."""
    columns = [row[1] for row in db.execute("PRAGMA table_info(journal)")]
    legacy = [c for c in columns if c != "deployment_id" and LEGACY_TAG_COLUMN.match(c)]
    if not legacy:
        return []
    db.execute("BEGIN IMMEDIATE")
    try:
        for column in legacy:
            db.execute(
                "INSERT OR IGNORE INTO journal_tags (entry_id, name, value)"
                f' SELECT id, ?, "{column}" FROM journal WHERE "{column}" IS NOT NULL',
                (column.removesuffix("_id"),),
            )
        paths = ", ".join(f"'$.{column}'" for column in legacy)
        db.execute(
            "UPDATE journal SET body = CAST(json_set("
            f" json_remove(CAST(body AS TEXT), {paths}), '$.tags',"
            " json((SELECT COALESCE(json_group_object(name, value), '{}') FROM journal_tags"
            " WHERE entry_id = journal.id))) AS BLOB)"
        )
        for (index,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'journal'"
        ).fetchall():
            indexed = {row[2] for row in db.execute(f'PRAGMA index_info("{index}")')}
            if indexed & set(legacy):
                db.execute(f'DROP INDEX "{index}"')
        for column in legacy:
            db.execute(f'ALTER TABLE journal DROP COLUMN "{column}"')
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    log.info("event journal: moved %s into event tags", ", ".join(legacy))
    return [column.removesuffix("_id") for column in legacy]


@dataclass(eq=False)
class Subscription:
    """One stream client: its filter and its bounded buffer."""

    deployment: str | None
    tags: Mapping[str, str]
    queue: asyncio.Queue[StreamEvent | None] = field(
        default_factory=lambda: asyncio.Queue(CLIENT_BUFFER)
    )
    lagged: bool = False

    def wants(self, entry: StreamEvent) -> bool:
        if self.deployment is not None and entry.deployment_id != self.deployment:
            return False
        return all(entry.tags.get(name) == value for name, value in self.tags.items())


class EventHub:
    """Journals every event, tagged by the registered taggers, and fans it out to the open
    streams."""

    def __init__(
        self,
        journal: EventJournal,
        *,
        taggers: Mapping[str, EventTagger] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.journal = journal
        self.heartbeat_s = heartbeat_s
        self.taggers: dict[str, EventTagger] = dict(taggers or {})
        self._subscribers: set[Subscription] = set()
        self.closed = False

    @classmethod
    def open(cls, data_path: Path, taggers: Mapping[str, EventTagger] | None = None) -> EventHub:
        return cls(EventJournal(data_path / "events.sqlite3"), taggers=taggers)

    @property
    def tag_names(self) -> list[str]:
        """The registered tags (each a filter of the event routes)."""
        return sorted(self.taggers)

    def encode(self, entry: StreamEvent) -> bytes:
        """``entry``'s JSON on the wire (see :func:`wire`)."""
        return msgspec.json.encode(wire(entry, self.tag_names))

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
        entry = self.journal.append(
            StreamEvent(
                id=0,
                tags=tag_event(self.taggers, event, logs.current()),
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
    def subscribe(
        self, deployment: str | None, tags: Mapping[str, str] | None = None
    ) -> Iterator[Subscription]:
        sub = Subscription(deployment, dict(tags or {}))
        self._subscribers.add(sub)
        m.EVENT_STREAMS.inc()
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            m.EVENT_STREAMS.dec()

    # -- a stream ------------------------------------------------------------------------
    async def follow(
        self,
        after: int,
        *,
        deployment: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamEvent | None]:
        """Entries after ``after``, replayed then live, each exactly once; ``None`` is a
        heartbeat (nothing happened for ``heartbeat_s``). Ends when the hub closes."""
        last = after
        with self.subscribe(deployment, tags) as sub:
            while not self.closed:
                # Replay (and catch up a lagging client) from the journal.
                while True:
                    sub.lagged = False
                    batch = self.journal.read(last, deployment=deployment, tags=tags)
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


def tag_filters(
    request: Request[Any, Any, Any], tag_names: Iterable[str], own: Iterable[str]
) -> dict[str, str]:
    """The tag filters of a request's query (``?<tag>=ID``): every parameter that is not
    one of the route's ``own`` must name a registered tag (400 naming it otherwise) and
    hold an id."""
    known, own_names = set(tag_names), set(own)
    tags: dict[str, str] = {}
    for name in sorted(set(request.query_params.keys()) - own_names):
        if name not in known:
            raise ValidationError(f"{name}: no loaded plugin registers this filter", field=name)
        values = request.query_params.getall(name)
        if len(values) != 1:
            raise ValidationError(f"{name}: give one id", field=name)
        tags[name] = check_id(name, values[0]) or ""
    return tags


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
    tags: Mapping[str, str] | None,
    *,
    named: bool = True,
) -> AsyncIterator[ServerSentEventMessage]:
    """The stream's messages: ``id`` is the journal sequence number, ``event`` the event's
    kind (unless ``named`` is off, for ``EventSource.onmessage``), ``data`` its JSON."""
    yield ServerSentEventMessage(data=None, retry=2000, comment="dockyard events")
    async for entry in hub.follow(after, deployment=deployment, tags=tags):
        if entry is None:
            yield ServerSentEventMessage(data=None, comment="heartbeat")
        else:
            yield ServerSentEventMessage(
                data=hub.encode(entry).decode(),
                event=entry.kind if named else None,
                id=entry.id,
            )


DeploymentFilter = Annotated[
    str | None,
    QueryParameter(pattern=ID_RE.pattern, description="only this deployment's events"),
]
#: Operations whose query takes a filter per registered event tag (listed in the schema).
TAG_FILTERED_OPERATIONS = ("listAllEvents", "streamEvents")
PAGE_PARAMS = ("after", "limit", "deployment", "newest")
STREAM_PARAMS = ("after", "deployment")


class EventRoutes(Controller):
    """The event journal, as a page or a live stream."""

    path = "/v1/events"
    tags = ["events"]
    opt = {"scope": "read"}

    @get("/", operation_id="listAllEvents", summary="Journal entries after a sequence number")
    async def page(
        self,
        request: Request[Any, Any, Any],
        state: State,
        after: Annotated[int, QueryParameter(ge=0, le=2**53 - 1)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=5000)] = 1000,
        deployment: DeploymentFilter = None,
        newest: Annotated[
            bool, QueryParameter(description="the last `limit` entries instead of the first")
        ] = False,
    ) -> Response[list[StreamEvent]]:
        hub = _hub(state)
        entries = hub.journal.read(
            after,
            deployment=check_id("deployment", deployment),
            tags=tag_filters(request, hub.tag_names, PAGE_PARAMS),
            limit=limit,
            newest=newest,
        )
        names = hub.tag_names
        return Response(
            msgspec.json.encode([wire(entry, names) for entry in entries]),
            media_type="application/json",
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
                tag_filters(request, hub.tag_names, STREAM_PARAMS),
            ),
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
