"""Garbage collection: what dockyard keeps on disk, and for how long.

Five kinds of things pile up on a host that deploys and evaluates round after round:

* ``evaluations``: stored evaluation records and their results (plugin records in the
  state store; the kind is the evaluation plugin's, registered through the
  ``dockyard_register_gc_kinds`` hook like any plugin's kind);
* ``events``: the event journal's entries (``<data_dir>/events.sqlite3``) of deployments
  that no longer exist (finished deployments, ephemeral evaluation deployments);
* ``build_logs``: ``<data_dir>/builds/<deployment>/`` of deployments that no longer exist;
* ``sources``: cached checkouts (``<data_dir>/sources/<repo>/<commit>``) and the source
  views of ``image`` mode (``<data_dir>/views/<key>``);
* ``images``: the images this dockyard built (labels ``io.dockyard.build.inputs`` and
  its ``io.dockyard.instance``);
* ``networks`` (runtimes that make networks): the engine networks the runtime lists
  (``Runtime.list_networks``):
  an agent network per gateway (``dockyard-agents-gw-<hash>``, left when the gateway
  changes) and a build network a killed build left (``dockyard-build-<build>``). One no
  container has joined, not for the configured ``agent_gateway`` and older than the grace
  period is removed on every pass (no retention settings: an unused one costs a bridge and
  firewall rules, and the runtime makes it again when needed).

Each kind but ``networks`` has a retention (:class:`Retention`, from the
``gc_<kind>_max_age_days`` and ``gc_<kind>_max_mb`` settings): entries older than the age
go, then the oldest until the kind fits the size. Never removed, whatever the retention
says: what an existing deployment uses (its build logs and journal entries, any slot's
revision's checkout, view and image), what a plugin's running work uses (a running
evaluation's record, journal entries and image: the kind's ``mark_used``), the configured
base images and gateway's network, a network a container joined, and anything younger
than the grace period (a build or fetch under way has not reached a slot yet).

:class:`GarbageCollector` runs one pass (``dockyard gc [--dry-run]``); :class:`GcSchedule`
runs it periodically in the server and keeps the disk use of each kind for ``/v1/healthz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pluggy

from dockyard.core.builds import LABEL_INPUTS, LOGS_DIR
from dockyard.core.config import Settings
from dockyard.core.errors import DockyardError
from dockyard.core.models import Model
from dockyard.core.policy import parse_gateway
from dockyard.core.runtime import LABEL_INSTANCE, LABEL_MANAGED, Runtime
from dockyard.core.store import StateStore

log = logging.getLogger(__name__)

#: The core's kinds; plugins add theirs (the evaluation plugin: ``evaluations``).
KINDS = ("events", "build_logs", "sources", "images", "networks")
MIB = 1024 * 1024
DAY_S = 86400.0
#: Nothing younger than this is removed (at least; builds and fetches may take longer).
GRACE_S = 3600.0
#: Seconds between refreshes of the disk use ``/v1/healthz`` shows.
USAGE_REFRESH_S = 300.0
#: The journal's file under the data directory (``api/events.py``).
JOURNAL_FILE = "events.sqlite3"


class Retention(Model):
    """How long (``max_age_s``) and how much (``max_bytes``) of a kind is kept; None: no
    limit."""

    max_age_s: float | None = None
    max_bytes: int | None = None

    @classmethod
    def of(cls, days: float, mb: float) -> Retention:
        """From ``max_age_days`` and ``max_mb`` as settings say them (0: no such limit)."""
        return cls(
            max_age_s=float(days) * DAY_S if days else None,
            max_bytes=int(float(mb) * MIB) if mb else None,
        )


def retention_of(settings: Settings, kind: str) -> Retention:
    """The retention ``gc_<kind>_max_age_days`` and ``gc_<kind>_max_mb`` say (0: no
    such limit). A plugin's kind without such settings (or with deprecated ones, unset)
    reads ``gc_max_age_days`` and ``gc_max_mb`` from the plugin's table,
    ``[plugins.<kind>]``; a kind may bring its own (``Kind.retention``) instead."""
    options = settings.plugin_options(kind)
    days = getattr(settings, f"gc_{kind}_max_age_days", msgspec.UNSET)
    mb = getattr(settings, f"gc_{kind}_max_mb", msgspec.UNSET)
    if days is msgspec.UNSET:
        days = options.get("gc_max_age_days", 0)
    if mb is msgspec.UNSET:
        mb = options.get("gc_max_mb", 0)
    return Retention.of(days, mb)


def grace_of(settings: Settings) -> float:
    """The grace period: a build and a fetch must fit in it."""
    return max(GRACE_S, settings.build_timeout_s + settings.fetch_timeout_s)


@dataclass
class Item:
    """One removable thing of a kind: its name, size, when it was last written or used,
    whether something active uses it, and what its kind needs to remove it."""

    name: str
    bytes: int
    at: float
    in_use: bool = False
    handle: Any = None


class Removal(Model):
    """Something a pass removed (or, dry, would remove) and why: ``age`` or ``size``."""

    kind: str
    name: str
    bytes: int
    reason: str


class KindUsage(Model):
    """Disk use of one kind: bytes and entries (``in_use`` of them are protected)."""

    bytes: int = 0
    count: int = 0
    in_use: int = 0


class DiskUsage(Model):
    """Disk use of every kind, as of ``at`` (None: not measured yet)."""

    at: float | None = None
    kinds: dict[str, KindUsage] = {}
    error: str | None = None


class GcReport(Model):
    """One pass: what went (or would go), the bytes freed, the use after, what failed."""

    dry_run: bool
    at: float
    removed: list[Removal]
    freed_bytes: int
    usage: dict[str, KindUsage]
    errors: list[str] = []


def choose(
    items: list[Item], retention: Retention, now: float, grace_s: float = 0.0
) -> list[tuple[Item, str]]:
    """What retention removes: unused items older than ``max_age_s`` (reason ``age``), then
    the oldest unused ones until the kind's total (used ones included) fits ``max_bytes``
    (reason ``size``). Items used, or younger than ``grace_s``, are never chosen."""
    candidates = sorted(
        (i for i in items if not i.in_use and now - i.at >= grace_s), key=lambda i: i.at
    )
    chosen: dict[int, tuple[Item, str]] = {}
    if retention.max_age_s is not None:
        for item in candidates:
            if now - item.at > retention.max_age_s:
                chosen[id(item)] = (item, "age")
    if retention.max_bytes is not None:
        total = sum(i.bytes for i in items if id(i) not in chosen)
        for item in candidates:
            if total <= retention.max_bytes:
                break
            if id(item) not in chosen:
                chosen[id(item)] = (item, "size")
                total -= item.bytes
    return sorted(chosen.values(), key=lambda pair: pair[0].at)


@dataclass
class InUse:
    """What active deployments and plugins' running work (an evaluation, ...) use."""

    deployments: set[str] = field(default_factory=set)
    #: Ids of plugins' running work whose journal entries stay (the value of an event tag,
    #: ``journal_tags``); plugin kinds add them through ``Kind.mark_used``.
    running: set[str] = field(default_factory=set)
    #: ``(sha256(repo)[:32], commit)`` of every slot's revision: its cached checkout.
    checkouts: set[tuple[str, str]] = field(default_factory=set)
    #: ``(repo, commit, subdir)`` of every slot's revision: its source view.
    sources: set[tuple[str, str, str]] = field(default_factory=set)
    images: set[str] = field(default_factory=set)
    #: ``host:port`` of the gateways agents are given now (``agent_gateway``): their
    #: networks stay even with no container.
    gateways: set[str] = field(default_factory=set)


