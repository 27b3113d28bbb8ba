"""Event tags, the query filters plugins register, and how plugin events print.

The journal keeps the tags plugins register (``dockyard_register_event_tags``) in
``journal_tags``; a journal made by the previous schema (an ``evaluation_id`` column) is
migrated; ``?<tag>=ID`` and ``?<status filter>=true|false`` come from the registries, are
refused with a 400 naming them when nobody registers them, and are listed in the OpenAPI
document; ``dockyard events`` prints a plugin's event kinds with the format it registers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dockyard.api.cli_events import event_text, parse_tags, show_event, use_event_formats
from dockyard.api.events import EventHub, EventJournal, StreamEvent
from dockyard.core import logs
from dockyard.core.errors import PluginError, ValidationError
from dockyard.core.event_tags import make_taggers
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Event
from dockyard.core.plugins import build_plugin_manager
from dockyard.plugins.evaluation.events import EvaluationTagger
from tests.conftest import TEST_TOKEN

PORTS = {"port_range_start": 48700, "port_range_end": 48720}

#: The journal's schema before event tags (``api/events.py`` before this change).
OLD_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " deployment_id TEXT NOT NULL, evaluation_id TEXT, body BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS by_dep ON journal(deployment_id, id)",
    "CREATE INDEX IF NOT EXISTS by_eval ON journal(evaluation_id, id)",
]


class OldStreamEvent(msgspec.Struct, kw_only=True):
    """An entry's body as the previous schema wrote it."""

    id: int
    deployment_id: str
    kind: str
    at: float
    evaluation_id: str | None = None
    seq: int | None = None
    color: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    reason: str | None = None
    message: str | None = None
    data: dict[str, Any] = {}
    request_id: str | None = None


