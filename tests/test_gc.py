"""Garbage collection (``core/gc.py``) with a fake clock: a pass removes exactly what
retention says, and nothing an existing deployment or a running evaluation uses.

The deployment runs on the fake runtime (orchestration logic); the engines' image listing
is checked against the real engines by the runtime contract
(``dockyard.testing.runtime_contract``: ``test_list_images_by_labels``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dockyard.api.events import EventJournal, StreamEvent
from dockyard.core.builds import LABEL_INPUTS
from dockyard.core.config import Settings, load_settings
from dockyard.core.controller import Controller
from dockyard.core.gc import (
    DAY_S,
    GarbageCollector,
    GcContext,
    GcSchedule,
    InUse,
    Item,
    Kind,
    Retention,
    choose,
    repo_key,
)
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import DeploymentSpec, HealthCheck
from dockyard.core.runtime import LABEL_INSTANCE, LABEL_MANAGED, BuildRequest
from dockyard.core.services import Services
from dockyard.core.store import PluginRecord
from tests.fakes import FakeRuntime, started_services


def stored_evaluation(
    ev_id: str, finished: bool, at: float, value: dict[str, Any] | None = None
) -> PluginRecord:
    """An evaluation as the evaluation plugin stores it (namespace ``evaluation``)."""
    flag = "true" if finished else "false"
    return PluginRecord(
        namespace="evaluation",
        key=ev_id,
        value=value or {},
        labels={"state": "x", "finished": flag},
        created_at=at,
        updated_at=at,
    )


REPO = "https://github.com/acme/agent"
#: The fake clock: twenty days from now, so what is made now is twenty days old.
LATER = time.time() + 20 * DAY_S
RECENT = LATER - DAY_S
KEEP_DAYS = {f"gc_{kind}_max_age_days": 10.0 for kind in ("events", "build_logs")}
KEEP_DAYS |= {"gc_sources_max_age_days": 10.0, "gc_images_max_age_days": 10.0}
#: The evaluation plugin's retention, in its own table.
KEEP_EVALUATIONS = {"evaluation": {"gc_max_age_days": 10.0}}


@pytest_asyncio.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    async with started_services(
        tmp_path,
        FakeRuntime(),
        data_dir=str(tmp_path / "data"),
        router_watch_interval_s=0,
        port_range_start=61330,
        port_range_end=61340,
        gc_sources_max_mb=0,
        plugins=KEEP_EVALUATIONS,
        **KEEP_DAYS,
    ) as svc:
        yield svc


def touch(path: Path, at: float, text: str = "x" * 100) -> Path:
    """A file (or a directory holding one) last written at ``at``."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path.parent, (at, at))
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "file").write_text(text)
        os.utime(path / "file", (at, at))
    os.utime(path, (at, at))
    return path


async def build_image(
    runtime: FakeRuntime, tag: str, instance: str, *, inputs: bool = True
) -> None:
    labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance}
    labels |= {LABEL_INPUTS: "h"} if inputs else {}
    await runtime.build(BuildRequest(context="/nonexistent", tag=tag, labels=labels))


async def deploy_app(services: Services) -> tuple[str, str]:
    """A deployed, promoted ``app``: its revision's commit and image."""
    controller = Controller.from_services(services)
    await controller.start()
    health = HealthCheck(interval_s=0.02, timeout_s=0.5, deadline_s=5)
    await controller.create(DeploymentSpec(id="app", repo=REPO, ref="v1", health=health))
    assert await controller.wait("app", 10)
    await controller.stop()
    slots = await services.store.list_slots("app")
    revision = await services.store.get_revision(
        next(s.revision_id for s in slots if s.revision_id)
    )
    assert revision is not None and revision.image_tag
    return revision.commit, revision.image_tag