def repo_key(repo: str) -> str:
    """The cache directory name of a repository (``plugins/git_source.py``)."""
    return hashlib.sha256(repo.encode()).hexdigest()[:32]


async def gather_in_use(store: StateStore, settings: Settings) -> InUse:
    """Every existing deployment with its slots' revisions and the images the configuration
    names (plugin kinds add their own through ``Kind.mark_used``)."""
    used = InUse()
    for deployment in await store.list_deployments():
        used.deployments.add(deployment.id)
        for slot in await store.list_slots(deployment.id):
            revision = await store.get_revision(slot.revision_id) if slot.revision_id else None
            if revision is None:
                continue
            used.checkouts.add((repo_key(revision.repo), revision.commit))
            used.sources.add((revision.repo, revision.commit, revision.subdir))
            used.images.update(x for x in (revision.image_tag, revision.image_id) if x)
    used.images.update(x for x in settings.allowed_base_images if x)
    if settings.agent_gateway:
        with contextlib.suppress(DockyardError):  # a bad one is the deployer's to report
            host, port, _ = parse_gateway(settings.agent_gateway)
            used.gateways.add(f"{host}:{port}")
    return used


@dataclass
class Kind:
    """A kind of stored thing: how to list it (marking what is used) and remove one."""

    name: str
    inventory: Callable[[InUse], Awaitable[list[Item]]]
    remove: Callable[[Item], Awaitable[None]]
    #: Adds what this kind's active things use (ids, images) before any kind is listed.
    mark_used: Callable[[InUse], Awaitable[None]] | None = None
    #: The kind's own retention, instead of its ``gc_<kind>_*`` settings.
    retention: Retention | None = None


