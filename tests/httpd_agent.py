"""The busybox ``httpd`` agent the end-to-end tests deploy from a loopback git server, the
module-scoped ``git_server`` fixture that serves it, and a dockyard on real Podman that runs
its own Caddy or Traefik in front of it (:func:`dockyard_behind`, or as a fixture over every
proxy: :func:`client_behind_each_proxy`).

The agent answers ``/`` with its version and ``/health`` with ``ok`` on port 8000; it is
built ``FROM scratch`` with the host's static busybox, so no image is pulled.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import AUTH, ON_CI, TEST_SETTINGS
from tests.gitserver import GitDaemon, Repo, RepoBuilder, daemon_with_repos
from tests.proxies import PROXIES, proxy_settings, require

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


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GitDaemon, RepoBuilder]]:
    """A loopback git daemon and the builder of the repositories it serves, per module (a
    test module uses it as ``git_server = httpd_agent.git_server``)."""
    with daemon_with_repos(tmp_path_factory.mktemp("repos") / "served") as served:
        yield served


def client_behind_each_proxy(*, timeout_s: float, **settings: Any) -> Callable[..., Any]:
    """A module-scoped ``client`` fixture, parametrized over :data:`PROXIES`: the API of a
    :func:`dockyard_behind` that proxy with ``settings``."""

    @pytest.fixture(scope="module", params=PROXIES)
    def client(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[TestClient[Any]]:
        """One dockyard on real Podman behind the proxy ``request.param`` it runs itself."""
        data_dir = tmp_path_factory.mktemp("data")
        with dockyard_behind(request.param, data_dir, timeout_s=timeout_s, **settings) as c:
            yield c

    return client