async def seed(services: Services) -> dict[str, Any]:
    """Something of every kind: used, unused and old, unused and recent."""
    data = services.settings.data_path
    runtime: FakeRuntime = services.runtime  # type: ignore[assignment]
    store = services.store
    now = time.time()
    commit, image = await deploy_app(services)
    # evaluations: an old finished one goes; a recent one and a running old one stay.
    for ev_id, finished, at in [
        ("ev-old", True, now),
        ("ev-new", True, RECENT),
        ("ev-running", False, now),
    ]:
        body = {"image": "localhost/dockyard/eval:1"} if not finished else {}
        await store.put_record(stored_evaluation(ev_id, finished, at, body))
    # the journal: groups by deployment.
    journal = EventJournal(data / "events.sqlite3")
    for deployment, evaluation, at in [
        ("app", None, now),  # exists: stays
        ("gone", None, now),  # deleted long ago: goes
        ("gone-new", None, RECENT),  # deleted yesterday: stays
        ("eval-x", "ev-running", now),  # a running evaluation's: stays
        ("eval-y", "ev-old", now),  # a finished evaluation's: goes
    ]:
        entry = StreamEvent(id=0, deployment_id=deployment, kind="k", at=at)
        tags = {"evaluation": evaluation} if evaluation else {}  # the evaluation plugin's tag
        journal.append(msgspec_replace(entry, tags=tags))
    journal.close()
    # build logs
    touch(data / "builds" / "app" / "blue.log", now)
    touch(data / "builds" / "gone" / "blue.log", now)
    touch(data / "builds" / "gone-new" / "blue.log", RECENT)
    # sources and views
    touch(data / "sources" / repo_key(REPO) / commit, now)
    touch(data / "sources" / repo_key(REPO) / ("1" * 40), now)
    touch(data / "sources" / repo_key("https://github.com/acme/other") / ("2" * 40), RECENT)
    touch(data / "views" / "stale", now)
    # images: the app's (built by the deploy), a running evaluation's, an old one, a
    # managed image that no build made (the sandbox image's kind)
    instance = services.settings.instance_id
    await build_image(runtime, "localhost/dockyard/eval:1", instance)
    await build_image(runtime, "localhost/dockyard/gone:1", instance)
    await build_image(runtime, "localhost/dockyard/agent-sandbox:other", instance, inputs=False)
    await build_image(runtime, "localhost/dockyard/another-dockyards:1", "0123456789ab")
    return {"commit": commit, "image": image}


def msgspec_replace(entry: StreamEvent, **changes: Any) -> StreamEvent:
    import msgspec

    return msgspec.structs.replace(entry, **changes)


EXPECTED = {
    ("evaluations", "ev-old"),
    ("events", "gone"),
    ("events", "eval-y"),
    ("build_logs", "gone"),
    ("sources", f"sources/{repo_key(REPO)}/{'1' * 40}"),
    ("sources", "views/stale"),
    ("images", "localhost/dockyard/gone:1"),
}


async def test_a_pass_removes_exactly_what_retention_says(services: Services) -> None:
    seeded = await seed(services)
    data = services.settings.data_path
    runtime: FakeRuntime = services.runtime  # type: ignore[assignment]
    collector = GarbageCollector(
        services.settings, services.store, runtime, pm=services.pm, clock=lambda: LATER
    )

    dry = await collector.collect(dry_run=True)
    assert {(r.kind, r.name) for r in dry.removed} == EXPECTED
    assert all(r.reason == "age" for r in dry.removed)
    assert dry.errors == []
    assert (data / "builds" / "gone").exists()
    assert await services.store.get_record("evaluation", "ev-old") is not None
    assert "localhost/dockyard/gone:1" in runtime.images

    report = await collector.collect()
    assert {(r.kind, r.name) for r in report.removed} == EXPECTED
    assert report.freed_bytes == sum(r.bytes for r in report.removed) > 0
    assert report.errors == []
    # what went
    assert await services.store.get_record("evaluation", "ev-old") is None
    assert not (data / "builds" / "gone").exists()
    assert not (data / "sources" / repo_key(REPO) / ("1" * 40)).exists()
    assert not (data / "views" / "stale").exists()
    assert "localhost/dockyard/gone:1" not in runtime.images
    journal = EventJournal(data / "events.sqlite3")
    left = {e.deployment_id for e in journal.read(0, limit=100)}
    journal.close()
    assert left == {"app", "gone-new", "eval-x"}
    # what stayed: everything the deployment and the running evaluation use, and the recent
    for ev_id in ("ev-new", "ev-running"):
        assert await services.store.get_record("evaluation", ev_id) is not None
    assert (data / "builds" / "app" / "blue.log").exists()
    assert (data / "builds" / "gone-new").exists()
    assert (data / "sources" / repo_key(REPO) / seeded["commit"]).exists()
    assert seeded["image"] in runtime.images
    assert "localhost/dockyard/eval:1" in runtime.images
    assert "localhost/dockyard/agent-sandbox:other" in runtime.images
    assert "localhost/dockyard/another-dockyards:1" in runtime.images
    assert report.usage["images"].in_use == 2 and report.usage["images"].count == 2
    # a second pass finds nothing more
    again = await collector.collect()
    assert again.removed == []


