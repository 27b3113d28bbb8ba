"""The shape of ``backends/``: engines stand on one engine floor and keep only their dialect.

Read from the source (fast, no engine): no module over 500 lines and no function over 80 in
``backends/``; the floor (``backends/engine/``) imports no engine client; and the engines'
import paths that plugins and tests use still answer.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_boundaries import file_imports

BACKENDS = ROOT / "backends"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
ENGINE_CLIENTS = ("podman", "aiodocker", "docker", "requests", "aiohttp")


def backend_files() -> list[Path]:
    return sorted(BACKENDS.rglob("*.py"))


def test_there_are_engines_on_a_floor() -> None:
    folders = {p.parent.name for p in backend_files()}
    assert {"engine", "podman", "docker"} <= folders


@pytest.mark.parametrize("path", backend_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path} is over {MAX_MODULE_LINES}"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines in {path}: {long}"


def test_the_size_check_sees_a_long_function() -> None:
    body = "\n".join(f"    x{n} = {n}" for n in range(MAX_FUNCTION_LINES))
    node = ast.parse(f"def f():\n{body}\n").body[0]
    assert isinstance(node, ast.FunctionDef) and node.end_lineno is not None
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES


@pytest.mark.parametrize("path", sorted((BACKENDS / "engine").rglob("*.py")), ids=lambda p: p.name)
def test_the_engine_floor_imports_no_engine_client(path: Path) -> None:
    leaks = [
        f"{path.name}:{line}: imports {module}"
        for line, module in file_imports(path)
        if any(module == name or module.startswith(f"{name}.") for name in ENGINE_CLIENTS)
        or module.startswith(("dockyard.backends.podman", "dockyard.backends.docker"))
    ]
    assert leaks == []


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (
            "dockyard.backends.podman",
            [
                "PodmanRuntime",
                "PodmanService",
                "parse_hardening",
                "container_info",
                "limits_status",
                "socket_answers",
                "kill_marked_build_processes",
                "dockyard_register_runtimes",
                "ROOTLESS_V1_NOTE",
                "DEFAULT_CAPABILITIES",
            ],
        ),
        (
            "dockyard.backends.docker",
            [
                "DockerRuntime",
                "parse_hardening",
                "container_info",
                "limits_status",
                "external_images",
                "read_dockerignore",
                "is_ignored",
                "context_tar",
                "dockyard_register_runtimes",
                "agent_iface",
                "started_at",
            ],
        ),
        ("dockyard.backends.firewall", ["AgentFirewall", "AgentNetwork", "ruleset"]),
    ],
)
def test_import_paths_plugins_and_tests_use_still_answer(module: str, names: list[str]) -> None:
    imported = importlib.import_module(module)
    assert [name for name in names if not hasattr(imported, name)] == []


def test_one_inspect_parser_serves_both_engines() -> None:
    from dockyard.backends import docker, podman
    from dockyard.backends.engine import inspection

    assert podman.parse_hardening is docker.parse_hardening is inspection.parse_hardening
    assert podman.container_info is docker.container_info is inspection.container_info


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_an_unknown_or_mistyped_engine_option_names_the_key(engine: str) -> None:
    from dockyard.core.config import Settings
    from dockyard.core.errors import ConfigError
    from dockyard.core.plugins import Registrar

    module = importlib.import_module(f"dockyard.backends.{engine}")
    register: Registrar[object] = Registrar("runtime")
    module.dockyard_register_runtimes(register=register)
    factory = register.get(engine)
    with pytest.raises(ConfigError, match=rf"unknown option plugins\.{engine}\.build_nofiles"):
        factory(Settings(plugins={engine: {"build_nofiles": 10}}))
    with pytest.raises(ConfigError, match=rf"plugins\.{engine}\.api_timeout_s has the wrong type"):
        factory(Settings(plugins={engine: {"api_timeout_s": "soon"}}))
    runtime = factory(Settings(plugins={engine: {"api_timeout_s": 30, "build_log_lines": 5}}))
    assert runtime.options.api_timeout_s == 30.0 and runtime.build_log_lines == 5
