"""The build proxy goes with dockyard: ``dockyard serve`` on real rootful Podman with
``build_proxy = "squid"`` gets SIGTERM (or SIGKILL) while a build holds its squid; no squid
survives, and no pid file is left after a clean stop (a killed dockyard's is reaped by the
next start)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import httpd_agent
from tests.gitserver import GitDaemon, RepoBuilder
from tests.serve import Served, alive

pytestmark = [pytest.mark.podman, pytest.mark.slow]

SLOW = """\
FROM python:3.11-slim
RUN python3 -c "import time; time.sleep(90)"
"""


git_server = httpd_agent.git_server


def _serve(data: Path, offline_base_image: str, ports: tuple[int, int]) -> Served:
    return Served(
        data,
        port_range=ports,
        router="none",
        build_proxy="squid",
        build_proxy_allow=["127.0.0.1:9"],
        build_timeout_s=120,
        env={"DOCKYARD_BASE_IMAGE_ALIASES": f"python:3.11-slim={offline_base_image}"},
    ).start()


def _building(served: Served, daemon: GitDaemon, repos: RepoBuilder, name: str) -> dict[int, Any]:
    """Start a deploy whose build sleeps in a RUN step; the processes once squid runs."""
    repo = repos.new(name)
    repo.write("Dockerfile", SLOW)
    commit = repo.commit("slow")
    status, body = served.request(
        "POST", "/v1/repos", {"id": name, "repo": f"{daemon.url}/{name}.git", "ref": commit}
    )
    assert status == 202, body
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        processes = served.descendants()
        commands = [cmd for _, cmd in processes.values()]
        if any("squid" in c for c in commands) and any("time.sleep(90)" in c for c in commands):
            return processes
        time.sleep(0.2)
    raise AssertionError(f"the build never ran under its proxy: {served.log_tail()}")


def test_sigterm_mid_build_stops_the_build_proxy(
    git_server: tuple[GitDaemon, RepoBuilder], tmp_path: Path, offline_base_image: str
) -> None:
    daemon, repos = git_server
    data = tmp_path / "data"
    served = _serve(data, offline_base_image, (62930, 62935))
    try:
        processes = _building(served, daemon, repos, "term")
        squids = {pid: v for pid, v in processes.items() if "squid" in v[1]}
        assert squids and list((data / "build-proxy").glob("*.pid"))
        served.signal(signal.SIGTERM)
        assert served.wait(60) == 0, served.log_tail()
        assert alive(squids) == {}, alive(squids)
        assert alive(processes) == {}, alive(processes)
        assert not list(data.rglob("*.pid")), list(data.rglob("*.pid"))
        workdirs = [Path(cmd.split(" -f ")[1].split()[0]).parent for _, cmd in squids.values()]
        assert workdirs and not any(w.exists() for w in workdirs), workdirs
    finally:
        served.stop()


def test_sigkill_mid_build_leaves_no_build_proxy(
    git_server: tuple[GitDaemon, RepoBuilder], tmp_path: Path, offline_base_image: str
) -> None:
    daemon, repos = git_server
    data = tmp_path / "data"
    served = _serve(data, offline_base_image, (62936, 62940))
    try:
        processes = _building(served, daemon, repos, "kill")
        squids = {pid: v for pid, v in processes.items() if "squid" in v[1]}
        assert squids
        served.signal(signal.SIGKILL)
        served.wait(30)
        deadline = time.monotonic() + 10
        while alive(squids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive(squids) == {}, "squid outlived a killed dockyard"
        # The next start reaps what is left (the pid file; the build's RUN step).
        pid_files = list((data / "build-proxy").glob("*.pid"))
        assert pid_files
        network = f"dockyard-build-{pid_files[0].stem[:12]}"
        port = json.loads(pid_files[0].read_text())["port"]
        assert _network_exists(network) and port in _granted_ports()
        workdirs = [Path(cmd.split(" -f ")[1].split()[0]).parent for _, cmd in squids.values()]
        served.start()
        assert not list((data / "build-proxy").glob("*.pid"))
        assert not any(w.exists() for w in workdirs), workdirs
        # Its next build removes the killed one's build network and firewall grant (the
        # build fails on purpose: it leaves no image behind).
        repo = repos.new("after")
        repo.write("Dockerfile", "FROM python:3.11-slim\nRUN exit 3\n")
        commit = repo.commit("quick")
        body = {"id": "after", "repo": f"{daemon.url}/after.git", "ref": commit}
        status, answer = served.request("POST", "/v1/repos?wait=true&timeout=120", body)
        assert status == 200, answer
        assert not _network_exists(network), network
        assert port not in _granted_ports()
        assert "exit status 3" in json.dumps(answer), answer
        assert served.request("DELETE", "/v1/repos/after")[0] in (200, 202)
    finally:
        served.stop()


def _network_exists(name: str) -> bool:
    found = subprocess.run(["podman", "network", "exists", name], timeout=60, check=False)
    return found.returncode == 0


def _granted_ports() -> set[int]:
    """The proxy ports the build firewall grants (any dockyard's on this host)."""
    from dockyard.backends.engine.build_firewall import BuildFirewall

    return {grant.port for grant, _, _ in BuildFirewall().grants()}