async def test_size_retention_removes_the_oldest_unused_first(services: Services) -> None:
    data = services.settings.data_path
    old = touch(data / "sources" / "r" / ("3" * 40), time.time(), "y" * 4000)
    mid = touch(data / "sources" / "r" / ("4" * 40), RECENT - DAY_S, "y" * 4000)
    new = touch(data / "sources" / "r" / ("5" * 40), RECENT, "y" * 4000)
    size = sum(p.stat().st_size + (p / "file").stat().st_size for p in (old, mid, new))
    settings = msgspec_settings(
        services.settings,
        gc_sources_max_mb=(size - 100) / 1024 / 1024,
        gc_sources_max_age_days=0,
    )
    collector = GarbageCollector(
        settings, services.store, None, pm=services.pm, clock=lambda: LATER
    )
    report = await collector.collect()
    assert [(r.name, r.reason) for r in report.removed] == [(f"sources/r/{'3' * 40}", "size")]
    assert not old.exists() and mid.exists() and new.exists()


class ScratchPlugin:
    """A third-party plugin keeping "scratch" files; gc prunes them by its own table."""

    def __init__(self, items: dict[str, float], active: set[str]) -> None:
        self.items, self.active, self.removed = items, active, []  # type: list[str]

    @hookimpl
    def dockyard_register_gc_kinds(self, register: Any) -> None:
        def factory(context: GcContext) -> Kind:
            async def mark_used(used: InUse) -> None:
                used.running |= self.active

            async def inventory(used: InUse) -> list[Item]:
                return [
                    Item(name, 10, at, in_use=name in used.running)
                    for name, at in self.items.items()
                ]

            async def remove(item: Item) -> None:
                self.removed.append(item.name)

            return Kind("scratch", inventory, remove, mark_used)

        register("scratch", factory)


async def test_a_plugins_kind_is_pruned_by_its_own_retention(services: Services) -> None:
    """``dockyard_register_gc_kinds``: a plugin's kind, its retention from
    ``[plugins.scratch]``, what it marks used kept whatever its age."""
    now = time.time()
    plugin = ScratchPlugin({"old": now, "busy": now, "fresh": RECENT}, active={"busy"})
    services.pm.register(plugin, name="scratch")
    settings = msgspec_settings(services.settings, plugins={"scratch": {"gc_max_age_days": 10}})
    collector = GarbageCollector(
        settings, services.store, None, pm=services.pm, clock=lambda: LATER
    )
    assert "scratch" in [kind.name for kind in collector.kinds]
    report = await collector.collect()
    assert [(r.kind, r.name, r.reason) for r in report.removed] == [("scratch", "old", "age")]
    assert plugin.removed == ["old"]
    assert report.usage["scratch"].count == 2 and report.usage["scratch"].in_use == 1


