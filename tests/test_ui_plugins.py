"""The status page's plugin parts: panels, pages, chart series and event texts come from
plugins through ``ApiRegistrar.ui_*``. The evaluation plugin's panel, pages and bars go when
the plugin is disabled; the out-of-tree test plugin adds a panel, pages, a series and an
event text the same way, escaped and behind the session; names two plugins take are errors
naming both; a non-editable install (a wheel) carries every template."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from dockyard.api.events import StreamEvent
from dockyard.api.plugins import collect_api_plugins
from dockyard.api.ui import Bar, UiSite
from dockyard.core import hookimpl
from dockyard.core.config import Settings
from dockyard.core.errors import PluginError
from dockyard.core.models import SlotState
from dockyard.core.plugins import build_plugin_manager
from tests.conftest import ROOT, TEST_TOKEN
from tests.test_bluegreen_fast import SPEC
from tests.test_plugin_parts import serving, testplugin, testplugin_site

__all__ = ["testplugin", "testplugin_site"]  # the installed out-of-tree plugin's fixtures

HOSTILE = "<script>alert(1)</script>"


def log_in(client: Any) -> None:
    """Open a UI session and drop the bearer token: what follows uses the cookie only."""
    client.headers.pop("Authorization", None)
    r = client.post("/ui/login", data={"token": TEST_TOKEN}, follow_redirects=False)
    assert r.status_code == 303, r.text


def bar_kinds(chart: str) -> list[str]:
    return re.findall(r'<g class="bar ([a-z_-]+) ', chart)


def legend_keys(chart: str) -> list[str]:
    return re.findall(r'<span class="key ([a-z_-]+)">', chart)


# ---------------------------------------------------------------- the evaluation plugin
def test_the_evaluation_panel_and_pages_come_from_its_plugin(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47242, port_range_end=47250) as client:
        log_in(client)
        index = client.get("/ui/").text
        assert '<div id="evaluations" data-fragment="/ui/fragments/evaluations">' in index
        assert "No evaluations." in client.get("/ui/fragments/evaluations").text
        evaluation = client.get("/ui/evaluations/ev-nope")
        assert evaluation.status_code == 200
        assert 'data-page="evaluation"' in evaluation.text
        assert 'data-stream-query="evaluation=ev-nope"' in evaluation.text
        assert "script-src 'self'" in evaluation.headers["content-security-policy"]
        body = client.get("/ui/fragments/evaluation/ev-nope")
        assert body.status_code == 200 and 'class="error"' in body.text
        client.cookies.clear()
        # the plugin's pages are behind the session like the core's
        assert client.get("/ui/fragments/evaluation/ev-nope").status_code == 401
        assert client.get("/ui/fragments/evaluations").status_code == 401
        away = client.get("/ui/evaluations/ev-nope", follow_redirects=False)
        assert away.status_code == 303 and away.headers["location"] == "/ui/login"


def test_without_the_evaluation_plugin_the_status_page_has_no_evaluation_parts(
    fake_client_factory: Any,
) -> None:
    with fake_client_factory(
        disable=["evaluation"], port_range_start=47252, port_range_end=47260
    ) as client:
        assert client.post("/v1/repos?wait=true", json=SPEC).status_code == 200
        log_in(client)
        index = client.get("/ui/")
        assert index.status_code == 200 and 'data-deployment="app"' in index.text
        assert "evaluat" not in index.text.lower()
        for path in (
            "/ui/evaluations/x",
            "/ui/fragments/evaluations",
            "/ui/fragments/evaluation/x",
        ):
            assert client.get(path).status_code == 404, path
        chart = client.get("/ui/fragments/chart").text
        assert bar_kinds(chart) == ["deploy"]
        assert legend_keys(chart) == ["deploy", "failed"]
        # the timeline reads the core's events as before
        timeline = client.get("/ui/fragments/timeline").text
        assert "HEALTHY → PROMOTED" in timeline


def _entry(n: int, kind: str, at: float, **fields: Any) -> StreamEvent:
    return StreamEvent(id=n, deployment_id="app", kind=kind, at=at, **fields)


def test_the_chart_shows_every_series_in_the_order_they_finished() -> None:
    pm = build_plugin_manager(load_entry_points=False)
    site = UiSite(collect_api_plugins(pm, Settings()).ui)
    building, promoted = SlotState.BUILDING, SlotState.PROMOTED
    entries = [
        _entry(1, "slot_transition", 10.0, color="blue", to_state=building),
        _entry(
            2,
            "evaluation",
            12.0,
            tags={"evaluation": "ev-1"},
            data={"final": True, "ok": False, "total_s": 7.5},
        ),
        _entry(3, "slot_transition", 13.0, color="blue", to_state=promoted),
        _entry(4, "evaluation", 14.0, data={"final": False, "total_s": 1.0}),
    ]
    assert site.bars(entries) == [
        Bar(label="ev-1", seconds=7.5, ok=False, kind="evaluation", at=12.0),
        Bar(label="app", seconds=3.0, ok=True, kind="deploy", at=13.0),
    ]
    assert site.colours() == {"deploy": "#1f5fbf", "evaluation": "#7b4fc4"}
    assert site.event_text(_entry(5, "evaluation", 1.0, data={"state": "running"})) == (
        "evaluation running"
    )
    assert site.event_text(_entry(6, "source_fetched", 1.0)) == "source fetched"
    bare = UiSite(
        collect_api_plugins(
            build_plugin_manager(load_entry_points=False, disable=["evaluation"]), Settings()
        ).ui
    )
    assert [b.kind for b in bare.bars(entries)] == ["deploy"]
    assert bare.event_text(_entry(5, "evaluation", 1.0, data={"state": "running"})) == "evaluation"


# ---------------------------------------------------------------- the out-of-tree plugin
def test_a_plugin_panel_is_on_the_index_and_its_fragment_refreshes_escaped(
    testplugin: Path, tmp_path: Path, example_plugin_module: Any
) -> None:
    with serving(tmp_path, example_plugin_module) as client:
        headers = dict(client.headers)
        log_in(client)
        index = client.get("/ui/").text
        assert '<div id="notes" data-fragment="/ui/fragments/notes">' in index
        assert "<h2>Notes</h2>" in index
        assert "No notes." in client.get("/ui/fragments/notes").text
        r = client.post(
            "/v1/testplugin/notes",
            json={"key": "n1", "text": HOSTILE, "seconds": 2.5},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        fragment = client.get("/ui/fragments/notes")
        assert fragment.status_code == 200
        assert "script-src 'self'" in fragment.headers["content-security-policy"]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment.text
        assert "<script>alert" not in fragment.text
        index = client.get("/ui/").text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index and "<script>alert" not in index
        # its series and its event text, escaped too
        hostile_key = "<b>k</b>"
        assert (
            client.post(
                "/v1/testplugin/notes", json={"key": hostile_key, "text": "x"}, headers=headers
            ).status_code
            == 201
        )
        chart = client.get("/ui/fragments/chart").text
        assert bar_kinds(chart) == ["notes"] and 'fill="#2a9d8f"' in chart
        assert sorted(legend_keys(chart)) == ["deploy", "evaluation", "failed", "notes"]
        timeline = client.get("/ui/fragments/timeline").text
        assert "note n1" in timeline
        assert "note &lt;b&gt;k&lt;/b&gt;" in timeline and "<b>k" not in timeline
        # the timeline's new entries only: what the page's script prepends
        first = int(re.findall(r'data-id="(\d+)"', timeline)[-1])
        newer = client.get("/ui/fragments/timeline", params={"after": first}).text
        assert "note n1" not in newer and "note &lt;b&gt;" in newer
        bad = client.get("/ui/fragments/timeline", params={"after": -1})
        assert bad.status_code == 400 and "after" in bad.text


def test_a_plugin_ui_route_needs_a_session_unless_public(
    testplugin: Path, tmp_path: Path, example_plugin_module: Any
) -> None:
    with serving(tmp_path, example_plugin_module) as client:
        client.post("/v1/testplugin/notes", json={"key": "n1", "text": HOSTILE})
        client.headers.pop("Authorization")
        # fail closed: no session, no page (a bearer token does not open /ui either)
        assert client.get("/ui/testplugin/notes/n1").status_code == 401
        assert client.get("/ui/fragments/notes").status_code == 401
        assert client.get("/ui/testplugin/notes/n1", headers=AUTH_HEADER).status_code == 401
        about = client.get("/ui/testplugin/about")
        assert about.status_code == 200 and 'id="about"' in about.text
        assert "script-src 'self'" in about.headers["content-security-policy"]
        log_in(client)
        note = client.get("/ui/testplugin/notes/n1")
        assert note.status_code == 200 and 'data-page="testplugin-note"' in note.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in note.text
        assert "<script>alert" not in note.text
        # not in the API's schema
        paths = client.get("/docs/openapi.json").json()["paths"]
        assert not any(p.startswith("/ui") for p in paths)
        assert client.get("/ui/fragments/nope").status_code == 404


AUTH_HEADER = {"Authorization": f"Bearer {TEST_TOKEN}"}


def test_a_plugin_scope_that_implies_read_opens_the_status_page(
    testplugin: Path, tmp_path: Path, example_plugin_module: Any
) -> None:
    """The test plugin's ``notes`` scope implies ``read``: its token logs in; a token with
    only ``evaluate`` (which implies nothing) does not."""
    with serving(tmp_path, example_plugin_module) as client:
        notes = client.post("/v1/tokens", json={"name": "n", "scopes": ["notes"]}).json()
        evaluate = client.post("/v1/tokens", json={"name": "e", "scopes": ["evaluate"]}).json()
        client.headers.pop("Authorization")
        refused = client.post("/ui/login", data={"token": evaluate["token"]})
        assert refused.status_code == 401 and "lacks the read scope" in refused.text
        opened = client.post("/ui/login", data={"token": notes["token"]}, follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/ui/"
        index = client.get("/ui/")
        assert index.status_code == 200 and '<div id="notes"' in index.text


# ---------------------------------------------------------------- names two plugins take
class Taker:
    """A plugin taking a status-page name."""

    def __init__(self, part: str, name: str) -> None:
        self.part, self.name = part, name

    @hookimpl
    def dockyard_api_plugins(self, register: Any) -> None:
        async def context(state: Any) -> dict[str, Any]:
            return {}

        if self.part == "panel":
            register.ui_panel(self.name, title="t", template="x.html", context=context)
        elif self.part == "chart":
            register.ui_chart(self.name, lambda entries: [], colour="#123")
        elif self.part == "text":
            register.ui_event_text(self.name, lambda entry: "")
        else:
            register.ui_templates(ROOT / "api" / "ui" / "templates", prefix=self.name)


@pytest.mark.parametrize(
    ("part", "name", "owner", "what"),
    [
        ("panel", "evaluations", "evaluation", "UI panel"),
        ("panel", "deployments", "dockyard", "UI panel"),
        ("panel", "timeline", "dockyard", "UI panel"),
        ("chart", "evaluation", "evaluation", "chart series"),
        ("chart", "deploy", "dockyard", "chart series"),
        ("text", "evaluation", "evaluation", "timeline text for event kind"),
        ("text", "slot_transition", "dockyard", "timeline text for event kind"),
        ("templates", "evaluation", "evaluation", "UI template prefix"),
    ],
)
def test_a_status_page_name_taken_is_an_error_naming_both(
    part: str, name: str, owner: str, what: str
) -> None:
    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("taker", Taker(part, name))])
    with pytest.raises(PluginError) as raised:
        collect_api_plugins(pm, Settings())
    message = str(raised.value)
    assert message.startswith(f"{what} {name!r} added twice (by "), message
    assert {repr(owner), "'taker'"} <= set(re.findall(r"'[a-z_]+'", message.split("by ")[1]))


@pytest.mark.parametrize(
    ("part", "name", "expected"),
    [
        ("panel", "Bad Name", "UI panel 'Bad Name': use 1-40 of a-z"),
        ("chart", "x\"'", "chart series 'x\"\\'': use 1-40"),
    ],
)
def test_a_status_page_name_that_is_no_name_is_refused(part: str, name: str, expected: str) -> None:
    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("taker", Taker(part, name))])
    with pytest.raises(PluginError, match=re.escape(expected)):
        collect_api_plugins(pm, Settings())


def test_a_series_colour_must_be_a_colour() -> None:
    class Painter:
        @hookimpl
        def dockyard_api_plugins(self, register: Any) -> None:
            register.ui_chart("mine", lambda entries: [], colour="red;x")

    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("painter", Painter())])
    with pytest.raises(PluginError, match=r"colour 'red;x' is not #rgb or #rrggbb"):
        collect_api_plugins(pm, Settings())


# ---------------------------------------------------------------- packaging
@pytest.mark.slow
def test_the_wheel_carries_the_status_page_and_the_plugins_templates(tmp_path: Path) -> None:
    """What a non-editable install (the controller image builds a wheel) gets: every
    template and static file of ``api/ui`` and of the evaluation plugin."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("api", "core", "backends", "routers", "plugins", "client", "testing"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--no-build-isolation", "--wheel-dir", str(out), str(source),
        ],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("dockyard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"dockyard/api/ui/{p.relative_to(ROOT / 'api' / 'ui')}"
        for p in (ROOT / "api" / "ui").rglob("*")
        if p.suffix in (".html", ".js", ".css")
    } | {
        f"dockyard/plugins/evaluation/templates/{p.name}"
        for p in (ROOT / "plugins" / "evaluation" / "templates").glob("*.html")
    }
    assert "dockyard/plugins/evaluation/templates/panel.html" in expected
    assert "dockyard/api/ui/static/ui.js" in expected
    assert expected - names == set()
