"""Shared fixtures: paths, the example third-party plugin, a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = ROOT / "contrib" / "example-plugin"
ON_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def example_plugin_module() -> Iterator[object]:
    """The example plugin's module, importable without installing it (no entry point)."""
    sys.path.insert(0, str(EXAMPLE_PLUGIN))
    try:
        import dockyard_example_plugin

        yield dockyard_example_plugin
    finally:
        sys.path.remove(str(EXAMPLE_PLUGIN))


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
            data_dir=str(tmp_path / "data"), runtime="example", monitor_interval_s=0, **settings
        )
        pm = build_plugin_manager(load_entry_points=False, extra_plugins=list(extra_plugins))
        services = Services.build(cfg, pm, runtime=example_plugin_module.ExampleRuntime(cfg))
        with TestClient(create_app(cfg, services=services)) as client:
            yield client

    return make


@pytest.fixture
def fake_client_factory(tmp_path: Path) -> Any:
    """A TestClient over FakeRuntime + FakeSource + SQLite: fast orchestration tests."""
    from litestar.testing import TestClient

    from dockyard.api.app import create_app
    from dockyard.core.config import Settings
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services
    from tests.fakes import FakeRuntime, FakeSource

    @contextlib.contextmanager
    def make(**settings: Any) -> Iterator[TestClient[Any]]:
        cfg = Settings(data_dir=str(tmp_path / "data"), monitor_interval_s=0, **settings)
        pm = build_plugin_manager(load_entry_points=False)
        services = Services.build(
            cfg, pm, runtime=FakeRuntime(), sources={"fake": FakeSource(tmp_path / "src")}
        )
        with TestClient(create_app(cfg, services=services)) as client:
            yield client

    return make
