"""The controller is a boundary: code outside ``core/`` learns what an operation came to
from the controller's answers (``DeployOutcome``, ``DeploymentState``, ``url_for``), never by
reaching into its slot operations (``ops``), an operation's private task, the services
(runtime, router, store) behind it, or by reading the event log for result strings; a
plugin's service is handed its store, plugin manager and settings by its plugin context."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: Patterns that reach through the controller, and where they may not appear.
REACHES = {
    "the controller's slot operations": r"\.ops\b",
    "an operation's private task": r"\.operation\([^)]*\)\.task|operation\.task\b",
    "the runtime or router behind the controller": r"controller\.services\.(runtime|router)\b",
    "the services behind the controller": r"controller\.services\b",
    "the event log, read for a result": r"[\"'](source_fetched|source_refused|image_ready)[\"']",
}
#: What renders or consumes results (the telemetry observer counts events by kind: it
#: observes the log, it does not learn a result from it).
CONSUMERS = sorted(
    p for folder in ("api", "client", "plugins/evaluation") for p in (ROOT / folder).rglob("*.py")
)


def test_there_are_consumers_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in CONSUMERS}
    assert {"api/deployments.py", "plugins/evaluation/service.py"} <= names


@pytest.mark.parametrize("path", CONSUMERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_consumers_do_not_reach_through_the_controller(path: Path) -> None:
    source = path.read_text()
    found = [
        f"{path.relative_to(ROOT)}:{source[: m.start()].count(chr(10)) + 1}: {what} ({m.group(0)})"
        for what, pattern in REACHES.items()
        for m in re.finditer(pattern, source)
    ]
    assert not found, "\n".join(found)


#: Code outside ``core/`` that is a plugin's or a client's, not the app's (the app builds
#: dockyard's services and hands them out): it keeps its records in the store its plugin
#: context hands it (``PluginContext.store``), never through dockyard's services.
PLUGIN_SIDE = sorted(
    p for folder in ("client", "plugins/evaluation") for p in (ROOT / folder).rglob("*.py")
)


@pytest.mark.parametrize("path", PLUGIN_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_reach_no_store_through_dockyards_services(path: Path) -> None:
    source = path.read_text()
    found = [
        f"{path.relative_to(ROOT)}:{source[: m.start()].count(chr(10)) + 1}: {m.group(0)}"
        for m in re.finditer(r"\bservices\.(store|pm|settings)\b", source)
    ]
    assert not found, "\n".join(found)


def test_the_evaluation_service_is_handed_its_store_pm_and_settings() -> None:
    """The evaluation plugin's lifespan builds its service from the plugin context."""
    source = (ROOT / "plugins" / "evaluation" / "__init__.py").read_text()
    assert "store=context.store, pm=context.pm, settings=context.settings" in source


def test_one_place_knows_the_promoted_url() -> None:
    """Only ``core/views.py`` builds a client URL from a slot's loopback port (health
    probes add their path: they are not the deployment's URL)."""
    builders = [
        p.relative_to(ROOT).as_posix()
        for folder in ("core", "api", "plugins")
        for p in (ROOT / folder).rglob("*.py")
        if re.search(
            r"url_for\(.*\) or|f\"http://127\.0\.0\.1:\{[a-z_]+\.host_port\}\"", p.read_text()
        )
    ]
    assert builders == ["core/views.py"]
