"""Documentation keeps up with the code: every hook is documented and tested, every
top-level folder is described in the README."""

from __future__ import annotations

import inspect
import re

import pytest

from dockyard.core import hookspecs
from tests.conftest import ROOT

HOOKS = sorted(
    name for name, fn in vars(hookspecs).items() if name.startswith("dockyard_") and callable(fn)
)
README = (ROOT / "README.md").read_text()


def test_there_are_hooks() -> None:
    assert len(HOOKS) >= 9


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert len(doc.splitlines()[0]) > 10, f"{hook} needs a one-line summary"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook} docstring must describe {param!r}"
    assert "A third-party plugin" in doc, f"{hook} must say how a third-party plugin uses it"
    assert f"`{hook}" in README, f"README's plugin section must list {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    this = "test_docs.py"
    users = [
        p
        for p in (ROOT / "tests").rglob("test_*.py")
        if p.name != this and re.search(rf"\b{hook}\b", p.read_text())
    ]
    assert users, f"no test exercises {hook}"


@pytest.mark.parametrize(
    "folder",
    ["core", "backends", "routers", "plugins", "api", "client", "testing", "tests", "contrib"],
)
def test_architecture_section_names_every_top_level_folder(folder: str) -> None:
    section = README.split("## Architecture", 1)[-1]
    assert re.search(rf"^\|?\s*`{folder}/`", section, re.M), f"README must describe {folder}/"
