"""End to end through a real proxy with real Podman: deploy from a loopback git server,
redeploy twice while clients request the deployment's URL through Caddy or Traefik
(each run by dockyard itself), delete. No request fails, and once a redeploy has returned
every answer comes from the new commit.
"""

from __future__ import annotations

import collections
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from litestar.testing import TestClient

from tests import httpd_agent
from tests.httpd_agent import commit_agent

pytestmark = [pytest.mark.podman, pytest.mark.slow]

HEALTH = {"interval_s": 0.1, "timeout_s": 2, "deadline_s": 20}


git_server = httpd_agent.git_server
client = httpd_agent.client_behind_each_proxy(
    timeout_s=120,
    port_range_start=46400,
    port_range_end=46420,
    build_timeout_s=30,
    router_watch_interval_s=0.5,
)


class Load:
    """Threads requesting ``url`` without pause; what answered, and what failed."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self.url = url
        self.answers: list[tuple[float, str]] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    self.answers.append((sent, r.read().decode().strip()))
            except (urllib.error.URLError, OSError) as exc:
                self.failures[str(exc)] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def test_redeploys_through_the_proxy_fail_no_request(
    client: TestClient[Any], git_server: Any
) -> None:
    daemon, builder = git_server
    dep = f"edge-{client.app.state.services.router.name}"
    repo = builder.new(dep)
    versions = ["v1", "v2", "v3"]
    for v in versions:
        commit_agent(repo, v)
        repo.tag(v)
    r = client.post(
        "/v1/repos?wait=true&timeout=120",
        json={
            "id": dep,
            "repo": f"{daemon.url}/{dep}.git",
            "ref": "v1",
            "container_port": 8000,
            "health": HEALTH,
            "grace_period_s": 2,
        },
    )
    assert r.status_code == 200, r.text
    url = r.json()["url"]
    assert url.endswith(f"/apps/{dep}/"), url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read().decode().strip() == "v1"

    switched: list[tuple[float, str]] = []
    with Load(url) as load:
        time.sleep(0.5)
        for v in versions[1:]:
            r = client.post(f"/v1/repos/{dep}/redeploy?wait=true&timeout=120", json={"ref": v})
            assert r.status_code == 200 and r.json()["promoted"], r.text
            switched.append((time.monotonic(), v))
            time.sleep(1.0)
    assert not load.failures, dict(load.failures)
    assert len(load.answers) > 50
    for at, version in switched:
        later = {body for sent, body in load.answers if sent > at}
        assert later <= set(versions[versions.index(version) :]), (version, later)

    # A delete removes the route before the containers: 404 at once, never a 502.
    assert client.delete(f"/v1/repos/{dep}").status_code == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5).close()
    assert info.value.code == 404