def _old_journal(path: Path, rows: list[tuple[str, str | None, str]]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for statement in OLD_SCHEMA:
        db.execute(statement)
    for n, (deployment, evaluation, kind) in enumerate(rows):
        body = msgspec.json.encode(
            OldStreamEvent(
                id=0, deployment_id=deployment, kind=kind, at=1000.0 + n, evaluation_id=evaluation
            )
        )
        db.execute(
            "INSERT INTO journal (deployment_id, evaluation_id, body) VALUES (?, ?, ?)",
            (deployment, evaluation, body),
        )
    db.close()


def test_a_journal_of_the_previous_schema_keeps_its_evaluations_as_tags(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    _old_journal(
        path,
        [
            ("ev-1", "ev-1", "evaluation"),
            ("ev-1", "ev-1", "slot_transition"),
            ("app", None, "created"),
            ("ev-2", "ev-2", "evaluation"),
        ],
    )
    journal = EventJournal(path)
    try:
        tagged = journal.read(tags={"evaluation": "ev-1"})
        assert [(e.id, e.kind, e.tags) for e in tagged] == [
            (1, "evaluation", {"evaluation": "ev-1"}),
            (2, "slot_transition", {"evaluation": "ev-1"}),
        ]
        everything = journal.read()
        assert [e.tags for e in everything] == [
            {"evaluation": "ev-1"},
            {"evaluation": "ev-1"},
            {},
            {"evaluation": "ev-2"},
        ]
        assert [e.at for e in everything] == [1000.0, 1001.0, 1002.0, 1003.0]
        # New entries continue the sequence and are tagged the new way.
        new = journal.append(
            StreamEvent(id=0, deployment_id="ev-2", kind="k", at=2.0, tags={"evaluation": "ev-2"})
        )
        assert new.id == 5
        assert [e.id for e in journal.read(tags={"evaluation": "ev-2"})] == [4, 5]
    finally:
        journal.close()
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(journal)")]
    indexes = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")]
    db.close()
    assert columns == ["id", "deployment_id", "body"]
    assert "by_eval" not in indexes and "tags_by_value" in indexes
    # Opening it again changes nothing.
    again = EventJournal(path)
    assert len(again.read(tags={"evaluation": "ev-1"})) == 2
    again.close()


def test_tags_filter_the_journal_and_are_pruned_with_it(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path / "events.sqlite3", keep=1)
    for n in range(1, 1001):
        tags = {"run": f"r{n % 3}", "team": "a" if n % 2 else "b"}
        journal.append(StreamEvent(id=0, deployment_id="app", kind="k", at=float(n), tags=tags))
    got = journal.read(tags={"run": "r1", "team": "a"}, limit=1000)
    # The 1000th append pruned everything but the newest entry (keep=1), tags included.
    assert got == []
    last = journal.read(tags={"run": "r1", "team": "b"})
    assert [(e.id, e.tags) for e in last] == [(1000, {"run": "r1", "team": "b"})]
    count = journal._db.execute("SELECT COUNT(*) FROM journal_tags").fetchone()[0]
    assert count == 2
    journal.close()


class RunTagger:
    """A tagger with state: a deployment's run, from the log context or remembered."""

    def __init__(self) -> None:
        self.run_of: dict[str, str] = {}

    def __call__(self, event: Event, context: Mapping[str, Any]) -> str | None:
        run = context.get("run_id")
        if run:
            self.run_of[event.deployment_id] = run
        return run or self.run_of.get(event.deployment_id)


class RunTags:
    @hookimpl
    def dockyard_register_event_tags(self, register: Any) -> None:
        register("run", RunTagger)


async def test_the_hub_tags_events_and_streams_follow_one_tag(tmp_path: Path) -> None:
    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("runs", RunTags())])
    taggers = make_taggers(pm)
    assert sorted(taggers) == ["evaluation", "run"]
    hub = EventHub(EventJournal(tmp_path / "events.sqlite3"), taggers=taggers, heartbeat_s=0.2)
    logs.add_field("run_id", "run")
    stream = hub.follow(0, tags={"run": "r-1"})
    with logs.bound(run_id="r-1"):
        hub.dockyard_event(Event(deployment_id="a", kind="started"))
    hub.dockyard_event(Event(deployment_id="b", kind="other"))
    hub.dockyard_event(Event(deployment_id="a", kind="later"))  # remembered: r-1
    first = await asyncio.wait_for(anext(stream), 5)
    second = await asyncio.wait_for(anext(stream), 5)
    assert first is not None and second is not None
    assert [(first.kind, first.tags), (second.kind, second.tags)] == [
        ("started", {"run": "r-1"}),
        ("later", {"run": "r-1"}),
    ]
    assert await asyncio.wait_for(anext(stream), 5) is None  # "other" is not r-1's
    wire = msgspec.json.decode(hub.encode(first))
    assert wire["tags"] == {"run": "r-1"} and wire["run_id"] == "r-1"
    assert wire["evaluation_id"] is None  # every registered tag has its deprecated key
    hub.close()


def test_the_evaluation_tagger_keeps_today_s_rules() -> None:
    tagger = EvaluationTagger()
    started = Event(deployment_id="d", kind="evaluation", data={"evaluation_id": "ev-9"})
    assert tagger(started, {}) == "ev-9"
    assert tagger(Event(deployment_id="d", kind="slot_transition"), {}) == "ev-9"
    assert tagger(Event(deployment_id="x", kind="k"), {"evaluation_id": "ev-3"}) == "ev-3"
    final = Event(
        deployment_id="d", kind="evaluation", data={"evaluation_id": "ev-9", "final": True}
    )
    assert tagger(final, {}) == "ev-9"
    assert tagger(Event(deployment_id="d", kind="deleted"), {}) is None  # forgotten


class ReservedTag:
    @hookimpl
    def dockyard_register_event_tags(self, register: Any) -> None:
        register("deployment", RunTagger)


def test_a_tag_shadowing_an_event_field_names_its_plugin() -> None:
    from dockyard.api.events import RESERVED_TAGS

    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("bad", ReservedTag())])
    with pytest.raises(PluginError, match=r"'bad'.*'deployment'"):
        make_taggers(pm, reserved=RESERVED_TAGS)


def _tagged_journal(client: Any) -> None:
    hub: EventHub = client.app.state.events
    hub.dockyard_event(
        Event(deployment_id="ev-a", kind="evaluation", data={"evaluation_id": "ev-a"})
    )
    hub.dockyard_event(Event(deployment_id="ev-a", kind="slot_transition"))
    hub.dockyard_event(Event(deployment_id="app", kind="created"))


def test_the_event_routes_filter_by_a_registered_tag(fake_client_factory: Any) -> None:
    with fake_client_factory(**PORTS) as client:
        _tagged_journal(client)
        page = client.get("/v1/events", params={"evaluation": "ev-a"}).json()
        assert [(e["deployment_id"], e["kind"]) for e in page] == [
            ("ev-a", "evaluation"),
            ("ev-a", "slot_transition"),
        ]
        assert all(e["tags"] == {"evaluation": "ev-a"} for e in page)
        assert all(e["evaluation_id"] == "ev-a" for e in page)  # deprecated, still there
        others = client.get("/v1/events", params={"deployment": "app"}).json()
        assert [(e["tags"], e["evaluation_id"]) for e in others] == [({}, None)]
        login = client.post("/ui/login", data={"token": TEST_TOKEN}, follow_redirects=False)
        assert login.status_code == 303  # the status page's session, for /ui/events/stream
        for route in ("/v1/events", "/v1/events/stream", "/ui/events/stream"):
            bad = client.get(route, params={"evaluation": "bad id!"})
            assert bad.status_code == 400, (route, bad.text)
            assert bad.json()["message"] == "evaluation: not a valid id"
            unknown = client.get(route, params={"colour": "x"})
            assert unknown.status_code == 400, (route, unknown.text)
            assert unknown.json()["message"] == "colour: no loaded plugin registers this filter"


def test_an_unregistered_filter_is_a_400_naming_it(fake_client_factory: Any) -> None:
    with fake_client_factory(disable=["evaluation"], **PORTS) as client:
        for route in ("/v1/events", "/v1/events/stream"):
            r = client.get(route, params={"evaluation": "x"})
            assert r.status_code == 400, (route, r.text)
            assert r.json()["message"] == "evaluation: no loaded plugin registers this filter"
        r = client.get("/v1/status", params={"evaluation": "true"})
        assert r.status_code == 400
        assert r.json()["message"] == "evaluation: no loaded plugin registers this status filter"
        page = client.get("/v1/events").json()
        assert all("evaluation_id" not in e for e in page)  # no such tag: no such key
        schema = client.get("/docs/openapi.json").json()
        assert "evaluation" not in _query_params(schema, "/v1/events", "get")
        assert "evaluation" not in _query_params(schema, "/v1/status", "get")


def test_status_filter_values_are_true_or_false(fake_client_factory: Any) -> None:
    with fake_client_factory(**PORTS) as client:
        for value, status in [("true", 200), ("false", 200), ("TRUE", 200), ("yes", 400)]:
            r = client.get("/v1/status", params={"evaluation": value})
            assert r.status_code == status, (value, r.text)
            if status == 400:
                assert r.json()["message"] == "evaluation: must be true or false"


def _query_params(schema: dict[str, Any], path: str, method: str) -> dict[str, dict[str, Any]]:
    operation = schema["paths"][path][method]
    return {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}


def test_the_schema_lists_the_registered_filters(fake_client_factory: Any) -> None:
    with fake_client_factory(**PORTS) as client:
        schema = client.get("/docs/openapi.json").json()
        for path in ("/v1/events", "/v1/events/stream"):
            tag = _query_params(schema, path, "get")["evaluation"]
            assert tag["schema"] == {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,80}$"}
            assert "'evaluation' plugin" in tag["description"]
        status = _query_params(schema, "/v1/status", "get")["evaluation"]
        assert status["schema"] == {"type": "boolean"}
        assert "dockyard_evaluation" in status["description"]
        event = schema["components"]["schemas"]["StreamEvent"]["properties"]
        assert event["evaluation_id"]["deprecated"] is True
        assert event["tags"]["type"] == "object"


def test_plugin_event_formats_print_their_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    event = {
        "id": 3,
        "deployment_id": "ev-1",
        "kind": "evaluation",
        "at": 0,
        "data": {"state": "running", "progress": {"tasks_total": 4, "tasks_done": 1}},
    }
    use_event_formats(build_plugin_manager(load_entry_points=False))
    assert event_text(event) == "evaluation running (1/4 tasks)"
    show_event(event)
    assert "ev-1 -     evaluation running (1/4 tasks)" in capsys.readouterr().out
    use_event_formats(build_plugin_manager(disable=["evaluation"], load_entry_points=False))
    assert event_text(event) == "evaluation"  # nobody formats it: its kind
    assert event_text(event, {"evaluation": lambda e: 1 / 0}) == "evaluation"  # a failing one
    assert event_text({"kind": "slot_transition", "from_state": "A", "to_state": "B"}) == ("A -> B")
    use_event_formats(build_plugin_manager(load_entry_points=False))


def test_a_plugin_s_event_format_comes_through_its_hook() -> None:
    """A third-party ``dockyard_register_event_formats`` implementation prints its kind."""

    class Formats:
        @hookimpl
        def dockyard_register_event_formats(self, register: Any) -> None:
            register("backup_done", lambda e: f"backup of {e['data']['size']} bytes")

    pm = build_plugin_manager(load_entry_points=False)
    pm.register(Formats(), name="formats")
    use_event_formats(pm)
    try:
        assert event_text({"kind": "backup_done", "data": {"size": 7}}) == "backup of 7 bytes"
        assert pm.registries.event_formats.owner("backup_done") == "formats"
    finally:
        use_event_formats(build_plugin_manager(load_entry_points=False))


def test_tag_options_of_the_events_command() -> None:
    assert parse_tags(["evaluation=ev-1", "run=r.2"]) == {"evaluation": "ev-1", "run": "r.2"}
    with pytest.raises(ValidationError, match=r"--tag: 'evaluation' is not NAME=ID"):
        parse_tags(["evaluation"])


def test_the_events_command_follows_a_tag_and_prints_the_plugin_s_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dockyard events --tag evaluation=ID`` against a served dockyard (real HTTP)."""
    from dockyard.api.cli import main as cli_main
    from tests.test_api_schema import served

    with served(tmp_path) as base:
        journal = EventJournal(tmp_path / "data" / "events.sqlite3")  # beside the server's
        progress = {"state": "running", "progress": {"tasks_total": 4, "tasks_done": 1}}
        for deployment, kind, tags, data in [
            ("ev-a", "evaluation", {"evaluation": "ev-a"}, progress),
            ("app", "created", {}, {}),
            ("ev-b", "evaluation", {"evaluation": "ev-b"}, {"state": "queued"}),
        ]:
            journal.append(
                StreamEvent(id=0, deployment_id=deployment, kind=kind, at=0, tags=tags, data=data)
            )
        journal.close()
        common = ["--url", base, "--token", TEST_TOKEN]
        assert cli_main(["events", "--tag", "evaluation=ev-a", *common]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and lines[0].endswith("ev-a -     evaluation running (1/4 tasks)")
        assert cli_main(["events", "--tag", "evaluation", *common]) == 2
        err = capsys.readouterr().err
        assert err == "dockyard: error: --tag: 'evaluation' is not NAME=ID\n"
        assert cli_main(["events", "--tag", "colour=red", *common]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dockyard: error: colour: no loaded plugin registers this filter")
