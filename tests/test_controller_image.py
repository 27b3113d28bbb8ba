"""dockyard's own image and Compose setup (``contrib/controller/``, ``contrib/compose.yaml``).

The slow test builds the controller image with ``contrib/controller/build.sh`` (offline: the
build runs with ``--network none``), runs it the way ``contrib/compose.yaml`` says (its
network, pid, privileges, environment and volumes, read from the file) against a private
rootful ``podman system service`` whose socket is mounted where the host's would be, and
deploys the example agent through its REST API on a loopback port, reached directly and
through the Caddy it runs. Everything it made is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AUTH, ON_CI, ROOT, TEST_TOKENS, free_port
from tests.serve import _toml

COMPOSE = ROOT / "contrib" / "compose.yaml"
BUILD = ROOT / "contrib" / "controller" / "build.sh"
#: Host ports the containerised dockyard leases for agents (no other test uses them).
PORT_RANGE = (46960, 46975)
_VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_service() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]["dockyard"]


def substitute(text: str, values: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}``, from ``values``."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1), m.group(2)), text)


def run_args(service: dict[str, Any], values: dict[str, str]) -> list[str]:
    """``podman run`` arguments saying what the Compose service says."""
    args = ["--network", service["network_mode"], "--pid", service["pid"]]
    if service.get("privileged"):
        args.append("--privileged")
    args += ["--stop-signal", service["stop_signal"]]
    for key, value in service["environment"].items():
        args += ["--env", f"{key}={substitute(str(value), values)}"]
    for volume in service["volumes"]:
        args += ["--volume", substitute(volume, values)]
    return args


def test_compose_mounts_the_socket_and_the_state_at_its_own_path() -> None:
    service = compose_service()
    assert service["image"] == "localhost/dockyard/controller:latest"
    assert "tag=localhost/dockyard/controller:latest" in BUILD.read_text()
    assert service["network_mode"] == "host"
    volumes = [substitute(v, {}) for v in service["volumes"]]
    assert "/run/podman/podman.sock:/run/podman/podman.sock" in volumes
    assert "/var/lib/dockyard:/var/lib/dockyard" in volumes
    assert service["environment"]["DOCKYARD_ROUTER"] == "caddy"
    values = {"DOCKYARD_STATE_DIR": "/srv/state", "DOCKYARD_ENGINE_SOCKET": "/tmp/e.sock"}
    args = run_args(service, values)
    assert "/srv/state:/srv/state" in args and "DOCKYARD_DATA_DIR=/srv/state" in args
    assert "/tmp/e.sock:/run/podman/podman.sock" in args
    # the README says what mounting the socket grants
    readme = (ROOT / "README.md").read_text()
    assert "root on the host" in readme and "contrib/compose.yaml" in readme


def _podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@pytest.fixture(scope="module")
def controller_image(offline_base_image: str) -> Iterator[str]:
    """The controller image, built by ``contrib/controller/build.sh`` under a test tag."""
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("the controller image test runs rootful Podman: run it as root")
        pytest.skip("needs root: the controller drives rootful Podman")
    given = os.environ.get("DOCKYARD_TEST_CONTROLLER_IMAGE")
    if given:  # an image already built by build.sh: used as it is, and kept
        yield given
        return
    tag = f"localhost/dockyard/controller:test-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        ["bash", str(BUILD), "--tag", tag],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    try:
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert f"building {tag} with no network" in done.stdout
        yield tag
    finally:
        _podman("rmi", "--force", tag, check=False)


def _request(url: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Any:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read() or b"null")


def _agent_repo(where: Path) -> Path:
    """The example agent as a git repository of its own (the worktree's .git is a file)."""
    shutil.copytree(ROOT / "contrib" / "example-agent", where)
    git = ["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for step in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "agent"]):
        subprocess.run([*git, *step], check=True, capture_output=True, timeout=30)
    return where


def _wait_healthy(url: str, name: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _request(f"{url}/v1/healthz", timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            state = _podman("inspect", "--format", "{{.State.Status}}", name, check=False)
            if state != "running" or time.monotonic() > deadline:
                logs = _podman("logs", name, check=False)
                raise AssertionError(f"dockyard in {name} is {state}: {logs[-3000:]}") from None
            time.sleep(0.5)


@pytest.mark.podman
@pytest.mark.slow
def test_the_controller_image_deploys_the_example_agent(
    controller_image: str, tmp_path: Path
) -> None:
    from dockyard.backends.podman.service import PodmanService

    repo = _agent_repo(tmp_path / "agent-repo")
    state = tmp_path / "state"
    state.mkdir()
    api_port, proxy_port = free_port(), free_port()
    values = {
        "port": api_port,
        "port_range_start": PORT_RANGE[0],
        "port_range_end": PORT_RANGE[1],
        "local_repos": [str(repo)],
        "rate_limit_per_ip": 0,
        "rate_limit_per_token": 0,
        "router_watch_interval_s": 0.5,
    }
    lines = [f"{k} = {_toml(v)}" for k, v in values.items()]
    for token in TEST_TOKENS:
        lines += ["[[api_tokens]]", *(f"{k} = {_toml(v)}" for k, v in token.items())]
    lines += ["[plugins.caddy]", f"listen = {_toml(f'127.0.0.1:{proxy_port}')}"]
    config = tmp_path / "dockyard.toml"
    config.write_text("\n".join(lines) + "\n")

    engine = PodmanService()  # rootful, on a socket of its own: "the host's" for this test
    engine.start()
    name = f"dockyard-controller-{uuid.uuid4().hex[:8]}"
    deployment = f"ctl-{uuid.uuid4().hex[:6]}"
    url = f"http://127.0.0.1:{api_port}"
    compose = {"DOCKYARD_STATE_DIR": str(state), "DOCKYARD_ENGINE_SOCKET": str(engine.socket_path)}
    try:
        _podman(
            "run",
            "--detach",
            "--name",
            name,
            *run_args(compose_service(), compose),
            "--volume",
            f"{repo}:{repo}:ro",
            "--volume",
            f"{config}:/etc/dockyard/dockyard.toml:ro",
            "--env",
            "DOCKYARD_CONFIG=/etc/dockyard/dockyard.toml",
            controller_image,
        )
        health = _wait_healthy(url, name)
        assert health["runtime"]["name"] == "podman", health
        assert health["runtime"]["rootless"] is False, health
        assert health["runtime"]["egress_enforced"] is True, health

        view = _request(
            f"{url}/v1/repos?wait=true&timeout=280",
            "POST",
            {"id": deployment, "repo": str(repo), "health": {"deadline_s": 60}},
            timeout=300,
        )
        blue = {s["color"]: s for s in view["slots"]}["blue"]
        why = f"{blue.get('reason')}: {blue.get('message')}; {_podman('logs', name)[-2000:]}"
        assert blue["state"] == "PROMOTED", why
        direct = _request(f"http://127.0.0.1:{blue['host_port']}/health")
        assert direct["status"] == "ok"
        routed = _request(f"http://127.0.0.1:{proxy_port}/apps/{deployment}/health")
        assert routed["status"] == "ok"
        assert (state / "dockyard.db").exists() or any(state.iterdir())  # state on the host

        _request(f"{url}/v1/repos/{deployment}", "DELETE")
        left = _podman("ps", "-a", "-q", "--filter", f"label=io.dockyard.deployment={deployment}")
        assert left == ""
        # SIGTERM: dockyard stops cleanly (exit 0) well within the grace period
        _podman("stop", "--time", "60", name, timeout=90)
        assert _podman("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
        # the agent's image was built by the host's engine (through the socket), offline
        images = _podman("images", "--filter", f"label=io.dockyard.source.repo=file://{repo}")
        assert "agent-repo" in images
    finally:
        _podman("rm", "--force", "--time", "10", name, check=False)
        ours = _podman(
            "ps", "-a", "-q", "--filter", f"label=io.dockyard.deployment={deployment}", check=False
        )
        for container in ours.split():
            _podman("rm", "--force", container, check=False)
        # the agent's image (deleting a deployment keeps it, as a cache for its commit)
        built = _podman(
            "images", "-q", "--filter", f"label=io.dockyard.source.repo=file://{repo}", check=False
        )
        for image in set(built.split()):
            _podman("rmi", "--force", image, check=False)
        engine.stop()
