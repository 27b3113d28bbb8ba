"""Plugins that own their parts: an out-of-tree plugin (``tests/plugins/dockyard_testplugin``),
pip-installed and found through its entry point, brings a route, a lifespan task, its own
records and its own hookspec; the evaluation plugin is built the same way, so ``core/`` and
``api/`` import nothing of it; evaluations stored by the previous schema survive the
migration to plugin records; deprecated ``eval_*`` settings still work."""

from __future__ import annotations

import argparse
import ast
import asyncio
import collections
import contextlib
import io
import json
import logging
import re
import sqlite3
import sys
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dockyard.api.cli import _parser as cli_parser
from dockyard.api.cli import main as cli_main
from dockyard.api.cli_plugins import CliRegistrar
from dockyard.core import hookimpl
from dockyard.core.config import Settings, load_settings
from dockyard.core.errors import PluginError
from dockyard.core.hookspecs import hookspec
from dockyard.core.metrics import REGISTRY
from dockyard.core.plugins import build_plugin_manager
from dockyard.plugins.evaluation import records
from dockyard.plugins.evaluation.models import Evaluation, Limits, Miner
from dockyard.plugins.evaluation.options import EvaluationConfig
from dockyard.plugins.sqlite_store import DB_FILENAME, MIGRATIONS, SqliteStore
from tests.conftest import AUTH, ROOT, TEST_SETTINGS, pip_install_target

TEST_PLUGIN = ROOT / "tests" / "plugins" / "dockyard_testplugin"


@pytest.fixture(scope="module")
def testplugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin pip-installed (with its entry point) into a private directory."""
    return pip_install_target(TEST_PLUGIN, tmp_path_factory.mktemp("testplugin-site"))


@pytest.fixture
def testplugin(testplugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed test plugin on ``sys.path`` for one test, then gone again."""
    monkeypatch.syspath_prepend(str(testplugin_site))
    monkeypatch.delenv("DOCKYARD_DISABLE_PLUGINS", raising=False)
    yield testplugin_site
    for name in [m for m in sys.modules if m.split(".")[0] == "dockyard_testplugin"]:
        del sys.modules[name]


class OtherGreeter:
    """A second plugin implementing the test plugin's own hook."""

    @hookimpl
    def testplugin_greetings(self, name: str) -> str:
        return f"hi {name} from another plugin"


@contextlib.contextmanager
def serving(tmp_path: Path, example_plugin_module: Any, *extra: tuple[str, object]) -> Any:
    from litestar.testing import TestClient

    from dockyard.api.app import create_app
    from dockyard.core.services import Services

    cfg = Settings(
        data_dir=str(tmp_path / "data"),
        runtime="example",
        plugins={"testplugin": {"tick_s": 0.01}},
        **TEST_SETTINGS,
    )
    pm = build_plugin_manager(extra_plugins=list(extra))
    services = Services.build(cfg, pm, runtime=example_plugin_module.ExampleRuntime(cfg))
    with TestClient(create_app(cfg, services=services)) as client:
        client.headers.update(AUTH)
        yield client


def test_the_out_of_tree_plugin_is_found_through_its_entry_point(testplugin: Path) -> None:
    pm = build_plugin_manager()
    assert pm.has_plugin("testplugin")
    assert next(p for p in pm.describe() if p["name"] == "testplugin")["version"] == "0.1.0"
    # Its own hookspec exists only because it added it.
    assert pm.hook.testplugin_greetings.spec is not None
    assert pm.hook.testplugin_greetings(name="x") == ["hello x from the test plugin"]


def test_without_the_plugin_its_hookspec_is_absent_and_implementing_it_fails(
    testplugin: Path,
) -> None:
    pm = build_plugin_manager(disable=["testplugin"])
    assert not pm.has_plugin("testplugin")
    with pytest.raises(PluginError, match=r"other.*testplugin_greetings"):
        build_plugin_manager(disable=["testplugin"], extra_plugins=[("other", OtherGreeter())])