@dataclass
class GcContext:
    """What a plugin's gc kind factory gets (``dockyard_register_gc_kinds``)."""

    settings: Settings
    store: StateStore
    runtime: Runtime | None


def plugin_kinds(pm: pluggy.PluginManager | None, context: GcContext) -> list[Kind]:
    """The kinds plugins register through ``dockyard_register_gc_kinds``."""
    if pm is None or not hasattr(pm, "registries"):
        return []
    return [factory(context) for _, factory in pm.registries.gc_kinds.items()]


# -- the other kinds ------------------------------------------------------------------------
def tree_size(path: Path) -> tuple[int, float]:
    """Bytes of the files under ``path`` (symlinks not followed) and the newest mtime."""
    total, newest = 0, 0.0
    with contextlib.suppress(OSError):
        stat = path.lstat()
        total, newest = stat.st_size, stat.st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                stat = (Path(root) / name).lstat()
                total += stat.st_size
                newest = max(newest, stat.st_mtime)
    return total, newest


def _subdirs(path: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    return []


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # a repository's cache directory once its last checkout went


def build_logs(data: Path) -> Kind:
    """``<data_dir>/builds/<deployment>/``: removable once the deployment is gone."""

    def listing(used: InUse) -> list[Item]:
        items = []
        for path in _subdirs(data / "builds"):
            size, at = tree_size(path)
            items.append(Item(path.name, size, at, path.name in used.deployments, path))
        return items

    async def inventory(used: InUse) -> list[Item]:
        return await asyncio.to_thread(listing, used)

    async def remove(item: Item) -> None:
        await asyncio.to_thread(shutil.rmtree, item.handle)

    return Kind("build_logs", inventory, remove)


def view_keys(data: Path, used: InUse) -> set[str]:
    """The source views (``core/builds.py:source_view``) of the used revisions."""
    keys = set()
    for repo, commit, subdir in used.sources:
        checkout = data / "sources" / repo_key(repo) / commit
        context = os.path.realpath(checkout / subdir) if subdir else os.path.realpath(checkout)
        for points in ([], [LOGS_DIR]):
            key = json.dumps([context, sorted(points)])
            keys.add(hashlib.sha256(key.encode()).hexdigest()[:32])
    return keys


def sources(data: Path) -> Kind:
    """Cached checkouts ``sources/<repo>/<commit>`` and views ``views/<key>``; their age
    is their mtime (a cache hit renews it)."""

    def listing(used: InUse) -> list[Item]:
        items = []
        for repo_dir in _subdirs(data / "sources"):
            for path in _subdirs(repo_dir):
                if path.name.startswith("."):
                    continue  # a fetch under way (its own sweep removes stale ones)
                size, _ = tree_size(path)
                in_use = (repo_dir.name, path.name) in used.checkouts
                name = f"sources/{repo_dir.name}/{path.name}"
                items.append(Item(name, size, path.lstat().st_mtime, in_use, path))
        keys = view_keys(data, used)
        for path in _subdirs(data / "views"):
            if path.name.startswith("."):
                continue
            size, _ = tree_size(path)
            items.append(
                Item(f"views/{path.name}", size, path.lstat().st_mtime, path.name in keys, path)
            )
        return items

    async def inventory(used: InUse) -> list[Item]:
        return await asyncio.to_thread(listing, used)

    async def remove(item: Item) -> None:
        await asyncio.to_thread(_remove_tree, item.handle)

    return Kind("sources", inventory, remove)


def _journal(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=15.0, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 15000")
    return db


def _running_deployments(db: sqlite3.Connection, running: set[str]) -> set[str]:
    """The deployments with a journal entry tagged with one of ``running`` (any tag)."""
    if not running:
        return set()
    marks = ", ".join("?" for _ in running)
    rows = db.execute(
        "SELECT DISTINCT journal.deployment_id FROM journal_tags"
        " JOIN journal ON journal.id = journal_tags.entry_id"
        f" WHERE journal_tags.value IN ({marks})",
        sorted(running),
    ).fetchall()
    return {row[0] for row in rows}


def journal_events(data: Path) -> Kind:
    """The journal's entries grouped by deployment: a group is removable once its
    deployment is gone and none of its entries is tagged with a plugin's running work
    (an event tag's value in ``InUse.running``); its age is its newest entry."""
    path = data / JOURNAL_FILE

    def listing(used: InUse) -> list[Item]:
        if not path.is_file():
            return []
        db = _journal(path)
        try:
            rows = db.execute(
                "SELECT deployment_id, MAX(id), SUM(LENGTH(body)),"
                " MAX(json_extract(CAST(body AS TEXT), '$.at'))"
                " FROM journal GROUP BY deployment_id"
            ).fetchall()
            running = _running_deployments(db, used.running)
        except sqlite3.OperationalError:
            return []  # no journal table yet (or one the server has not migrated yet)
        finally:
            db.close()
        items = []
        for deployment, last_id, size, at in rows:
            in_use = deployment in used.deployments or deployment in running
            items.append(Item(deployment, int(size or 0), float(at or 0), in_use, last_id))
        return items

    def delete(item: Item) -> None:
        db = _journal(path)
        try:
            tagged = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'journal_tags'"
            ).fetchone()
            db.execute("BEGIN IMMEDIATE")  # an entry and its tags go together
            try:
                if tagged:
                    db.execute(
                        "DELETE FROM journal_tags WHERE entry_id IN"
                        " (SELECT id FROM journal WHERE deployment_id = ? AND id <= ?)",
                        (item.name, item.handle),
                    )
                db.execute(
                    "DELETE FROM journal WHERE deployment_id = ? AND id <= ?",
                    (item.name, item.handle),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    async def inventory(used: InUse) -> list[Item]:
        return await asyncio.to_thread(listing, used)

    async def remove(item: Item) -> None:
        await asyncio.to_thread(delete, item)

    return Kind("events", inventory, remove)


def built_images(runtime: Runtime, instance_id: str) -> Kind:
    """Images this dockyard built (managed, its instance label, with build inputs); their
    age is their creation. Another dockyard's images on the same engine are never seen."""

    async def inventory(used: InUse) -> list[Item]:
        items = []
        labels = {
            LABEL_INSTANCE: instance_id,
            LABEL_MANAGED: "true",
        }  # the engine filters on the first
        for image in await runtime.list_images(labels):
            if LABEL_INPUTS not in image.labels:
                continue  # not a build's (the sandbox image, for one)
            names = {image.id, f"sha256:{image.id}", *image.tags}
            name = image.tags[0] if image.tags else image.id
            items.append(Item(name, image.size, image.created, bool(names & used.images), image))
        return items

    async def remove(item: Item) -> None:
        for ref in item.handle.tags or [item.handle.id]:
            await runtime.remove_image(ref)

    return Kind("images", inventory, remove)


def engine_networks(runtime: Runtime) -> Kind:
    """The networks the runtime lists (:meth:`Runtime.list_networks`): removable once no
    container has joined one and it is not for a gateway in use; their age is their
    creation (the grace period keeps a network a deploy or build is about to join)."""

    async def inventory(used: InUse) -> list[Item]:
        return [
            Item(
                network.name,
                0,
                network.created,
                network.containers > 0 or (network.gateway or "") in used.gateways,
                network,
            )
            for network in await runtime.list_networks()
        ]

    async def remove(item: Item) -> None:
        await runtime.remove_network(item.name)

    return Kind("networks", inventory, remove, retention=Retention(max_age_s=0.0))


class GarbageCollector:
    """One data directory's garbage collection over its store and (optional) runtime."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        runtime: Runtime | None = None,
        *,
        pm: pluggy.PluginManager | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        data = settings.data_path
        self.kinds = plugin_kinds(pm, GcContext(settings, store, runtime))
        self.kinds += [journal_events(data), build_logs(data), sources(data)]
        if runtime is not None:
            self.kinds.append(built_images(runtime, settings.instance_id))
            if type(runtime).list_networks is not Runtime.list_networks:  # it makes networks
                self.kinds.append(engine_networks(runtime))

    async def _inventories(self, errors: list[str]) -> tuple[InUse, dict[str, list[Item]]]:
        used = await gather_in_use(self.store, self.settings)
        for kind in self.kinds:
            if kind.mark_used is not None:
                await kind.mark_used(used)
        found: dict[str, list[Item]] = {}
        for kind in self.kinds:
            try:
                found[kind.name] = await kind.inventory(used)
            except (DockyardError, OSError, sqlite3.Error) as exc:
                errors.append(f"{kind.name}: cannot list: {exc}")
        return used, found

    async def usage(self) -> DiskUsage:
        """Disk use of every kind now."""
        errors: list[str] = []
        _, found = await self._inventories(errors)
        return DiskUsage(at=self.clock(), kinds=_usage(found), error="; ".join(errors) or None)

    async def collect(self, *, dry_run: bool = False) -> GcReport:
        """One pass: remove what retention says (nothing, with ``dry_run``)."""
        errors: list[str] = []
        now = self.clock()
        grace = grace_of(self.settings)
        _, found = await self._inventories(errors)
        removed: list[Removal] = []
        for kind in self.kinds:
            items = found.get(kind.name, [])
            retention = kind.retention or retention_of(self.settings, kind.name)
            for item, reason in choose(items, retention, now, grace):
                if not dry_run:
                    try:
                        await kind.remove(item)
                    except (DockyardError, OSError, sqlite3.Error) as exc:
                        errors.append(f"{kind.name}: cannot remove {item.name}: {exc}")
                        continue
                    items.remove(item)
                removed.append(
                    Removal(kind=kind.name, name=item.name, bytes=item.bytes, reason=reason)
                )
        if dry_run:
            gone = {(r.kind, r.name) for r in removed}
            found = {k: [i for i in v if (k, i.name) not in gone] for k, v in found.items()}
        return GcReport(
            dry_run=dry_run,
            at=now,
            removed=removed,
            freed_bytes=sum(r.bytes for r in removed),
            usage=_usage(found),
            errors=errors,
        )


def _usage(found: dict[str, list[Item]]) -> dict[str, KindUsage]:
    return {
        name: KindUsage(
            bytes=sum(i.bytes for i in items),
            count=len(items),
            in_use=sum(1 for i in items if i.in_use),
        )
        for name, items in found.items()
    }


class GcSchedule:
    """The server's periodic pass (every ``gc_interval_s``; 0: never) and the disk use of
    each kind it keeps for ``/v1/healthz`` (refreshed every :data:`USAGE_REFRESH_S`), so a
    health check never walks the disk itself."""

    def __init__(self, collector: GarbageCollector, *, refresh_s: float = USAGE_REFRESH_S):
        self.collector = collector
        self.interval_s = collector.settings.gc_interval_s
        self.refresh_s = refresh_s
        self.usage = DiskUsage()
        self.last_report: GcReport | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="garbage-collection")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> GcReport:
        report = await self.collector.collect()
        self.last_report = report
        self.usage = DiskUsage(
            at=report.at, kinds=report.usage, error="; ".join(report.errors) or None
        )
        if report.removed:
            log.info(
                "garbage collection removed %d entries, %d bytes",
                len(report.removed),
                report.freed_bytes,
            )
        for error in report.errors:
            log.warning("garbage collection: %s", error)
        return report

    async def _loop(self) -> None:
        next_gc = time.monotonic() + self.interval_s
        while True:
            try:
                if self.interval_s > 0 and time.monotonic() >= next_gc:
                    next_gc = time.monotonic() + self.interval_s
                    await self.run_once()
                else:
                    self.usage = await self.collector.usage()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken pass must not end the schedule
                log.warning("garbage collection failed: %s", exc)
                self.usage = DiskUsage(at=time.time(), error=str(exc) or type(exc).__name__)
            wait = self.refresh_s
            if self.interval_s > 0:
                wait = min(wait, max(0.0, next_gc - time.monotonic()))
            await asyncio.sleep(wait)
