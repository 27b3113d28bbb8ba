"""A SIGTERM ends a test run the way Ctrl-C does: pytest then tears every fixture down.

Without it, a terminated pytest (a CI timeout, an operator's ``kill``) dies where it stands
and leaves what the running test's fixtures started: a private Podman service, agent
containers, a Caddy, a squid. Loaded by ``tests/conftest.py`` (``pytest_plugins``); the
handler is installed once the run is configured, in the main thread.
"""

from __future__ import annotations

import signal
from types import FrameType

import pytest


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}: tearing the fixtures down")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