def test_the_plugin_brings_routes_records_hookspec_and_a_lifespan_task(
    testplugin: Path, tmp_path: Path, example_plugin_module: Any
) -> None:
    with serving(tmp_path, example_plugin_module, ("other", OtherGreeter())) as client:
        # its route, storing its own records
        for key in ("b", "a"):
            response = client.post("/v1/testplugin/notes", json={"key": key, "text": key * 3})
            assert response.status_code == 201, response.text
        assert client.get("/v1/testplugin/notes").json() == [
            {"key": "b", "text": "bbb"},
            {"key": "a", "text": "aaa"},
        ]
        # its own hook, implemented by itself and by another plugin
        assert client.get("/v1/testplugin/greet", params={"name": "ada"}).json() == [
            "hello ada from the test plugin",
            "hi ada from another plugin",
        ]
        # its lifespan task runs while the app serves
        for _ in range(200):
            state = client.get("/v1/testplugin/ticks").json()
            if state["ticks"] >= 3:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert state["running"] is True and state["ticks"] >= 3
        # the routes are in the schema like the built-ins'
        paths = client.get("/docs/openapi.json").json()["paths"]
        assert "/v1/testplugin/notes" in paths

    async def stored() -> tuple[Any, list[Any]]:
        store = SqliteStore(tmp_path / "data" / DB_FILENAME)
        await store.open()
        try:
            lifespan = await store.get_record("testplugin", "lifespan")
            return lifespan, await store.list_records("testplugin", labels={"kind": "note"})
        finally:
            await store.close()

    lifespan, notes = asyncio.run(stored())
    # the lifespan's exit ran (after the task stopped) and its records outlive the app
    assert lifespan is not None and lifespan.value["ticks"] >= 3
    assert [note.key for note in notes] == ["b", "a"]


class GreetingSpecs:
    """An in-process plugin's own hookspec."""

    @staticmethod
    @hookspec
    def greeting_for(name: str) -> str:
        """Greet ``name``."""


class Definer:
    @hookimpl
    def dockyard_add_hookspecs(self, add: Any) -> None:
        add(GreetingSpecs)


class Implementer:
    @hookimpl
    def greeting_for(self, name: str) -> str:
        return f"hey {name}"


def test_dockyard_add_hookspecs_works_whichever_plugin_registers_first() -> None:
    for order in (
        [("def", Definer()), ("impl", Implementer())],
        [("impl", Implementer()), ("def", Definer())],
    ):
        pm = build_plugin_manager(load_entry_points=False, extra_plugins=order)
        assert pm.hook.greeting_for(name="bo") == ["hey bo"]


def test_a_plugin_route_needs_its_declared_scope(
    testplugin: Path, tmp_path: Path, example_plugin_module: Any
) -> None:
    with serving(tmp_path, example_plugin_module) as client:
        client.headers.pop("Authorization")
        assert client.get("/v1/testplugin/notes").status_code == 401


