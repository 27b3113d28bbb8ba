"""The default state store: one SQLite file shared by every controller process on the host.

WAL journal, ``synchronous=FULL``, a busy timeout and ``BEGIN IMMEDIATE`` for every write, so
a transaction is either on disk whole or not at all, even when the writer is killed, and two
processes never lease the same host port. The schema is versioned (``PRAGMA user_version``)
and migrated step by step, one transaction per step. Rows keep the msgspec models as JSON next
to the columns that are queried.

Host-port lease owners follow one convention: ``<deployment id>`` or ``<deployment id>:<rest>``
(the deployer uses ``<deployment id>:<color>``), so deleting a deployment frees its ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from dockyard.core.errors import (
    Conflict,
    DockyardError,
    IllegalTransition,
    NotFound,
    PortPoolExhausted,
    StoreError,
    ValidationError,
)
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import (
    Color,
    Deployment,
    DeploymentSpec,
    Event,
    Revision,
    Slot,
    SlotState,
    now,
)
from dockyard.core.states import is_legal
from dockyard.core.store import (
    MAX_STATUS_PAGE,
    RECORD_NAME,
    DeploymentStatus,
    PluginRecord,
    StateStore,
    StatusFilter,
    StatusPage,
)

if TYPE_CHECKING:
    from dockyard.core.config import Settings
    from dockyard.core.plugins import Registrar

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_FILENAME = "dockyard.db"
#: First status pages (one per filter) kept for a repeated read with no write in between,
#: the oldest dropped first; only pages of at most ``KEPT_PAGE_LIMIT`` deployments are kept
#: (what a status screen polls), so what is kept stays small.
STATUS_PAGES_KEPT = 4
KEPT_PAGE_LIMIT = 100
DEFAULT_PORT_RANGE = (40000, 41000)
DEFAULT_BUSY_TIMEOUT_S = 15.0
#: ``PRAGMA application_id`` of a dockyard database ("DKYD"), to refuse a stranger's file.
APPLICATION_ID = 0x444B5944

# ---------------------------------------------------------------- schema
#: Migration steps, applied in order, each in its own transaction; step ``n`` (1-based) takes
#: the database from ``user_version`` ``n - 1`` to ``n``. Append steps, never edit old ones.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE deployments (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            generation INTEGER NOT NULL CHECK (generation >= 1)
        )""",
        """CREATE TABLE revisions (
            id TEXT PRIMARY KEY,
            deployment_id TEXT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX revisions_by_deployment ON revisions(deployment_id, created_at)",
        """CREATE TABLE slots (
            deployment_id TEXT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
            color TEXT NOT NULL CHECK (color IN ('blue', 'green')),
            state TEXT NOT NULL,
            updated_at REAL NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (deployment_id, color)
        )""",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            deployment_id TEXT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            at REAL NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX events_by_deployment ON events(deployment_id, seq)",
        """CREATE TRIGGER events_are_never_updated BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TRIGGER events_go_only_with_their_deployment BEFORE DELETE ON events
        WHEN EXISTS (SELECT 1 FROM deployments WHERE id = OLD.deployment_id)
        BEGIN SELECT RAISE(ABORT, 'events are deleted only with their deployment'); END""",
        """CREATE TABLE port_leases (
            port INTEGER PRIMARY KEY CHECK (port BETWEEN 1 AND 65535),
            owner TEXT NOT NULL CHECK (owner <> ''),
            leased_at REAL NOT NULL
        )""",
        "CREATE INDEX port_leases_by_owner ON port_leases(owner)",
    ),
    (
        # 2: evaluations (plugins/evaluation), kept apart from their ephemeral deployments.
        """CREATE TABLE evaluations (
            id TEXT PRIMARY KEY,
            batch_id TEXT,
            state TEXT NOT NULL,
            finished INTEGER NOT NULL CHECK (finished IN (0, 1)),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX evaluations_by_finished ON evaluations(finished, created_at)",
        "CREATE INDEX evaluations_by_batch ON evaluations(batch_id, created_at)",
    ),
    (
        # 3: records plugins own, namespaced by plugin; the evaluations of step 2 move in
        # (namespace "evaluation", their queried fields as labels) and their table goes.
        """CREATE TABLE plugin_records (
            namespace TEXT NOT NULL CHECK (namespace <> ''),
            key TEXT NOT NULL CHECK (key <> ''),
            labels TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (namespace, key)
        )""",
        "CREATE INDEX plugin_records_by_age ON plugin_records(namespace, created_at)",
        "CREATE INDEX plugin_records_by_update ON plugin_records(namespace, updated_at)",
        """INSERT INTO plugin_records (namespace, key, labels, created_at, updated_at, value)
        SELECT 'evaluation', id,
            json_patch(
                json_object(
                    'state', state,
                    'finished', CASE finished WHEN 1 THEN 'true' ELSE 'false' END
                ),
                CASE WHEN batch_id IS NULL THEN '{}' ELSE json_object('batch_id', batch_id) END
            ),
            created_at, updated_at, body
        FROM evaluations ORDER BY created_at, rowid""",
        "DROP TABLE evaluations",
    ),
]

