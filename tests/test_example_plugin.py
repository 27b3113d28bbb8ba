"""``contrib/example-plugin``'s own tests, run as its author runs them: the plugin installed
(here into a private target directory, found through its entry point), then ``pytest`` in
its directory, where ``dockyard.testing`` runs dockyard's runtime contract against the
example runtime and starts a dockyard with the plugin loaded."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_PLUGIN


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed into a private target directory."""
    target = tmp_path_factory.mktemp("example-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    return target


@pytest.mark.slow
def test_example_plugin_passes_its_own_tests(example_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(example_site), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DOCKYARD_DISABLE_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA"],
        cwd=EXAMPLE_PLUGIN,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # The contract ran through dockyard.testing, against the runtime named on its options.
    for test in ("test_name_in_use_is_a_conflict", "test_run_inspect_stop_remove"):
        assert f"PASSED tests/test_contract.py::{test}[example]" in out, out
    assert "PASSED tests/test_plugin.py::test_the_policy_refuses_an_owner_not_allowed" in out
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 6, out


def test_a_runtime_under_contract_must_be_named(example_site: Path) -> None:
    """Without a name (option or ini), the suite says what to pass instead of running."""
    env = {**os.environ, "PYTHONPATH": str(example_site), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o",
         "dockyard_runtimes=", "tests/test_contract.py", "-k", "conflict"],
        cwd=EXAMPLE_PLUGIN,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "pass --dockyard-runtime=NAME" in done.stdout, done.stdout
