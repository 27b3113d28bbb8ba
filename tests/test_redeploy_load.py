"""Back-to-back redeploys under load through a real proxy, on real Podman: no request fails.

A busybox agent built from a loopback git server answers ``/cgi-bin/slow`` after a short
sleep, so requests are always in flight to the promoted revision when a switch happens.
Five redeploys are sent one right after the other, each while the previous slot still
drains (grace period a few seconds): a redeploy must wait for that drain instead of
retiring the slot under its in-flight requests. Clients keep requesting through Caddy or
Traefik (each run by dockyard itself) in two styles, one kept-alive connection per client
and a new connection per request; every request must get 200 and a version's answer.
"""

from __future__ import annotations

import collections
import http.client
import threading
import time
import urllib.parse
from typing import Any

import pytest
from litestar.testing import TestClient

from tests import httpd_agent
from tests.gitserver import Repo
from tests.httpd_agent import commit_agent

pytestmark = [pytest.mark.podman, pytest.mark.slow]

GRACE_S = 3.0
REDEPLOYS = 5
#: How long the agent takes to answer: longer than a switch, shorter than the grace period.
ANSWER_S = "0.4"
HEALTH = {"interval_s": 0.1, "timeout_s": 2, "deadline_s": 30}
SLOW_CGI = """\
#!/bin/sh
sleep {seconds}
printf 'Content-Type: text/plain\\r\\n\\r\\n{version}\\n'
"""


def _agent(repo: Repo, version: str) -> str:
    repo.write("www/cgi-bin/slow", SLOW_CGI.format(seconds=ANSWER_S, version=version), mode=0o755)
    return commit_agent(repo, version)


git_server = httpd_agent.git_server
client = httpd_agent.client_behind_each_proxy(
    timeout_s=180,
    port_range_start=46440,
    port_range_end=46460,
    build_timeout_s=60,
    router_watch_interval_s=0.5,
)


class Clients:
    """Threads requesting ``url`` without pause, ``per_style`` kept-alive and as many with
    a connection per request; what answered, and every failure by style."""

    def __init__(self, url: str, per_style: int = 4) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path
        self.answers: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, collections.Counter[str]] = {
            "keep-alive": collections.Counter(),
            "per-request": collections.Counter(),
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(style,), name=f"client-{style}-{i}")
            for style in self.failures
            for i in range(per_style)
        ]

    def _run(self, style: str) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
            headers = {"Connection": "keep-alive" if style == "keep-alive" else "close"}
            try:
                conn.request("GET", self.path, headers=headers)
                response = conn.getresponse()
                body = response.read().decode(errors="replace").strip()
                outcome = body if response.status == 200 else f"HTTP {response.status}: {body}"
                ok = response.status == 200
                reuse = style == "keep-alive" and not response.will_close
            except (OSError, http.client.HTTPException) as exc:
                outcome, ok, reuse = f"{type(exc).__name__}: {exc}", False, False
            with self._lock:
                (self.answers if ok else self.failures[style])[outcome] += 1
            if not reuse:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_back_to_back_redeploys_under_load_fail_no_request(
    client: TestClient[Any], git_server: Any
) -> None:
    daemon, builder = git_server
    router = client.app.state.services.router.name
    dep = f"load-{router}"
    repo = builder.new(dep)
    versions = [f"v{i}" for i in range(REDEPLOYS + 1)]
    for version in versions:
        _agent(repo, version)
        repo.tag(version)
    r = client.post(
        "/v1/repos?wait=true&timeout=120",
        json={
            "id": dep,
            "repo": f"{daemon.url}/{dep}.git",
            "ref": versions[0],
            "container_port": 8000,
            "health": HEALTH,
            "grace_period_s": GRACE_S,
        },
    )
    assert r.status_code == 200 and r.json()["promoted"], r.text
    try:
        url = r.json()["url"] + "cgi-bin/slow"

        with Clients(url) as load:
            time.sleep(1.0)
            for version in versions[1:]:
                r = client.post(
                    f"/v1/repos/{dep}/redeploy?wait=true&timeout=150", json={"ref": version}
                )
                assert r.status_code == 200, r.text
                assert r.json()["operation"]["error"] is None, r.json()["operation"]
                assert r.json()["promoted"], r.text
            time.sleep(GRACE_S + 1.0)  # the last drain ends while the clients still run

        failed = {style: dict(c) for style, c in load.failures.items() if c}
        assert not failed, failed
        assert set(load.answers) <= set(versions), load.answers
        assert load.answers[versions[-1]] > 0 and sum(load.answers.values()) > 100, load.answers

        events = client.get(f"/v1/repos/{dep}/events?limit=5000").json()
        waits = [e for e in events if e["kind"] == "drain_wait"]
        assert len(waits) >= REDEPLOYS - 1, [e["kind"] for e in events]
        cut_short = [e for e in events if e.get("message") == "replaced by a new deploy"]
        assert not cut_short, cut_short
        # Every retirement of a drained slot came after its whole grace period.
        drained_at: dict[str, float] = {}
        for event in events:
            if event["kind"] != "slot_transition":
                continue
            if event["to_state"] == "DRAINING":
                drained_at[event["color"]] = event["at"]
            elif event["to_state"] == "RETIRED" and event["from_state"] == "DRAINING":
                assert event["at"] - drained_at[event["color"]] >= GRACE_S - 0.05, event
    finally:
        # Even when it fails: nothing of this test stays on the host.
        assert client.delete(f"/v1/repos/{dep}").status_code == 200