def test_the_old_evaluation_gc_names_still_work_with_one_deprecation_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gc_evaluations_max_age_days``/``_max_mb`` (before ``[plugins.evaluation]``
    ``gc_max_age_days``/``gc_max_mb``) are read for one release, warned about once each."""
    from dockyard.core import config as config_module
    from dockyard.plugins.evaluation import records

    monkeypatch.setattr(config_module, "_warned_legacy", set())
    with pytest.warns(DeprecationWarning) as warned:
        old = load_settings(
            environ={
                "DOCKYARD_GC_EVALUATIONS_MAX_AGE_DAYS": "3",
                "DOCKYARD_GC_EVALUATIONS_MAX_MB": "2",
            }
        )
        Settings(gc_evaluations_max_age_days=4)  # once per process: no second warning
    messages = sorted(str(w.message) for w in warned)
    assert len(messages) == 2
    assert "gc_evaluations_max_age_days" in messages[0] and "gc_max_age_days" in messages[0]
    assert "gc_evaluations_max_mb" in messages[1] and "[plugins.evaluation]" in messages[1]

    def kept(settings: Settings) -> Retention | None:
        return records.gc_kind(GcContext(settings, None, None)).retention  # type: ignore[arg-type]

    assert kept(old) == Retention(max_age_s=3 * DAY_S, max_bytes=2 * 1024 * 1024)
    new = Settings(plugins={"evaluation": {"gc_max_age_days": 5, "gc_max_mb": 0}})
    assert kept(new) == Retention(max_age_s=5 * DAY_S, max_bytes=None)
    assert kept(Settings()) == Retention(max_age_s=30 * DAY_S, max_bytes=None)  # the default
    both = Settings(
        gc_evaluations_max_age_days=3,
        plugins={"evaluation": {"gc_max_age_days": 5}},
    )
    assert kept(both) == Retention(max_age_s=5 * DAY_S, max_bytes=None)  # the table wins


def msgspec_settings(settings: Settings, **changes: Any) -> Settings:
    import msgspec

    return msgspec.structs.replace(settings, **changes)


def test_choose_never_takes_what_is_used_or_too_young() -> None:
    now = 1000.0 * DAY_S
    items = [
        Item("used-old", 500, now - 50 * DAY_S, in_use=True),
        Item("old", 100, now - 40 * DAY_S),
        Item("young", 100, now - 60.0),
        Item("mid", 300, now - 5 * DAY_S),
    ]
    chosen = choose(items, Retention(max_age_s=30 * DAY_S, max_bytes=600), now, grace_s=3600)
    # "old" by age; then 900 > 600 bytes: "mid" (the oldest left), never the used or young
    assert [(i.name, why) for i, why in chosen] == [("old", "age"), ("mid", "size")]
    # the used item alone is over the size: still kept
    assert choose(items[:1], Retention(max_bytes=1), now) == []


async def test_the_schedule_keeps_usage_and_stops(services: Services) -> None:
    await seed(services)
    collector = GarbageCollector(
        services.settings, services.store, services.runtime, pm=services.pm
    )
    schedule = GcSchedule(collector, refresh_s=0.05)
    schedule.start()
    deadline = time.monotonic() + 5
    while schedule.usage.at is None and time.monotonic() < deadline:
        await _sleep(0.02)
    await schedule.stop()
    assert schedule.usage.at is not None
    kinds = schedule.usage.kinds
    assert set(kinds) == {"evaluations", "events", "build_logs", "sources", "images"}
    assert kinds["evaluations"].count == 3 and kinds["evaluations"].in_use == 1
    assert kinds["build_logs"].bytes >= 300
    # the interval has not passed: nothing was collected
    assert schedule.last_report is None
    assert await services.store.get_record("evaluation", "ev-old") is not None


async def test_the_schedule_collects_every_interval(services: Services) -> None:
    await seed(services)
    settings = msgspec_settings(services.settings, gc_interval_s=0.1)
    collector = GarbageCollector(
        settings, services.store, services.runtime, pm=services.pm, clock=lambda: LATER
    )
    schedule = GcSchedule(collector, refresh_s=0.05)
    schedule.start()
    deadline = time.monotonic() + 10
    while schedule.last_report is None and time.monotonic() < deadline:
        await _sleep(0.02)
    await schedule.stop()
    assert schedule.last_report is not None
    assert {(r.kind, r.name) for r in schedule.last_report.removed} == EXPECTED
    assert await services.store.get_record("evaluation", "ev-old") is None
    assert schedule.usage.kinds["evaluations"].count == 2  # what the pass left


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_healthz_shows_each_kinds_disk_use(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=61341, port_range_end=61345) as client:
        deadline = time.monotonic() + 10
        while True:
            disk = client.get("/v1/healthz").json()["disk"]
            if disk["at"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert set(disk["kinds"]) == {"evaluations", "events", "build_logs", "sources", "images"}
    assert disk["error"] is None
    assert all(set(k) == {"bytes", "count", "in_use"} for k in disk["kinds"].values())


@pytest.mark.slow
@pytest.mark.podman
def test_the_command_prints_then_removes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dockyard gc --dry-run`` then ``dockyard gc`` on a data directory, with the configured
    (real Podman) runtime: each line names the kind, the entry, its bytes and the reason."""
    from dockyard.api.cli import main
    from dockyard.plugins.sqlite_store import SqliteStore
    from tests.test_e2e import _podman_required

    _podman_required()
    # The host's networks are other tests' too: this gc sees none of them (a prefix of its own).
    config = tmp_path / "dockyard.toml"
    config.write_text(f'[plugins.podman]\ngc_network_prefix = "gc-none-{uuid.uuid4().hex}"\n')
    monkeypatch.setenv("DOCKYARD_CONFIG", str(config))
    data = tmp_path / "data"
    long_ago = time.time() - 40 * DAY_S
    touch(data / "builds" / "gone" / "blue.log", long_ago, "z" * 2048)
    store = SqliteStore(data / "dockyard.db")

    async def record() -> None:
        await store.open()
        await store.put_record(stored_evaluation("ev-old", True, long_ago))
        await store.close()

    asyncio.run(record())
    assert main(["gc", "--dry-run", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^would remove  build_logs  gone  \d+\.\d KiB \(age\)$", out, re.M), out
    assert "would remove  evaluations ev-old" in out
    assert "gc: would remove 2 entries" in out
    assert (data / "builds" / "gone").exists()
    assert main(["gc", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "removed  build_logs  gone" in out and "gc: removed 2 entries" in out
    assert not (data / "builds" / "gone").exists()
    assert main(["gc", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == []
