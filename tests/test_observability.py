"""Fast tests of the observability pieces: the metrics route's scope, the README's metrics
table, log formats (dockyard's and uvicorn's access lines), the event hub's bounded client
buffers, the status page's session cookie and escaping, and the CLI on the event stream.

The proofs on a real engine are ``test_observability_e2e.py`` and ``test_ui_browser.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from dockyard.api.events import EventHub, EventJournal
from dockyard.core import logs
from dockyard.core import metrics as m
from dockyard.core.models import Event
from tests.conftest import AUTH, ROOT, TEST_SETTINGS, TEST_TOKEN, free_port
from tests.test_bluegreen_fast import SPEC


# ------------------------------------------------------------------------------ metrics
def test_metrics_need_the_read_scope(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47200, port_range_end=47210) as client:
        r = client.post("/v1/tokens", json={"name": "eval-only", "scopes": ["evaluate"]})
        evaluate_only = r.json()["token"]
        r = client.post("/v1/tokens", json={"name": "reader", "scopes": ["read"]})
        reader = r.json()["token"]
        assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
        bad = client.get("/metrics", headers={"Authorization": f"Bearer {evaluate_only}"})
        assert bad.status_code == 403 and "read" in bad.json()["message"]
        r = client.get("/metrics", headers={"Authorization": f"Bearer {reader}"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert "# TYPE dockyard_deploys_total counter" in r.text
        assert 'dockyard_slots{state="PROMOTED"}' in r.text


def test_the_readme_lists_every_metric_once() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = re.findall(r"^\| `(dockyard_[a-z_]+)` \| (\w+) \|", readme, re.M)
    exported = []
    for collector in list(m.REGISTRY._collector_to_names):
        desc = collector.describe()[0]
        exported.append((desc.name + ("_total" if desc.type == "counter" else ""), desc.type))
    assert sorted(listed) == sorted(exported)


def _sample(client: Any, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and set(labels.items()) <= set(sample.labels.items())
    )


def test_failed_builds_deploys_and_refused_evaluations_are_counted_by_reason(
    fake_client_factory: Any,
) -> None:
    names = [
        ("dockyard_builds_total", {"outcome": "failed", "reason": "build_failed"}),
        ("dockyard_deploys_total", {"outcome": "failed", "reason": "build_failed"}),
        ("dockyard_deploys_total", {"outcome": "failed", "reason": "health_check_failed"}),
        ("dockyard_deploy_duration_seconds_count", {"outcome": "failed"}),
        ("dockyard_evaluations_total", {"state": "failed", "reason": "invalid_github_url"}),
        ("dockyard_evaluation_tasks_total", {"outcome": "cancelled"}),
        ("dockyard_health_probe_duration_seconds_count", {"result": "failed"}),
    ]
    with fake_client_factory(port_range_start=47242, port_range_end=47250) as client:
        before = [_sample(client, name, **labels) for name, labels in names]
        broken = {**SPEC, "id": "broken", "build_args": {"BUILD": "fail"}}
        sick = {**SPEC, "id": "sick", "build_args": {"HEALTH": "fail"}}
        for spec in (broken, sick):
            assert client.post("/v1/repos?wait=true", json=spec).status_code == 200
        r = client.post(
            "/v1/integration/evaluate-miner",
            json={"miner": {"github_url": "not a url"}, "tasks": [{"id": "t"}]},
        )
        assert r.json()["state"] == "failed", r.text
        after = [_sample(client, name, **labels) for name, labels in names]
    moved = {
        f"{n}{sorted(lab.items())}": a - b
        for (n, lab), a, b in zip(names, after, before, strict=True)
    }
    assert list(moved.values())[:5] == [1, 1, 1, 2, 1], moved
    assert list(moved.values())[5] == 1 and list(moved.values())[6] >= 1, moved


# ------------------------------------------------------------------------------ logs
def test_json_and_text_lines_carry_the_correlation_ids() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("json", "text"):
            out = io.StringIO()
            logs.configure_logging("INFO", fmt, stream=out)  # type: ignore[arg-type]
            with logs.bound(request_id="rid-1", deployment_id="app"):
                logging.getLogger("dockyard.test").info("hello %s", "there", extra={"n": 1})
            logging.getLogger("dockyard.test").info("no ids")
            first, second = out.getvalue().splitlines()
            if fmt == "json":
                line = json.loads(first)
                assert line["message"] == "hello there" and line["n"] == 1
                assert (line["request_id"], line["deployment_id"]) == ("rid-1", "app")
                assert "request_id" not in json.loads(second)
            else:
                assert "[rid=rid-1 dep=app]: hello there" in first
                assert second.endswith("dockyard.test: no ids")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


@pytest.fixture
def json_served_app(tmp_path: Path) -> Iterator[tuple[str, io.StringIO]]:
    """dockyard served by uvicorn the way ``dockyard serve --log-format json`` does."""
    from dockyard.api.app import create_app
    from dockyard.core.config import Settings

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure_logging("INFO", "json", stream=out)
    port = free_port()
    cfg = Settings(data_dir=str(tmp_path / "data"), runtime="example", **TEST_SETTINGS)
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services
    from tests.fakes import FakeRuntime

    services = Services.build(
        cfg, build_plugin_manager(load_entry_points=False), runtime=FakeRuntime()
    )
    config = uvicorn.Config(
        create_app(cfg, services=services),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="info",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", out
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_uvicorn_access_lines_are_json_with_the_request_id(
    json_served_app: tuple[str, io.StringIO],
) -> None:
    url, out = json_served_app
    request = urllib.request.Request(
        f"{url}/v1/plugins", headers={**AUTH, "X-Request-ID": "access-0001"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    for _ in range(50):
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        access = [line for line in lines if line["logger"] == "uvicorn.access"]
        if access:
            break
        time.sleep(0.05)
    assert access and access[-1]["request_id"] == "access-0001", out.getvalue()
    assert "/v1/plugins" in access[-1]["message"]


# ------------------------------------------------------------------------------ events
def _event(n: int) -> Event:
    return Event(deployment_id="app", kind="note", seq=n, data={"n": n})


async def test_a_slow_stream_client_is_caught_up_from_the_journal(tmp_path: Path) -> None:
    hub = EventHub(EventJournal(tmp_path / "events.sqlite3"), heartbeat_s=0.2)
    hub.dockyard_event(_event(0))
    stream = hub.follow(0, deployment="app")
    first = await anext(stream)
    assert first is not None and first.id == 1
    # Far more than one client's buffer arrives while it does not read.
    for n in range(1, 701):
        hub.dockyard_event(_event(n))
        hub.dockyard_event(Event(deployment_id="other", kind="note"))  # filtered out
    got = []
    while len(got) < 700:
        entry = await asyncio.wait_for(anext(stream), 5)
        assert entry is not None
        got.append(entry.data["n"])
    assert got == list(range(1, 701))  # none missed, none twice, in order
    assert await asyncio.wait_for(anext(stream), 5) is None  # a heartbeat when idle
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)


def test_the_event_page_and_its_validation(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47212, port_range_end=47220) as client:
        assert client.post("/v1/repos?wait=true", json=SPEC).status_code == 200
        entries = client.get("/v1/events", params={"deployment": "app"}).json()
        assert [e["kind"] for e in entries][:2] == ["created", "slot_transition"]
        assert entries[-1]["to_state"] == "PROMOTED"
        newest = client.get("/v1/events", params={"newest": True, "limit": 1}).json()
        assert [e["id"] for e in newest] == [entries[-1]["id"]]
        bad = client.get("/v1/events", params={"deployment": "<b>"})
        assert bad.status_code == 400 and "deployment" in bad.json()["message"]


# ------------------------------------------------------------------------------ status page
def test_the_status_page_session_and_escaping(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47222, port_range_end=47230) as client:
        client.headers.pop("Authorization")
        assert client.get("/ui/", follow_redirects=False).headers["location"] == "/ui/login"
        assert client.get("/ui/fragments/deployments").status_code == 401
        assert client.get("/ui/events/stream").status_code == 401
        r = client.post("/ui/login", data={"token": "dy_00000000_" + "x" * 43})
        assert r.status_code == 401 and "not valid" in r.text
        r = client.post("/ui/login", data={"token": TEST_TOKEN}, follow_redirects=False)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert TEST_TOKEN not in cookie
        hostile = "https://github.com/acme/<script>alert(1)</script>"
        r = client.post(
            "/v1/integration/evaluate-miner",
            json={"miner": {"github_url": hostile}, "tasks": [{"id": "t"}]},
            headers=AUTH,
        )
        assert r.status_code < 300, r.text
        page = client.get("/ui/")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "<script>alert" not in page.text
        fragment = client.get("/ui/fragments/evaluations")
        assert "&lt;script&gt;" in fragment.text and "<script>alert" not in fragment.text
        r = client.post("/ui/logout", follow_redirects=False)
        assert r.status_code == 303
        assert client.get("/ui/fragments/deployments").status_code == 401


# ------------------------------------------------------------------------------ CLI
def test_cli_wait_follows_the_stream_and_events_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dockyard.api.cli import main
    from dockyard.core.config import Settings
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services
    from tests.fakes import FakeRuntime, FakeSource
    from tests.test_evaluation_client import live_dockyard

    cfg = Settings(
        data_dir=str(tmp_path / "data"),
        **{**TEST_SETTINGS, "port_range_start": 47232, "port_range_end": 47240},
    )
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=FakeRuntime(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    with live_dockyard(cfg, services) as (url, _):
        flags = ["--url", url, "--token", TEST_TOKEN]
        assert main(["deploy", SPEC["repo"], "--id", "app", "--wait", *flags,
                     "--ref", SPEC.get("ref") or "v1"]) == 0  # fmt: skip
        out = capsys.readouterr().out
        assert "app: deploy started" in out
        for step in ("IDLE -> BUILDING", "source fetched", "STAGING -> HEALTHY",
                     "HEALTHY -> PROMOTED", "promoted=blue"):  # fmt: skip
            assert step in out, out
        assert out.count("HEALTHY -> PROMOTED") == 1
        assert main(["events", "app", *flags]) == 0
        out = capsys.readouterr().out
        assert "created" in out and "HEALTHY -> PROMOTED" in out
        assert main(["events", "app", "--json", *flags]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert lines[-1]["to_state"] == "PROMOTED" and lines[-1]["deployment_id"] == "app"


def test_a_bad_parameter_is_named_as_the_client_sends_it(fake_client_factory: Any) -> None:
    """A header's or a query's validation error names it as the client wrote it."""
    with fake_client_factory() as client:
        r = client.get("/v1/events/stream", headers={**AUTH, "Last-Event-ID": "yesterday"})
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith("Last-Event-ID:"), r.text
        r = client.get("/v1/events?after=-1", headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith("after:"), r.text
        r = client.get("/v1/status?state=NOPE", headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith("state:"), r.text