_ENCODER = msgspec.json.Encoder()
_SPEC = msgspec.json.Decoder(DeploymentSpec)
_REVISION = msgspec.json.Decoder(Revision)
_SLOT = msgspec.json.Decoder(Slot)
_SLOTS = msgspec.json.Decoder(list[Slot])
_EVENT = msgspec.json.Decoder(Event)
_BODY = msgspec.json.Decoder(dict[str, Any])
_LABELS = msgspec.json.Decoder(dict[str, str])
_RECORD_COLUMNS = "namespace, key, labels, created_at, updated_at, value"


class _SpecHead(msgspec.Struct):
    """The two spec fields the status list shows; the rest of the spec is skipped."""

    repo: str
    ref: str | None = None


_SPEC_HEAD = msgspec.json.Decoder(_SpecHead)


def schema_version() -> int:
    """The schema version this code writes: the number of migration steps."""
    return len(MIGRATIONS)


def lease_prefix(deployment_id: str) -> str:
    """What every lease owner of ``deployment_id`` other than the bare id starts with."""
    return f"{deployment_id}:"


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """One transaction: ``BEGIN IMMEDIATE`` (the write lock first) unless ``mode`` says
    otherwise; committed on success, rolled back on any exception."""
    conn.execute(f"BEGIN {mode}")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLITE_BUSY or SQLITE_LOCKED (another connection holds a lock)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _decode(decoder: msgspec.json.Decoder[T], body: str | bytes, what: str) -> T:
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StoreError(f"stored {what} cannot be decoded: {exc}") from None


def _encode(value: Any, what: str) -> str:
    try:
        return _ENCODER.encode(value).decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValidationError(f"{what} cannot be stored as JSON: {exc}") from None


