"""The busybox ``httpd`` agent the end-to-end tests deploy from a loopback git server, and a
dockyard on real Podman that runs its own Caddy or Traefik in front of it.

The agent answers ``/`` with its version and ``/health`` with ``ok`` on port 8000; it is
built ``FROM scratch`` with the host's static busybox, so no image is pulled.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import AUTH, ON_CI, TEST_SETTINGS
from tests.gitserver import Repo
from tests.proxies import proxy_settings, require

#: ``{build_steps}``: Dockerfile lines run before the ``CMD`` (empty for most tests).
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
{build_steps}CMD ["httpd", "-f", "-p", "8000", "-h", "/www"]
"""


def commit_agent(repo: Repo, version: str, *, build_steps: str = "") -> str:
    """Write the agent answering ``version`` (with what the caller wrote to ``repo``
    already) and commit it; the commit."""
    repo.write("busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    repo.write("Dockerfile", DOCKERFILE.format(build_steps=build_steps))
    repo.write("www/index.html", version)
    repo.write("www/health", "ok")
    return repo.commit(version)


def require_podman() -> None:
    """Skip (fail on CI) when Podman is not installed."""
    if shutil.which("podman") is None:
        if ON_CI:
            pytest.fail("podman is not installed (CI=true: never skipped)")
        pytest.skip("podman is not installed: apt-get install podman")


@contextlib.contextmanager
def dockyard_behind(
    proxy: str, data_dir: Path, *, timeout_s: float, **settings: Any
) -> Iterator[TestClient[Any]]:
    """A dockyard on real Podman behind ``proxy`` (run by dockyard itself), its API as an
    authenticated test client; ``settings`` on top of the test defaults."""
    require_podman()
    require(proxy)
    from dockyard.api.app import create_app

    config = proxy_settings(
        proxy, data_dir, **{**TEST_SETTINGS, "insecure_sources": True, **settings}
    )
    with TestClient(create_app(config), timeout=timeout_s) as client:
        client.headers.update(AUTH)
        yield client
