"""Shared fixtures: paths, the example third-party plugin, a free loopback port."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

#: A SIGTERM tears the fixtures down like Ctrl-C (``tests/sigterm.py``).
pytest_plugins = ["tests.sigterm"]

# Helper modules whose asserts should explain themselves like a test's own.
pytest.register_assert_rewrite("tests.hostprobe", "tests.serve")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = ROOT / "contrib" / "example-plugin"
ON_CI = os.environ.get("CI", "").lower() == "true"

#: An admin token the test apps are configured with (as a hash, like an operator would).
TEST_TOKEN = "dy_7e570000_" + "t" * 43
TEST_TOKENS = [
    {
        "id": "7e570000",
        "name": "tests",
        "scopes": ["admin"],
        "sha256": hashlib.sha256(TEST_TOKEN.encode()).hexdigest(),
    }
]
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
#: Settings every test app shares: the test token, no rate limits (tests poll a lot).
TEST_SETTINGS: dict[str, Any] = {
    "api_tokens": TEST_TOKENS,
    "rate_limit_per_ip": 0,
    "rate_limit_per_token": 0,
    "monitor_interval_s": 0,
}


@pytest.fixture(scope="session")
def example_plugin_module() -> Iterator[object]:
    """The example plugin's module, importable without installing it (no entry point)."""
    sys.path.insert(0, str(EXAMPLE_PLUGIN))
    try:
        import dockyard_example_plugin

        yield dockyard_example_plugin
    finally:
        sys.path.remove(str(EXAMPLE_PLUGIN))


@pytest.fixture(scope="module")
def dockyard_runtime_factory(engine: Any) -> Any:
    """dockyard.testing's runtime under contract, in a module with an ``engine`` fixture
    (``tests/contract/conftest.py``): that engine's runtime, per ``engine`` param. Module
    scope: modules define ``engine`` over different engines, and a cached factory must not
    outlive its module."""
    return engine.make_runtime


@pytest.fixture(scope="module")
def dockyard_engine_probe(engine: Any) -> Any:
    """dockyard.testing's engine probe: the engine seen through its CLI or API."""
    return engine


def pip_install_target(source: Path, target: Path) -> Path:
    """Pip-install the package at ``source`` (with its entry points, without dependencies)
    into the private directory ``target``, for a subprocess with ``PYTHONPATH=target``."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api_client_factory(tmp_path: Path, example_plugin_module: Any) -> Any:
    """Make a Litestar TestClient over the example (in-memory) runtime and a SQLite store.

    For API behaviour that does not depend on a real engine; real-Podman API tests use
    the ``podman`` runtime instead.
    """
    from litestar.testing import TestClient

    from dockyard.api.app import create_app
    from dockyard.core.config import Settings
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services

    @contextlib.contextmanager
    def make(
        extra_plugins: Sequence[tuple[str, object]] = (), **settings: Any
    ) -> Iterator[TestClient[Any]]:
        cfg = Settings(
            data_dir=str(tmp_path / "data"), runtime="example", **{**TEST_SETTINGS, **settings}
        )
        pm = build_plugin_manager(load_entry_points=False, extra_plugins=list(extra_plugins))
        services = Services.build(cfg, pm, runtime=example_plugin_module.ExampleRuntime(cfg))
        with TestClient(create_app(cfg, services=services)) as client:
            client.headers.update(AUTH)
            yield client

    return make


@pytest.fixture
def fake_client_factory(tmp_path: Path) -> Any:
    """A TestClient over FakeRuntime + FakeSource + SQLite: fast orchestration tests."""
    from dockyard.core.plugins import build_plugin_manager
    from tests.fakes import FakeRuntime, api_over

    @contextlib.contextmanager
    def make(
        extra_plugins: Sequence[tuple[str, object]] = (),
        disable: Sequence[str] = (),
        **settings: Any,
    ) -> Iterator[Any]:
        pm = build_plugin_manager(
            disable, load_entry_points=False, extra_plugins=list(extra_plugins)
        )
        with api_over(tmp_path, FakeRuntime(), pm=pm, **settings) as client:
            yield client

    return make


#: The requirements of the sandbox image the tests build (FastAPI + uvicorn).
SANDBOX_REQUIREMENTS = ROOT / "tests" / "sandbox-requirements.txt"


@pytest.fixture(scope="session")
def offline_base_image() -> str:
    """Podman's copy of dockyard's offline Python base (``contrib/base-image/build.sh``,
    idempotent: about a minute once per host), the sandbox image's base on a host without
    ``python:3.11-slim``."""
    import shutil
    import subprocess

    if shutil.which("podman") is None:
        if ON_CI:
            pytest.fail("podman is not installed (CI=true: never skipped)")
        pytest.skip("podman is not installed")
    command = ["bash", str(ROOT / "contrib" / "base-image" / "build.sh")]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    return "localhost/dockyard/base-python:bookworm"


@pytest.fixture(scope="session")
def sandbox_image(
    offline_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The agent sandbox image, built once per session by the command itself
    (``dockyard sandbox-image build``) on rootful Podman; removed at the end."""
    import subprocess
    import uuid

    tag = f"localhost/dockyard-test/agent-sandbox:{uuid.uuid4().hex[:12]}"
    data = tmp_path_factory.mktemp("sandbox-image")
    done = subprocess.run(
        [sys.executable, "-m", "dockyard.api.cli", "sandbox-image", "build",
         "--requirements", str(SANDBOX_REQUIREMENTS), "--tag", tag],
        env={**os.environ, "DOCKYARD_DATA_DIR": str(data)},
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{tag} ready: Python 3.11" in done.stdout, done.stdout
    try:
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False, timeout=120)