def test_the_plugin_registers_an_event_tag_a_status_filter_a_scope_and_a_format(
    testplugin: Path, tmp_path: Path, example_plugin_module: Any
) -> None:
    """The test plugin's ``note`` event tag, ``noted`` status filter, ``notes`` token scope
    and ``testplugin_note`` format, each registered the way the evaluation plugin does."""
    from dockyard.api.cli_events import event_text, use_event_formats

    with serving(tmp_path, example_plugin_module) as client:
        for key in ("k1", "k2"):
            assert client.post("/v1/testplugin/notes", json={"key": key}).status_code == 201
        # its event tag: the journal is read per note
        page = client.get("/v1/events", params={"note": "k1"}).json()
        assert [(e["kind"], e["tags"], e["note_id"]) for e in page] == [
            ("testplugin_note", {"note": "k1"}, "k1")
        ]
        assert page[0]["evaluation_id"] is None  # another plugin's tag, absent here
        bad = client.get("/v1/events", params={"note": "no way"})
        assert bad.status_code == 400 and bad.json()["message"] == "note: not a valid id"
        # its status filter
        assert client.get("/v1/status", params={"noted": "true"}).json()["deployments"] == []
        bad = client.get("/v1/status", params={"noted": "maybe"})
        assert bad.status_code == 400 and bad.json()["message"] == "noted: must be true or false"
        schema = client.get("/docs/openapi.json").json()
        events_query = {p["name"] for p in schema["paths"]["/v1/events"]["get"]["parameters"]}
        status_query = {p["name"] for p in schema["paths"]["/v1/status"]["get"]["parameters"]}
        assert {"note", "evaluation"} <= events_query and {"noted", "evaluation"} <= status_query
        # its token scope: granted apart from the core's, implying read
        scopes = schema["components"]["schemas"]["TokenRequest"]["properties"]["scopes"]
        assert scopes["items"]["enum"] == ["admin", "deploy", "evaluate", "notes", "read"]
        made = client.post("/v1/tokens", json={"name": "notes", "scopes": ["notes"]})
        assert made.status_code == 201, made.text
        reader = client.post("/v1/tokens", json={"name": "r", "scopes": ["read"]}).json()
        as_notes = {"Authorization": f"Bearer {made.json()['token']}"}
        as_reader = {"Authorization": f"Bearer {reader['token']}"}
        assert client.get("/v1/testplugin/secret", headers=as_notes).status_code == 200
        assert client.get("/v1/status", headers=as_notes).status_code == 200  # implies read
        assert (
            client.post("/v1/testplugin/notes", json={"key": "x"}, headers=as_notes).status_code
            == 403
        )
        assert client.get("/v1/testplugin/secret", headers=as_reader).status_code == 403
        assert client.get("/v1/testplugin/secret").status_code == 200  # admin grants all
    # its event format, for ``dockyard events``
    use_event_formats(build_plugin_manager())
    try:
        assert event_text({"kind": "testplugin_note", "data": {"key": "k1"}}) == "note k1 added"
    finally:
        use_event_formats(build_plugin_manager(load_entry_points=False))


def test_a_lifespan_that_fails_to_start_names_its_plugin(
    tmp_path: Path, example_plugin_module: Any
) -> None:
    class Broken:
        @hookimpl
        def dockyard_api_plugins(self, register: Any) -> None:
            @contextlib.asynccontextmanager
            async def lifespan(context: Any) -> Any:
                raise RuntimeError("no database here")
                yield

            register.lifespan(lifespan)

    with (
        pytest.raises(BaseException) as raised,
        serving(tmp_path, example_plugin_module, ("broken", Broken())),
    ):
        pass
    errors = [raised.value]
    while isinstance(errors[-1], BaseExceptionGroup):  # the test client's task group
        errors.append(errors[-1].exceptions[0])
    assert isinstance(errors[-1], PluginError)
    assert "'broken' failed to start: no database here" in str(errors[-1])


