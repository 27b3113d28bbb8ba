"""Nothing runtime-specific leaks into the engine-neutral code.

The core, the built-in plugins (strategy, store, sources, ...), the API and the routers talk
to container engines only through :class:`dockyard.core.runtime.Runtime`; the runtimes
themselves live in ``backends/`` and are found through the plugin manager. This reads every
module's imports (the syntax tree, so imports inside functions and ``TYPE_CHECKING`` blocks
count too) and fails on any import of an engine client or of a runtime plugin.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: Folders that must stay engine-neutral, and the import names none of them may use.
NEUTRAL = ("core", "plugins", "api", "routers", "client", "testing")
FORBIDDEN = ("podman", "docker", "aiodocker", "dockyard.backends")


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``
    (e.g. ``["dockyard", "core"]``, against which relative imports are resolved)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.append((node.lineno, argument.value))
    return sorted(found)


def file_imports(path: Path) -> list[tuple[int, str]]:
    return imported_modules(path.read_text(), ["dockyard", *path.relative_to(ROOT).parent.parts])


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__") and bool(node.args)


def _forbidden(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in FORBIDDEN)


def neutral_files() -> list[Path]:
    return sorted(p for folder in NEUTRAL for p in (ROOT / folder).rglob("*.py"))


def test_there_is_code_to_check() -> None:
    files = neutral_files()
    assert any(p.parent.name == "core" for p in files)
    assert any(p.parent.name == "api" for p in files)


@pytest.mark.parametrize("path", neutral_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_runtime_specific_imports(path: Path) -> None:
    leaks = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for line, module in file_imports(path)
        if _forbidden(module)
    ]
    assert leaks == [], "engine-neutral code imports a runtime:\n" + "\n".join(leaks)


def test_the_checker_sees_every_kind_of_import() -> None:
    source = (
        "import os\n"
        "import aiodocker.containers\n"
        "from podman import PodmanClient\n"
        "from ..backends import docker\n"
        "from . import runtime\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('dockyard.backends.podman')\n"
    )
    modules = [module for _, module in imported_modules(source, ["dockyard", "core"])]
    assert [m for m in modules if _forbidden(m)] == [
        "aiodocker.containers",
        "podman",
        "podman.PodmanClient",
        "dockyard.backends",
        "dockyard.backends.docker",
        "dockyard.backends.podman",
    ]
    assert "dockyard.core.runtime" in modules and "os" in modules
