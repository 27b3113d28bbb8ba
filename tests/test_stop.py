"""A clean stop: ``dockyard serve`` on real Podman behind Caddy gets SIGTERM (what systemd
sends) while a redeploy is building, exits 0, and leaves no process it started running: not
Caddy, not its private ``podman system service``, not a build step.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from dockyard.core.config import Settings
from tests import httpd_agent
from tests.gitserver import GitDaemon, Repo
from tests.httpd_agent import commit_agent, require_podman
from tests.proxies import require
from tests.serve import Served, alive

pytestmark = [pytest.mark.podman, pytest.mark.slow]

HEALTH = {"interval_s": 0.2, "timeout_s": 2, "deadline_s": 20}


def podman_required() -> None:
    require_podman()
    require("caddy")


def agent(repo: Repo, version: str, *, slow_build_s: int = 0) -> str:
    """Commit a busybox httpd agent answering ``version``; with ``slow_build_s`` its build
    has a ``RUN sleep``."""
    steps = f'RUN ["/bin/busybox", "sleep", "{slow_build_s}"]\n' if slow_build_s else ""
    return commit_agent(repo, version, build_steps=steps)


def engine_containers(data_dir: Path) -> list[str]:
    """Containers of the dockyard on ``data_dir`` (its instance label), as Podman says."""
    import subprocess

    instance = Settings(data_dir=str(data_dir)).instance_id
    out = subprocess.run(
        [
            "podman",
            "ps",
            "-a",
            "--filter",
            f"label=io.dockyard.instance={instance}",
            "--format",
            "{{.Names}}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return sorted(out.split())


git_server = httpd_agent.git_server


def slot_rows(served: Served, deployment_id: str) -> dict[str, dict[str, Any]]:
    rows = served.query("SELECT color, body FROM slots WHERE deployment_id = ?", deployment_id)
    return {color: json.loads(body) for color, body in rows}


def test_sigterm_stops_every_process_dockyard_started(
    git_server: tuple[GitDaemon, Any], tmp_path: Path
) -> None:
    podman_required()
    daemon, repos = git_server
    repo = repos.new("stop-agent")
    v1 = agent(repo, "v1")
    slow = agent(repo, "v2", slow_build_s=30)
    data = tmp_path / "data"
    served = Served(data, port_range=(45300, 45320)).start()
    try:
        status, body = served.request(
            "POST",
            "/v1/repos?wait=true&timeout=120",
            {
                "id": "stop-app",
                "repo": f"{daemon.url}/stop-agent.git",
                "ref": v1,
                "health": HEALTH,
                "grace_period_s": 0,
            },
            timeout=150,
        )
        assert status == 200 and body["promoted"] == "blue", body
        assert served.through_proxy("/apps/stop-app/health") == 200
        status, body = served.request("POST", "/v1/repos/stop-app/redeploy", {"ref": slow})
        assert status == 202, body
        # Wait until the slow build is inside its RUN step (a process under the service).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("sleep 30" in cmd for _, cmd in served.descendants().values()):
                break
            time.sleep(0.2)
        processes = served.descendants()
        commands = " | ".join(cmd for _, cmd in processes.values())
        assert "caddy" in commands and "system service" in commands, commands
        assert "sleep 30" in commands, commands  # the build step runs as we stop

        started = time.monotonic()
        served.signal(signal.SIGTERM)
        assert served.wait(60) == 0, served.log_tail()
        took = time.monotonic() - started
        assert alive(processes) == {}, f"still running after the stop: {alive(processes)}"
        assert took < 45, f"the stop took {took:.1f} s"
        assert not list(data.rglob("*.pid")), list(data.rglob("*.pid"))
        # The cancelled redeploy is closed with its reason; the promoted slot was kept.
        slots = slot_rows(served, "stop-app")
        assert (slots["green"]["state"], slots["green"]["reason"]) == (
            "FAILED",
            "controller_stopped",
        ), slots["green"]
        assert slots["blue"]["state"] == "PROMOTED"

        # The next start serves the deployment again (route restored through a new Caddy).
        served.start()
        deadline = time.monotonic() + 20
        while served.through_proxy("/apps/stop-app/health") != 200:
            assert time.monotonic() < deadline, "not served again after the restart"
            time.sleep(0.2)
        status, _ = served.request("DELETE", "/v1/repos/stop-app")
        assert status == 200
    finally:
        served.stop()
    assert engine_containers(data) == []


def test_sigint_stops_an_idle_dockyard_cleanly(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) is a stop too: exit 0, the proxy and the private Podman service
    gone, their pid files removed."""
    podman_required()
    data = tmp_path / "data"
    served = Served(data, port_range=(45321, 45325)).start()
    try:
        processes = served.descendants()
        commands = " | ".join(cmd for _, cmd in processes.values())
        assert "caddy" in commands and "system service" in commands, commands
        assert sorted(p.name for p in data.rglob("*.pid")) == ["caddy.pid", "podman-service.pid"]
        served.signal(signal.SIGINT)
        assert served.wait(60) == 0, served.log_tail()
        assert alive(processes) == {}, f"still running after the stop: {alive(processes)}"
        assert not list(data.rglob("*.pid"))
    finally:
        served.stop()


def test_sigkill_mid_build_leaves_nothing_after_the_next_start(
    git_server: tuple[GitDaemon, Any], tmp_path: Path
) -> None:
    """kill -9 while a build is in its ``RUN`` step: the proxy and the private Podman service
    die with dockyard; the ``RUN`` step is the engine's, so the next start on the same data
    directory finds it by its build marker and stops it. Nothing dockyard started survives."""
    podman_required()
    daemon, repos = git_server
    repo = repos.new("kill-agent")
    slow = agent(repo, "v1", slow_build_s=120)
    data = tmp_path / "data"
    served = Served(data, port_range=(45330, 45340)).start()
    try:
        status, body = served.request(
            "POST",
            "/v1/repos",
            {
                "id": "kill-app",
                "repo": f"{daemon.url}/kill-agent.git",
                "ref": slow,
                "health": HEALTH,
                "grace_period_s": 0,
            },
        )
        assert status == 202, body
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any("sleep 120" in cmd for _, cmd in served.descendants().values()):
                break
            time.sleep(0.2)
        processes = served.descendants()
        build_steps = {pid: p for pid, p in processes.items() if "sleep 120" in p[1]}
        assert build_steps, " | ".join(cmd for _, cmd in processes.values())

        served.signal(signal.SIGKILL)
        served.wait(30)
        served.start()  # the same data directory: reaps what the killed one left
        deadline = time.monotonic() + 30
        while alive(build_steps) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(build_steps) == {}, f"the killed build's RUN step survived: {build_steps}"
        left = {pid: p for pid, p in alive(processes).items() if pid not in build_steps}
        assert left == {}, f"still running after kill -9 and a restart: {left}"
        slots = slot_rows(served, "kill-app")
        assert slots["blue"]["state"] == "FAILED", slots["blue"]
        assert slots["blue"]["reason"] == "controller_restarted", slots["blue"]
        status, _ = served.request("DELETE", "/v1/repos/kill-app")
        assert status == 200
    finally:
        served.stop()
    assert engine_containers(data) == []