# ---------------------------------------------------------------- CLI commands
class Clash:
    """A plugin adding commands whose names are taken."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def dockyard_cli_commands(self, register: CliRegistrar) -> None:
        register.api_command(self.name, lambda args: 0, help="mine")


def test_the_plugin_adds_a_command_to_the_cli(
    testplugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dockyard.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[plugins.testplugin]\ntick_s = 0.5\n')
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "testplugin-greet" in capsys.readouterr().out
    assert cli_main(["--config", str(config), "testplugin-greet", "ada"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "hello ada from the test plugin",
        "tick_s=0.5",
    ]
    # its handler's error is one line, like every command's
    assert cli_main(["--config", str(config), "testplugin-greet", " "]) == 2
    captured = capsys.readouterr()
    assert captured.err == "dockyard: error: testplugin-greet: NAME must not be empty\n"


@pytest.mark.parametrize("where", ["environment", "config"])
def test_without_the_plugin_its_command_is_unknown(
    testplugin: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    config = tmp_path / "dockyard.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    if where == "environment":
        monkeypatch.setenv("DOCKYARD_DISABLE_PLUGINS", "testplugin")
    else:
        config.write_text(f'data_dir = "{tmp_path / "data"}"\ndisable_plugins = ["testplugin"]\n')
    with pytest.raises(SystemExit) as exited:
        cli_main(["--config", str(config), "testplugin-greet", "ada"])
    assert exited.value.code == 2
    assert "invalid choice: 'testplugin-greet'" in capsys.readouterr().err


def test_the_evaluation_commands_come_from_the_evaluation_plugin() -> None:
    def commands(pm: Any) -> set[str]:
        parser = cli_parser(pm)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    assert {"evaluate", "sandbox-image"} <= commands(build_plugin_manager(load_entry_points=False))
    bare = commands(build_plugin_manager(load_entry_points=False, disable=["evaluation"]))
    assert "evaluate" not in bare and "sandbox-image" not in bare and "deploy" in bare


@pytest.mark.parametrize(
    ("name", "owner"), [("deploy", "dockyard"), ("gc", "dockyard"), ("evaluate", "evaluation")]
)
def test_a_command_name_taken_is_an_error_naming_both(name: str, owner: str) -> None:
    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("clash", Clash(name))])
    with pytest.raises(PluginError) as raised:
        cli_parser(pm)
    # pluggy calls the newest plugin first: the built-in commands are always added before
    message = str(raised.value)
    assert f"command {name!r} added twice (by " in message
    assert {f"{owner!r}", "'clash'"} <= set(re.findall(r"'[a-z]+'", message.split("by ")[1]))


# ---------------------------------------------------------------- the evaluation plugin
def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_and_api_import_nothing_of_the_evaluation_plugin() -> None:
    """No exceptions: the CLI's evaluation commands come through ``dockyard_cli_commands``,
    the status list's ``evaluation=`` filter through ``dockyard_register_status_filters``."""
    offenders = []
    for package in ("core", "api"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if any(name.startswith("dockyard.plugins.evaluation") for name in _imports(path)):
                offenders.append(str(path.relative_to(ROOT)))
            text = path.read_text()
            if "EVALUATION_LABEL" in text or re.search(r"[\"']dockyard_evaluation[\"']", text):
                offenders.append(f"{path.relative_to(ROOT)}: the evaluation label")
    assert offenders == []
    for path in (ROOT / "core").rglob("*.py"):
        text = path.read_text()
        assert "StoredEvaluation" not in text and "_evaluation(" not in text, path
        assert "dockyard_register_protocols" not in text, path
    assert "EvaluationService" not in (ROOT / "api" / "app.py").read_text()
    assert not (ROOT / "api" / "integration.py").exists()
    assert not (ROOT / "api" / "cli_evaluation.py").exists()


def _status_page_mentions() -> list[str]:
    offenders = []
    for path in sorted((ROOT / "api" / "ui").rglob("*")):
        if path.suffix not in (".py", ".html", ".js", ".css"):
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text().splitlines(), start=1)
            if "evaluat" in line.lower()
        ]
    return offenders


def test_the_status_page_knows_nothing_of_evaluations() -> None:
    """``api/ui/`` (code, templates, script, style) says nothing of evaluations, with no
    exceptions: their panel, pages, chart bars and timeline text come from the evaluation
    plugin (``plugins/evaluation/ui.py``) through ``ApiRegistrar.ui_*``, and the page's
    stream follows a plugin's event tag (``?evaluation=ID``) by the tag's registered name."""
    assert _status_page_mentions() == []
    # nor is any event kind spelled out in the page's script or the timeline's template:
    # how a kind reads is the server's event_text (ApiRegistrar.ui_event_text)
    ui = ROOT / "api" / "ui"
    for path in (ui / "static" / "ui.js", ui / "templates" / "event.html"):
        assert not re.search(r"slot_transition|kind ===? ", path.read_text()), path