class SqliteStore(StateStore):
    """:class:`StateStore` over one SQLite file.

    One connection per store, used from worker threads (``asyncio.to_thread``) under a lock,
    so concurrent tasks are serialized in-process; SQLite's file locks (``BEGIN IMMEDIATE``
    plus ``busy_timeout``) serialize writers of other processes.

    :param path: the database file; its directory is created (mode 0700) when missing.
    :param port_range: the host-port pool, both ends included.
    :param busy_timeout_s: how long a write waits for another process's transaction.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        start, end = port_range
        if not 1 <= start <= end <= 65535:
            raise ValueError(f"invalid port range {start}-{end}")
        if busy_timeout_s <= 0:
            raise ValueError("busy_timeout_s must be positive")
        self.path = Path(path)
        self.port_range = (int(start), int(end))
        self.busy_timeout_s = float(busy_timeout_s)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        #: Status pages read lately: query -> (the store's version when read, the page).
        self._status_pages: dict[tuple[Any, ...], tuple[tuple[int, int], StatusPage]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> SqliteStore:
        """The store of ``settings``: ``<data_dir>/dockyard.db`` over the configured port
        pool; ``[plugins.sqlite] busy_timeout_s`` overrides the busy timeout."""
        data = settings.data_path
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        options = settings.plugin_options("sqlite")
        return cls(
            data / DB_FILENAME,
            port_range=(settings.port_range_start, settings.port_range_end),
            busy_timeout_s=float(options.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S)),
        )

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r}, port_range={self.port_range!r})"

    # -- plumbing -------------------------------------------------------------------------
    async def _run(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in a worker thread under the lock; sqlite errors become
        StoreError naming ``action``."""
        return await asyncio.to_thread(self._locked, action, fn)

    def _locked(self, action: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"cannot {action}: the state store is not open")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                raise StoreError(f"state store failed to {action}: {exc}") from exc

    @staticmethod
    def _version(conn: sqlite3.Connection) -> tuple[int, int]:
        """What changes whenever the database does: the rows this connection changed
        (``total_changes``) and ``PRAGMA data_version`` (bumped by every commit of another
        connection, another process's included). Under the lock; no disk I/O."""
        return conn.total_changes, conn.execute("PRAGMA data_version").fetchone()[0]

    def _cached_status(self, key: tuple[Any, ...]) -> StatusPage | None:
        """The page read for ``key``, when nothing was written since; on the event loop,
        so only when the lock is free at once (a busy store goes the thread's way)."""
        cached = self._status_pages.get(key)
        if cached is None or not self._lock.acquire(blocking=False):
            return None
        try:
            if self._conn is None:
                return None
            return cached[1] if cached[0] == self._version(self._conn) else None
        except sqlite3.Error:
            return None
        finally:
            self._lock.release()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            # Created private before SQLite opens it; -wal and -shm inherit its mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_s,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # used from worker threads, always under self._lock
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            mode = self._use_wal(conn)
            if mode != "wal":
                raise StoreError(f"{self.path} cannot use WAL mode (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            if conn.execute("PRAGMA foreign_keys").fetchone()[0] != 1:
                raise StoreError("this SQLite build does not enforce foreign keys")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL and return the journal mode. Several processes switching a new file
        at once get SQLITE_BUSY without the busy handler being called: retry until the busy
        timeout."""
        deadline = time.monotonic() + self.busy_timeout_s
        pause = 0.002
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        """The file's schema version; StoreError for a stranger's file or a newer schema."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{self.path} is not a dockyard database")
        if version > schema_version():
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this dockyard "
                f"understands ({schema_version()}); upgrade dockyard or use another data_dir",
                schema_version=version,
                supported=schema_version(),
            )
        return version

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the missing migration steps in order, one ``BEGIN IMMEDIATE`` transaction
        each; the version is read again under the write lock, so processes opening the same
        file at once never apply a step twice."""
        target = schema_version()
        if self._schema_version(conn) == target:
            return  # up to date: no write lock needed
        while True:
            with _transaction(conn):
                version = self._schema_version(conn)
                if version == target:
                    return
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            log.info("migrated %s to schema version %d", self.path, version + 1)

    # -- lifecycle ------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (creating the file if needed) and migrate the schema."""
        if self._conn is not None:
            return

        def connect() -> None:
            with self._lock:
                if self._conn is not None:
                    return
                try:
                    self._conn = self._connect()
                    self._status_pages.clear()
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot open the state store {self.path}: {exc}") from exc
                except OSError as exc:
                    raise StoreError(f"cannot create the state store {self.path}: {exc}") from exc

        await asyncio.to_thread(connect)

    async def close(self) -> None:
        """Close the connection; closing twice is harmless."""

        def disconnect() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
                self._status_pages.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except sqlite3.Error as exc:
                        raise StoreError(f"cannot close the state store: {exc}") from exc

        await asyncio.to_thread(disconnect)

    async def ping(self) -> bool:
        """Whether ``SELECT 1`` answers."""
        try:
            row = await self._run("answer a ping", lambda c: c.execute("SELECT 1").fetchone())
        except DockyardError:
            return False
        return row is not None and row[0] == 1

    # -- deployments ----------------------------------------------------------------------
    @staticmethod
    def _deployment(row: Sequence[Any]) -> Deployment:
        spec_json, created_at, updated_at, generation = row
        return Deployment(
            spec=_decode(_SPEC, spec_json, "deployment spec"),
            created_at=created_at,
            updated_at=updated_at,
            generation=generation,
        )

    async def create_deployment(self, spec: DeploymentSpec) -> Deployment:
        """Store ``spec`` at generation 1 with two IDLE slots; Conflict if its id exists."""
        at = now()
        deployment = Deployment(spec=spec, created_at=at, updated_at=at, generation=1)
        spec_json = _encode(spec, "deployment spec")
        slots = [
            (color, _encode(Slot(deployment_id=spec.id, color=color, updated_at=at), "slot"))
            for color in Color
        ]

        def write(conn: sqlite3.Connection) -> Deployment:
            with _transaction(conn):
                if conn.execute("SELECT 1 FROM deployments WHERE id = ?", (spec.id,)).fetchone():
                    raise Conflict(f"deployment {spec.id!r} exists already", id=spec.id)
                conn.execute(
                    "INSERT INTO deployments (id, spec, created_at, updated_at, generation)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (spec.id, spec_json, at, at, deployment.generation),
                )
                conn.executemany(
                    "INSERT INTO slots (deployment_id, color, state, updated_at, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(spec.id, str(c), str(SlotState.IDLE), at, body) for c, body in slots],
                )
            return deployment

        return await self._run("create a deployment", write)

    async def update_deployment(self, spec: DeploymentSpec) -> Deployment:
        """Replace the spec and bump the generation; NotFound if the id is unknown."""
        spec_json = _encode(spec, "deployment spec")

        def write(conn: sqlite3.Connection) -> Deployment:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT created_at, generation FROM deployments WHERE id = ?", (spec.id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"deployment {spec.id!r} does not exist", id=spec.id)
                created_at, generation = row
                at = now()
                conn.execute(
                    "UPDATE deployments SET spec = ?, updated_at = ?, generation = ? WHERE id = ?",
                    (spec_json, at, generation + 1, spec.id),
                )
            return Deployment(
                spec=spec, created_at=created_at, updated_at=at, generation=generation + 1
            )

        return await self._run("update a deployment", write)

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        """One deployment, or None."""

        def read(conn: sqlite3.Connection) -> Deployment | None:
            row = conn.execute(
                "SELECT spec, created_at, updated_at, generation FROM deployments WHERE id = ?",
                (deployment_id,),
            ).fetchone()
            return None if row is None else self._deployment(row)

        return await self._run("read a deployment", read)

    async def list_deployments(self) -> list[Deployment]:
        """Every deployment, ordered by id."""

        def read(conn: sqlite3.Connection) -> list[Deployment]:
            rows = conn.execute(
                "SELECT spec, created_at, updated_at, generation FROM deployments ORDER BY id"
            ).fetchall()
            return [self._deployment(row) for row in rows]

        return await self._run("list deployments", read)

    async def list_status(
        self,
        *,
        after: str | None = None,
        limit: int = MAX_STATUS_PAGE,
        where: StatusFilter | None = None,
    ) -> StatusPage:
        """One page of the status list in three indexed reads of one snapshot: the page's
        deployments (one more, to know whether a next page exists), their slots, and the
        commits of the slots' revisions. Specs are only skimmed for ``repo`` and ``ref``."""
        limit = max(0, min(int(limit), MAX_STATUS_PAGE))
        where = where or StatusFilter()
        clauses, args = [], []
        if after is not None:
            clauses.append("d.id > ?")
            args.append(after)
        if where.state is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM slots w WHERE w.deployment_id = d.id AND w.state = ?)"
            )
            args.append(str(SlotState(where.state)))
        for label, present in ((where.with_label, True), (where.without_label, False)):
            if label is not None:
                test = "IS NOT NULL" if present else "IS NULL"
                clauses.append(f"json_type(d.spec, '$.labels.' || json_quote(?)) {test}")
                args.append(label)
        clause = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        page_query = (
            "SELECT d.id, d.spec, d.created_at, d.updated_at, d.generation"
            f" FROM deployments d{clause} ORDER BY d.id LIMIT ?"
        )

        key = (limit, where.state, where.with_label, where.without_label)
        kept = after is None and limit <= KEPT_PAGE_LIMIT
        cached = self._cached_status(key) if kept else None
        if cached is not None:
            return cached

        def read(conn: sqlite3.Connection) -> StatusPage:
            version = self._version(conn)
            page = self._read_status(conn, page_query, args, limit)
            if kept:
                self._status_pages.pop(key, None)
                if len(self._status_pages) >= STATUS_PAGES_KEPT:
                    self._status_pages.pop(next(iter(self._status_pages)))
                self._status_pages[key] = (version, page)
            return page

        return await self._run("list the status", read)

    @staticmethod
    def _read_status(
        conn: sqlite3.Connection, page_query: str, args: list[Any], limit: int
    ) -> StatusPage:
        """The status page of ``page_query`` (its ``args``, then ``limit + 1``), read in
        one snapshot."""
        with _transaction(conn, "DEFERRED"):  # one snapshot for the whole page
            rows = conn.execute(page_query, (*args, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            if not rows:
                return StatusPage(deployments=[])
            slots: dict[str, list[Slot]] = {row[0]: [] for row in rows}
            found = [
                body
                for deployment_id, body in conn.execute(
                    "SELECT deployment_id, body FROM slots"
                    " WHERE deployment_id BETWEEN ? AND ? ORDER BY deployment_id, color",
                    (rows[0][0], rows[-1][0]),
                )
                if deployment_id in slots
            ]
            # One decode call for the page's slots (a JSON array of the stored bodies).
            for slot in _decode(_SLOTS, "[" + ",".join(found) + "]", "slots"):
                slots[slot.deployment_id].append(slot)
            wanted = sorted(
                {s.revision_id for group in slots.values() for s in group if s.revision_id}
            )
            commits: dict[str, str] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                commits.update(
                    conn.execute(
                        "SELECT id, json_extract(body, '$.commit') FROM revisions"
                        f" WHERE id IN ({marks})",
                        chunk,
                    ).fetchall()
                )
        page = []
        for id_, spec, created_at, updated_at, generation in rows:
            head = _decode(_SPEC_HEAD, spec, "deployment spec")
            mine = slots[id_]
            page.append(
                DeploymentStatus(
                    id=id_,
                    repo=head.repo,
                    ref=head.ref,
                    generation=generation,
                    created_at=created_at,
                    updated_at=updated_at,
                    slots=mine,
                    commits={
                        s.revision_id: commits[s.revision_id]
                        for s in mine
                        if s.revision_id and commits.get(s.revision_id)
                    },
                )
            )
        return StatusPage(deployments=page, cursor=page[-1].id if more else None)

    async def delete_deployment(self, deployment_id: str) -> None:
        """Remove the deployment, its slots, revisions and events (cascade) and every lease
        owned by ``<id>`` or ``<id>:...``. Deleting an unknown deployment is not an error
        (its stray leases are freed all the same)."""
        prefix = lease_prefix(deployment_id)

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))
                conn.execute(
                    "DELETE FROM port_leases WHERE owner = ? OR substr(owner, 1, ?) = ?",
                    (deployment_id, len(prefix), prefix),
                )

        await self._run("delete a deployment", write)

    # -- revisions ------------------------------------------------------------------------
    async def add_revision(self, revision: Revision) -> Revision:
        """Store an immutable revision; Conflict if its id exists, NotFound if its
        deployment does not."""
        body = _encode(revision, "revision")

        def write(conn: sqlite3.Connection) -> Revision:
            with _transaction(conn):
                if conn.execute("SELECT 1 FROM revisions WHERE id = ?", (revision.id,)).fetchone():
                    raise Conflict(f"revision {revision.id!r} exists already", id=revision.id)
                if not conn.execute(
                    "SELECT 1 FROM deployments WHERE id = ?", (revision.deployment_id,)
                ).fetchone():
                    raise NotFound(
                        f"deployment {revision.deployment_id!r} does not exist",
                        id=revision.deployment_id,
                    )
                conn.execute(
                    "INSERT INTO revisions (id, deployment_id, created_at, body)"
                    " VALUES (?, ?, ?, ?)",
                    (revision.id, revision.deployment_id, revision.created_at, body),
                )
            return revision

        return await self._run("add a revision", write)

    async def get_revision(self, revision_id: str) -> Revision | None:
        """One revision, or None."""

        def read(conn: sqlite3.Connection) -> Revision | None:
            row = conn.execute("SELECT body FROM revisions WHERE id = ?", (revision_id,)).fetchone()
            return None if row is None else _decode(_REVISION, row[0], "revision")

        return await self._run("read a revision", read)

    async def list_revisions(self, deployment_id: str) -> list[Revision]:
        """A deployment's revisions, oldest first (insertion order breaks ties); empty for
        an unknown deployment."""

        def read(conn: sqlite3.Connection) -> list[Revision]:
            rows = conn.execute(
                "SELECT body FROM revisions WHERE deployment_id = ? ORDER BY created_at, rowid",
                (deployment_id,),
            ).fetchall()
            return [_decode(_REVISION, row[0], "revision") for row in rows]

        return await self._run("list revisions", read)

    # -- slots ----------------------------------------------------------------------------
    async def get_slot(self, deployment_id: str, color: Color) -> Slot:
        """A deployment's slot; NotFound if the deployment does not exist."""
        color = Color(color)

        def read(conn: sqlite3.Connection) -> Slot:
            row = conn.execute(
                "SELECT body FROM slots WHERE deployment_id = ? AND color = ?",
                (deployment_id, str(color)),
            ).fetchone()
            if row is None:
                raise NotFound(f"deployment {deployment_id!r} does not exist", id=deployment_id)
            return _decode(_SLOT, row[0], "slot")

        return await self._run("read a slot", read)

    async def list_slots(self, deployment_id: str) -> list[Slot]:
        """Both slots, blue first; empty for an unknown deployment."""

        def read(conn: sqlite3.Connection) -> list[Slot]:
            rows = conn.execute(
                "SELECT body FROM slots WHERE deployment_id = ?"
                " ORDER BY CASE color WHEN 'blue' THEN 0 ELSE 1 END",
                (deployment_id,),
            ).fetchall()
            return [_decode(_SLOT, row[0], "slot") for row in rows]

        return await self._run("list slots", read)

    async def save_slot(self, slot: Slot, event: Event | None = None) -> Slot:
        """Write ``slot`` and append ``event`` in one ``BEGIN IMMEDIATE`` transaction.

        Checked against the stored slot, under the write lock: a different state must be a
        legal move (a move to FAILED needs a reason), the same state is a field update; when
        ``event.from_state`` is set it must equal the stored state (the caller's read is not
        stale) and ``event.to_state``, when set, must equal ``slot.state``. A change of state
        needs an event: a save without one only updates fields of an unchanged state (so a
        stale field update can never move a slot). IllegalTransition otherwise, NotFound if
        the deployment does not exist. The stored event gets its ``seq``.
        """
        return (await self.save_slots([(slot, event)]))[0]

    async def save_slots(self, changes: Sequence[tuple[Slot, Event | None]]) -> list[Slot]:
        """Write several slots (and their events) in ONE ``BEGIN IMMEDIATE`` transaction,
        each checked as :meth:`save_slot` checks one, in order: all are written or none
        (a promotion moves the old slot to DRAINING and the new one to PROMOTED at once)."""
        rows = []
        for slot, event in changes:
            self._check_event(slot, event)
            rows.append(
                (slot, event, _encode(slot, "slot"), self._event_row(event) if event else None)
            )

        def write(conn: sqlite3.Connection) -> list[Slot]:
            with _transaction(conn):
                for slot, event, body, event_row in rows:
                    row = conn.execute(
                        "SELECT state FROM slots WHERE deployment_id = ? AND color = ?",
                        (slot.deployment_id, str(slot.color)),
                    ).fetchone()
                    if row is None:
                        raise NotFound(
                            f"deployment {slot.deployment_id!r} does not exist",
                            id=slot.deployment_id,
                        )
                    self._check_move(slot, SlotState(row[0]), event)
                    conn.execute(
                        "UPDATE slots SET state = ?, updated_at = ?, body = ?"
                        " WHERE deployment_id = ? AND color = ?",
                        (
                            str(slot.state),
                            slot.updated_at,
                            body,
                            slot.deployment_id,
                            str(slot.color),
                        ),
                    )
                    if event is not None and event_row is not None:
                        event.seq = self._insert_event(conn, event_row)
            return [slot for slot, *_ in rows]

        return await self._run("save slots", write)

    @staticmethod
    def _check_event(slot: Slot, event: Event | None) -> None:
        if event is None:
            return
        if event.deployment_id != slot.deployment_id:
            raise ValidationError(
                f"event of {event.deployment_id!r} saved with a slot of {slot.deployment_id!r}"
            )
        if event.color is not None and event.color != slot.color:
            raise ValidationError(f"event of the {event.color} slot saved with {slot.color}")
        if event.to_state is not None and event.to_state != slot.state:
            raise ValidationError(
                f"event says {event.to_state} but the slot is saved as {slot.state}"
            )

    @staticmethod
    def _check_move(slot: Slot, stored: SlotState, event: Event | None) -> None:
        where = f"slot {slot.deployment_id}/{slot.color}"
        if event is not None and event.from_state is not None and event.from_state != stored:
            raise IllegalTransition(
                f"{where} is {stored}, not {event.from_state} as the caller read it",
                src=str(stored),
                dst=str(slot.state),
                stale=True,
            )
        if slot.state == stored:
            return
        if event is None:
            raise IllegalTransition(
                f"{where} is {stored}: a move to {slot.state} needs an event",
                src=str(stored),
                dst=str(slot.state),
                stale=True,
            )
        if not is_legal(stored, slot.state):
            raise IllegalTransition(
                f"{where} cannot go from {stored} to {slot.state}",
                src=str(stored),
                dst=str(slot.state),
            )
        if slot.state is SlotState.FAILED and not slot.reason:
            raise IllegalTransition(f"{where}: a move to FAILED needs a reason")

    # -- events ---------------------------------------------------------------------------
    @staticmethod
    def _event_row(event: Event) -> tuple[str, str, float, str]:
        body = _encode(msgspec.structs.replace(event, seq=None), "event")
        return (event.deployment_id, event.kind, event.at, body)

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, row: tuple[str, str, float, str]) -> int:
        cursor = conn.execute(
            "INSERT INTO events (deployment_id, kind, at, body) VALUES (?, ?, ?, ?)", row
        )
        seq = cursor.lastrowid
        assert seq is not None
        return seq

    async def append_event(self, event: Event) -> Event:
        """Append ``event`` (any ``seq`` it carries is ignored) and return it with its
        sequence number; NotFound if its deployment does not exist."""
        row = self._event_row(event)

        def write(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                if not conn.execute(
                    "SELECT 1 FROM deployments WHERE id = ?", (event.deployment_id,)
                ).fetchone():
                    raise NotFound(
                        f"deployment {event.deployment_id!r} does not exist",
                        id=event.deployment_id,
                    )
                return self._insert_event(conn, row)

        seq = await self._run("append an event", write)
        return msgspec.structs.replace(event, seq=seq)

    async def list_events(
        self, deployment_id: str, *, after: int = 0, limit: int = 1000
    ) -> list[Event]:
        """Up to ``limit`` events of the deployment with ``seq > after``, oldest first."""
        if limit <= 0:
            return []

        def read(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, body FROM events WHERE deployment_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (deployment_id, after, limit),
            ).fetchall()
            return [
                msgspec.structs.replace(_decode(_EVENT, body, "event"), seq=seq)
                for seq, body in rows
            ]

        return await self._run("list events", read)

    # -- port leases ----------------------------------------------------------------------
    async def lease_port(self, owner: str) -> int:
        """Lease the lowest free port of the pool to ``owner`` (``<deployment id>`` or
        ``<deployment id>:<anything>``); PortPoolExhausted when every port is leased."""
        if not isinstance(owner, str) or not owner:
            raise ValidationError("a port lease needs a non-empty owner")
        start, end = self.port_range

        def write(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                # The lowest free port is the start of the range or right after a leased one.
                row = conn.execute(
                    "SELECT candidate FROM ("
                    "  SELECT ? AS candidate"
                    "  UNION ALL SELECT port + 1 FROM port_leases WHERE port + 1 BETWEEN ? AND ?"
                    ") WHERE candidate NOT IN (SELECT port FROM port_leases)"
                    " ORDER BY candidate LIMIT 1",
                    (start, start, end),
                ).fetchone()
                if row is None:
                    raise PortPoolExhausted(
                        f"every host port of {start}-{end} is leased", start=start, end=end
                    )
                port = int(row[0])
                conn.execute(
                    "INSERT INTO port_leases (port, owner, leased_at) VALUES (?, ?, ?)",
                    (port, owner, now()),
                )
            return port

        return await self._run("lease a port", write)

    async def release_port(self, port: int) -> None:
        """Return ``port`` to the pool; a free port is left as it is."""

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM port_leases WHERE port = ?", (int(port),))

        await self._run("release a port", write)

    async def list_leases(self) -> dict[int, str]:
        """Every leased port and its owner, by port."""

        def read(conn: sqlite3.Connection) -> dict[int, str]:
            rows = conn.execute("SELECT port, owner FROM port_leases ORDER BY port").fetchall()
            return {int(port): str(owner) for port, owner in rows}

        return await self._run("list port leases", read)

    # -- plugin records -------------------------------------------------------------------
    @staticmethod
    def _record(row: Sequence[Any]) -> PluginRecord:
        namespace, key, labels, created_at, updated_at, value = row
        return PluginRecord(
            namespace=namespace,
            key=key,
            labels=_decode(_LABELS, labels, "plugin record"),
            created_at=created_at,
            updated_at=updated_at,
            value=_decode(_BODY, value, "plugin record"),
        )

    async def put_record(self, record: PluginRecord) -> PluginRecord:
        """Insert or replace the record (``created_at`` of an existing one is kept)."""
        try:
            record = msgspec.convert(msgspec.to_builtins(record), PluginRecord)
        except msgspec.ValidationError as exc:
            raise ValidationError(f"plugin record: {exc}") from None
        value = _encode(record.value, "plugin record")
        labels = _encode(record.labels, "plugin record")

        def write(conn: sqlite3.Connection) -> PluginRecord:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT created_at FROM plugin_records WHERE namespace = ? AND key = ?",
                    (record.namespace, record.key),
                ).fetchone()
                created_at = row[0] if row else record.created_at
                conn.execute(
                    "INSERT OR REPLACE INTO plugin_records"
                    " (namespace, key, labels, created_at, updated_at, value)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (record.namespace, record.key, labels, created_at, record.updated_at, value),
                )
            return msgspec.structs.replace(record, created_at=created_at)

        return await self._run("save a plugin record", write)

    async def get_record(self, namespace: str, key: str) -> PluginRecord | None:
        """One record, or None."""

        def read(conn: sqlite3.Connection) -> PluginRecord | None:
            row = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM plugin_records WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
            return None if row is None else self._record(row)

        return await self._run("read a plugin record", read)

    async def list_records(
        self,
        namespace: str,
        *,
        labels: Mapping[str, str] | None = None,
        updated_before: float | None = None,
    ) -> list[PluginRecord]:
        """A namespace's records, oldest first, filtered by labels and age."""
        where, args = ["namespace = ?"], [namespace]
        for name, value in sorted((labels or {}).items()):
            if not re.match(RECORD_NAME, name):
                raise ValidationError(f"labels: {name!r} is not a label name", field="labels")
            where.append("json_extract(labels, ?) = ?")
            args.extend([f'$."{name}"', value])
        if updated_before is not None:
            where.append("updated_at < ?")
            args.append(updated_before)

        def read(conn: sqlite3.Connection) -> list[PluginRecord]:
            rows = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM plugin_records"
                f" WHERE {' AND '.join(where)} ORDER BY created_at, rowid",
                args,
            ).fetchall()
            return [self._record(row) for row in rows]

        return await self._run("list plugin records", read)

    async def delete_record(self, namespace: str, key: str) -> None:
        """Remove the record; an unknown one is not an error."""

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "DELETE FROM plugin_records WHERE namespace = ? AND key = ?",
                    (namespace, key),
                )

        await self._run("delete a plugin record", write)


@hookimpl
def dockyard_register_stores(register: Registrar[Any]) -> None:
    """Register the SQLite store as ``sqlite``."""
    register("sqlite", SqliteStore.from_settings)