#: Where ``api/*.py`` and ``core/*.py`` may still name evaluations in code: the built-in
#: plugin list and the deprecated option aliases (``eval_*`` and ``gc_evaluations_*``, now
#: ``[plugins.evaluation]`` options), kept for one release.
ALLOWED_EVALUATION_CODE = {
    ("core/plugins.py", '("evaluation", "dockyard.plugins.evaluation"),'),
    ("core/config.py", 'LEGACY_OPTION_PREFIXES = {"eval_": "evaluation"}'),
    ("core/config.py", '"gc_evaluations_max_age_days": ("evaluation", "gc_max_age_days"),'),
    ("core/config.py", '"gc_evaluations_max_mb": ("evaluation", "gc_max_mb"),'),
    ("core/config.py", "gc_evaluations_max_age_days: Annotated[float, Meta(ge=0)] | UnsetType"),
    ("core/config.py", "gc_evaluations_max_mb: Annotated[float, Meta(ge=0)] | UnsetType"),
}


def _code_mentions(path: Path, word: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every token of ``path``'s code (not its comments nor its
    docstrings: string statements) that contains ``word``, case-insensitive."""
    text = path.read_text()
    docstrings = {
        (node.value.lineno, node.value.col_offset)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    lines = text.splitlines()
    found = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            continue
        if token.type == tokenize.STRING and token.start in docstrings:
            continue
        if word in token.string.lower():
            found.append((token.start[0], lines[token.start[0] - 1].strip()))
    return found


def test_the_code_of_core_and_api_names_no_evaluation() -> None:
    """Event tags, query filters, token scopes, event formats and error texts are generic:
    ``api/*.py`` (the status page in ``api/ui/`` aside) and ``core/*.py`` mention
    evaluations only in comments, docstrings and :data:`ALLOWED_EVALUATION_CODE`."""
    offenders = []
    for path in sorted([*(ROOT / "api").glob("*.py"), *(ROOT / "core").glob("*.py")]):
        name = str(path.relative_to(ROOT))
        for number, line in _code_mentions(path, "evaluat"):
            if not any(
                name == where and line.startswith(what) for where, what in ALLOWED_EVALUATION_CODE
            ):
                offenders.append(f"{name}:{number}: {line}")
    assert offenders == []


def test_the_boundary_scan_sees_code_but_not_docstrings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""About evaluations."""\n'
        "# an evaluation comment\n"
        "def f() -> str:\n"
        '    """Evaluate."""\n'
        '    return "evaluation"\n'
        "EVALUATE = 1\n"
    )
    assert _code_mentions(sample, "evaluat") == [
        (5, 'return "evaluation"'),
        (6, "EVALUATE = 1"),
    ]


def test_the_evaluation_plugin_owns_its_protocols_hookspec() -> None:
    pm = build_plugin_manager(load_entry_points=False)
    assert {"act", "solve_task", "step"} <= set(pm.registries.protocols.names())
    assert pm.registries.protocols.owner("step") == "protocols"
    # without the evaluation plugin the hook does not exist, and the built-in protocols
    # (an optional implementation) load without it
    bare = build_plugin_manager(load_entry_points=False, disable=["evaluation"])
    assert bare.hook.dockyard_register_protocols.spec is None  # only the optional impl
    with pytest.raises(AttributeError):
        bare.registries.protocols  # noqa: B018


def test_without_the_evaluation_plugin_its_routes_are_gone(
    api_client_factory: Any, tmp_path: Path
) -> None:
    pm = build_plugin_manager(load_entry_points=False, disable=["evaluation"])
    from dockyard.api.app import create_app

    app = create_app(Settings(data_dir=str(tmp_path / "bare"), **TEST_SETTINGS), pm=pm)
    paths = {route.path for route in app.routes}
    assert not any(p.startswith("/v1/integration") for p in paths)
    with api_client_factory() as client:
        assert client.get("/v1/integration/evaluations").status_code == 200


def test_the_evaluation_metrics_are_the_plugins() -> None:
    """``core/metrics.py`` defines no evaluation metric and ``api/metrics.py`` reads no
    evaluation service: the plugin registers its metrics and refreshes its gauges."""
    core_metrics = (ROOT / "core" / "metrics.py").read_text()
    assert not re.search(r"[\"']dockyard_evaluation", core_metrics)
    assert not re.search(
        r"\bevaluations\b|_runs|_queue|_admitted", (ROOT / "api" / "metrics.py").read_text()
    )
    names = {metric.name for metric in REGISTRY.collect()}
    assert {"dockyard_evaluations", "dockyard_evaluation_queue_depth"} <= names
    assert (
        "dockyard_evaluation_queue_depth"
        in (ROOT / "plugins" / "evaluation" / "metrics.py").read_text()
    )


def test_the_evaluation_log_id_is_a_field_the_plugin_adds() -> None:
    """``core/logs.py`` knows ``request_id`` and ``deployment_id``; the evaluation plugin
    adds ``evaluation_id`` (``eval=`` in text lines) with ``logs.add_field``."""
    from dockyard.core import logs
    from dockyard.plugins.evaluation.service import EVALUATION_LOG_ID

    assert not re.search(
        r"^evaluation_id|[\"']evaluation_id[\"']", (ROOT / "core" / "logs.py").read_text(), re.M
    )
    assert logs.add_field("evaluation_id", "eval") is EVALUATION_LOG_ID
    record = logging.LogRecord("dockyard", logging.INFO, __file__, 1, "hi", (), None)
    with logs.bound(deployment_id="ev-1", evaluation_id="ev-1"):
        assert logs.current() == {"deployment_id": "ev-1", "evaluation_id": "ev-1"}
        logs.ContextFilter().filter(record)
    assert "[dep=ev-1 eval=ev-1]: hi" in logs.TextFormatter().format(record)
    assert json.loads(logs.JsonFormatter().format(record))["evaluation_id"] == "ev-1"


def test_plugins_refresh_their_gauges_at_scrape_time(api_client_factory: Any) -> None:
    seen: list[Any] = []

    class Scraped:
        @hookimpl
        def dockyard_api_plugins(self, register: Any) -> None:
            async def refresh(state: Any) -> None:
                seen.append(state.controller)

            register.scrape(refresh)

    with api_client_factory(extra_plugins=[("scraped", Scraped())]) as client:
        service = client.app.state.evaluations
        # what the running service says is unfinished now is what the gauges show
        service.occupancy = lambda: (collections.Counter({"running": 2, "queued": 3}), 3, 2)
        text = client.get("/metrics").text
        assert seen == [client.app.state.controller]
    assert "dockyard_evaluation_queue_depth 3.0" in text
    assert "dockyard_evaluation_running_agents 2.0" in text
    assert 'dockyard_evaluations_active{state="running"} 2.0' in text
    assert 'dockyard_evaluations_active{state="session"} 0.0' in text


# ---------------------------------------------------------------- options and migration
def test_evaluation_options_are_read_from_their_plugin_table(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = EvaluationConfig.from_settings(
        Settings(plugins={"evaluation": {"max_agents": 7, "keep_images": False}})
    )
    assert (config.max_agents, config.keep_images, config.max_builds) == (7, False, 2)


def test_old_eval_names_still_work_with_one_deprecation_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dockyard.core import config as config_module

    monkeypatch.setattr(config_module, "_warned_legacy", set())
    caplog.set_level(logging.WARNING, logger="dockyard.core.config")
    with pytest.warns(DeprecationWarning, match="eval_max_agents"):
        first = load_settings(environ={"DOCKYARD_EVAL_MAX_AGENTS": "9"})
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        Settings(eval_max_agents=3)  # type: ignore[call-arg]
    assert again == []  # once per process
    warned = [r for r in caplog.records if "eval_max_agents" in r.getMessage()]
    assert len(warned) == 1 and "[plugins.evaluation]" in warned[0].getMessage()
    assert EvaluationConfig.from_settings(first).max_agents == 9
    # the new table wins over the old name
    both = Settings(eval_max_agents=3, plugins={"evaluation": {"max_agents": 5}})  # type: ignore[call-arg]
    assert EvaluationConfig.from_settings(both).max_agents == 5


def _previous_schema_database(path: Path, evaluations: list[Evaluation]) -> None:
    """A database as the schema before plugin records (version 2) made it."""
    conn = sqlite3.connect(path)
    try:
        for version, steps in enumerate(MIGRATIONS[:2], start=1):
            for statement in steps:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        for rowid, evaluation in enumerate(evaluations, start=1):
            conn.execute(
                "INSERT INTO evaluations"
                " (rowid, id, batch_id, state, finished, created_at, updated_at, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rowid,
                    evaluation.id,
                    evaluation.batch_id,
                    evaluation.state,
                    int(evaluation.final),
                    evaluation.created_at,
                    evaluation.updated_at,
                    msgspec.json.encode(evaluation).decode(),
                ),
            )
        conn.commit()
    finally:
        conn.close()


def _evaluation(evaluation_id: str, state: str, batch_id: str | None = None) -> Evaluation:
    limits = Limits(
        request_s=25,
        task_s=180,
        health_s=20,
        health_interval_s=0.5,
        session_ttl_s=600,
        lifetime_s=3600,
        max_parallel_tasks=5,
        max_steps=12,
        keep_image=True,
    )
    return Evaluation(
        id=evaluation_id,
        deployment_id=f"dep-{evaluation_id}",
        state=state,  # type: ignore[arg-type]
        batch_id=batch_id,
        miner=Miner(github_url="https://github.com/acme/agent"),
        limits=limits,
        created_at=1000.0 + len(evaluation_id),
        updated_at=2000.0,
    )


def test_evaluations_stored_by_the_previous_schema_are_readable_after_the_migration(
    api_client_factory: Any, tmp_path: Path
) -> None:
    old = [
        _evaluation("ev-old", "finished"),
        _evaluation("ev-batch-1", "failed", batch_id="batch-x"),
        _evaluation("ev-batch-22", "finished", batch_id="batch-x"),
    ]
    (tmp_path / "data").mkdir()
    _previous_schema_database(tmp_path / "data" / DB_FILENAME, old)
    with api_client_factory() as client:
        one = client.get("/v1/integration/evaluation/ev-old")
        assert one.status_code == 200, one.text
        assert one.json()["state"] == "finished"
        assert one.json()["miner"]["github_url"] == "https://github.com/acme/agent"
        batch = client.get("/v1/integration/evaluation/batch-x").json()
        assert [e["id"] for e in batch["evaluations"]] == ["ev-batch-1", "ev-batch-22"]
        listed = client.get("/v1/integration/evaluations").json()["evaluations"]
        assert {e["id"] for e in listed} == {e.id for e in old}

    async def migrated() -> tuple[int, list[Any], list[str]]:
        store = SqliteStore(tmp_path / "data" / DB_FILENAME)
        await store.open()
        try:
            assert await store.get_record("evaluation", "ev-old") is not None
            unfinished = await records.list_stored(store, finished=False)
            prunable = await records.evaluations_older_than(store, 3000.0)
        finally:
            await store.close()
        conn = sqlite3.connect(tmp_path / "data" / DB_FILENAME)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
        finally:
            conn.close()
        assert "evaluations" not in tables
        return version, unfinished, prunable

    version, unfinished, prunable = asyncio.run(migrated())
    assert version == len(MIGRATIONS) == 3
    assert unfinished == []
    assert prunable == ["ev-old", "ev-batch-1", "ev-batch-22"]


async def test_old_evaluations_can_be_pruned_by_age(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / DB_FILENAME)
    await store.open()
    try:
        done = msgspec.structs.replace(_evaluation("ev-done", "finished"), updated_at=10.0)
        live = msgspec.structs.replace(_evaluation("ev-live", "running"), updated_at=10.0)
        fresh = msgspec.structs.replace(_evaluation("ev-fresh", "failed"), updated_at=99.0)
        for evaluation in (done, live, fresh):
            await records.save(store, evaluation)
        assert await records.delete_evaluations_older_than(store, 50.0) == ["ev-done"]
        left = [r.key for r in await records.list_stored(store)]
        assert sorted(left) == ["ev-fresh", "ev-live"]
    finally:
        await store.close()
