"""End to end through the HTTP API with a real engine and a real git server on loopback:
fetch exactly the commit asked for, build it safely, deploy blue/green, roll back, delete.

Every test runs once per runtime (:data:`E2E_RUNTIMES`):

- ``podman``: dockyard's own Podman plugin, starting its private ``podman system service``
  as the app starts (the production path);
- ``docker``: the Docker plugin on the session's private dockerd
  (``tests/contract/conftest.py``), selected in the settings like an operator would.

The tests look at the engine through the engine-neutral probes of
:class:`tests.contract.conftest.Engine` (the Podman CLI, the Docker API), never through the
runtime under test. Test agents are busybox httpd images built from the repositories, so
every build runs offline in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import AUTH, TEST_SETTINGS
from tests.contract.conftest import ENGINES, Engine, PodmanEngine
from tests.gitserver import GitDaemon, Repo, daemon_with_repos

pytestmark = [pytest.mark.slow]

E2E_RUNTIMES = [
    pytest.param("podman", marks=[pytest.mark.podman]),
    pytest.param("docker", marks=[pytest.mark.docker]),
]
#: Host ports each runtime's dockyards lease: (API tests, the example agent).
PORT_RANGES = {
    "podman": ((46000, 46050), (46100, 46110)),
    "docker": ((46600, 46650), (46700, 46710)),
}
LABELS = {"io.dockyard.managed": "true"}
HEALTH = {"interval_s": 0.2, "timeout_s": 2, "deadline_s": 20}

AGENT_DOCKERFILE = """\
FROM scratch
ARG VERSION=unset
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
RUN echo "$VERSION" > /www/build-arg.txt
CMD ["httpd", "-f", "-p", "8000", "-h", "/www"]
"""


def _podman_required() -> None:
    if shutil.which("podman") is None:
        from tests.conftest import ON_CI

        if ON_CI:
            pytest.fail("podman is not installed (CI=true: never skipped)")
        pytest.skip("podman is not installed: apt-get install podman")


def _agent(repo: Repo, version: str, *, healthy: bool = True, subdir: str = "") -> str:
    base = f"{subdir}/" if subdir else ""
    repo.write(f"{base}busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    repo.write(f"{base}Dockerfile", AGENT_DOCKERFILE)
    repo.write(f"{base}www/index.html", version)
    if healthy:
        repo.write(f"{base}www/health", "ok")
    elif (repo.work / base / "www" / "health").exists():
        repo.remove(f"{base}www/health")
    return repo.commit(version)


@pytest.fixture(scope="module")
def git_server(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GitDaemon, Any]]:
    """A loopback git daemon with fresh repositories for each runtime's run of the module."""
    with daemon_with_repos(tmp_path_factory.mktemp(f"repos-{engine.kind}") / "served") as served:
        yield served


@pytest.fixture(scope="module", params=E2E_RUNTIMES)
def engine(request: pytest.FixtureRequest) -> Engine:
    """The runtime under test, as probes of its engine plus the settings selecting it."""
    if request.param == "podman":
        _podman_required()
        return PodmanEngine(kind="podman", url="")  # dockyard starts its own service
    return ENGINES.get(str(request.param), request.session)


@pytest.fixture(scope="module")
def client(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    """One dockyard (the runtime under test, SQLite, git source with loopback allowed) per
    module and runtime."""
    from dockyard.api.app import create_app
    from dockyard.core.config import Settings

    data = tmp_path_factory.mktemp("data")
    (start, end), _ = PORT_RANGES[engine.kind]
    settings = Settings(
        **TEST_SETTINGS,
        **engine.settings(),
        data_dir=str(data),
        insecure_sources=True,
        port_range_start=start,
        port_range_end=end,
        build_timeout_s=20,
    )
    with TestClient(create_app(settings), timeout=120) as c:
        c.headers.update(AUTH)
        yield c
    # Nothing dockyard made may survive its own deletes.
    left = engine.container_names(LABELS)
    assert left == [], f"containers left behind: {left}"


def _get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode().strip()


def _slots(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["color"]: s for s in body["slots"]}


def _deploy(client: TestClient[Any], **spec: Any) -> dict[str, Any]:
    r = client.post("/v1/repos?wait=true&timeout=120", json={"health": HEALTH, **spec})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _wait(client: TestClient[Any], dep: str, check: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/repos/{dep}").json()
        if check(body) or time.monotonic() > deadline:
            return body  # type: ignore[no-any-return]
        time.sleep(0.2)


def _retired(color: str) -> Any:
    """Retired and cleaned up: the state moves first (intent), the port is freed last."""

    def check(body: dict[str, Any]) -> bool:
        slot = _slots(body)[color]
        return bool(slot["state"] == "RETIRED" and slot["host_port"] is None)

    return check


def _containers(engine: Engine, dep: str) -> list[str]:
    return engine.container_names({"io.dockyard.deployment": dep})


def _leases(client: TestClient[Any]) -> dict[int, str]:
    store = client.app.state.services.store
    with client.portal() as portal:
        return portal.call(store.list_leases)  # type: ignore[no-any-return]


def test_blue_green_lifecycle(client: TestClient[Any], engine: Engine, git_server: Any) -> None:
    daemon, builder = git_server
    repo = builder.new("lifecycle")
    v1 = _agent(repo, "v1")
    repo.tag("v1")
    v2 = _agent(repo, "v2")
    repo.tag("v2", annotated=True)
    v3 = _agent(repo, "v3", healthy=False)
    url = f"{daemon.url}/lifecycle.git"

    # v1 by tag -> PROMOTED, answering on its host port, exactly that commit.
    body = _deploy(client, id="life", repo=url, ref="v1", grace_period_s=1)
    blue = _slots(body)["blue"]
    assert blue["state"] == "PROMOTED", body
    assert blue["commit"] == v1
    assert _get(blue["host_port"]) == "v1"

    # v2 (annotated tag) into green; v1 drains, then retires: container and port gone.
    r = client.post("/v1/repos/life/redeploy?wait=true", json={"ref": "v2"})
    slots = _slots(r.json())
    assert slots["green"]["state"] == "PROMOTED" and slots["green"]["commit"] == v2
    assert slots["blue"]["state"] == "DRAINING"
    v1_port = slots["blue"]["host_port"]
    assert _get(v1_port) == "v1"  # still serving while it drains
    body = _wait(client, "life", _retired("blue"))
    assert _slots(body)["blue"]["state"] == "RETIRED"
    v2_port = _slots(body)["green"]["host_port"]
    assert _containers(engine, "life") == ["dockyard-life-green"]
    assert v1_port not in _leases(client)
    assert _get(v2_port) == "v2"

    # v3 (by full commit) never gets healthy -> FAILED with a reason; v2 keeps serving and
    # nothing of v3 is left.
    r = client.post(
        "/v1/repos/life/redeploy?wait=true", json={"ref": v3, "health": {**HEALTH, "deadline_s": 3}}
    )
    slots = _slots(r.json())
    assert slots["blue"]["state"] == "FAILED"
    assert slots["blue"]["reason"] == "health_check_failed"
    assert slots["green"]["state"] == "PROMOTED"
    assert _get(v2_port) == "v2"
    assert _containers(engine, "life") == ["dockyard-life-green"]
    assert set(_leases(client)) == {v2_port}

    # A deploy of the same inputs again (v2) reuses the image without rebuilding.
    client.post("/v1/repos/life/redeploy?wait=true", json={"ref": "v2", "health": HEALTH})
    events = client.get("/v1/repos/life/events").json()
    ready = [e for e in events if e["kind"] == "image_ready"]
    assert ready[-1]["data"]["reused"] is True
    body = client.get("/v1/repos/life").json()
    promoted = _slots(body)[body["promoted"]]
    assert promoted["commit"] == v2

    # switch back: the other slot's revision (v2 too, drained) is promoted again.
    other = "green" if body["promoted"] == "blue" else "blue"
    r = client.post("/v1/repos/life/switch?wait=true")
    assert r.json()["promoted"] == other

    # The build log and container logs are there.
    logs = client.get("/v1/repos/life/logs?build=true").json()
    assert logs["source"] == "build"
    assert client.get("/v1/repos/life/logs?tail=5").status_code == 200

    # delete -> no container, port lease or record left.
    assert client.delete("/v1/repos/life").status_code == 200
    assert _containers(engine, "life") == []
    assert not [o for o in _leases(client).values() if o.startswith("life")]
    assert client.get("/v1/repos/life").status_code == 404


def test_switch_back_to_a_retired_revision_restarts_it(
    client: TestClient[Any], git_server: Any
) -> None:
    daemon, builder = git_server
    repo = builder.new("rollback")
    _agent(repo, "r1")
    repo.branch("next")
    _agent(repo, "r2")
    url = f"{daemon.url}/rollback.git"
    _deploy(client, id="rb", repo=url, ref="main", grace_period_s=0.5)
    client.post("/v1/repos/rb/redeploy?wait=true", json={"ref": "next"})
    body = _wait(client, "rb", _retired("blue"))
    assert _slots(body)["blue"]["state"] == "RETIRED"
    r = client.post("/v1/repos/rb/switch?wait=true")
    body = r.json()
    assert body["promoted"] == "blue", body
    assert _get(_slots(body)["blue"]["host_port"]) == "r1"
    assert client.delete("/v1/repos/rb").status_code == 200


def test_two_deployments_in_parallel_and_409_when_busy(
    client: TestClient[Any], git_server: Any
) -> None:
    daemon, builder = git_server
    repo = builder.new("parallel")
    _agent(repo, "p1")
    url = f"{daemon.url}/parallel.git"
    for dep in ("par-a", "par-b"):
        r = client.post("/v1/repos", json={"id": dep, "repo": url, "health": HEALTH})
        assert r.status_code == 202
    r = client.post("/v1/repos/par-a/redeploy", json={})
    assert r.status_code == 409 and r.json()["reason"] == "conflict"
    for dep in ("par-a", "par-b"):
        body = _wait(client, dep, lambda b: not (b["operation"] or {}).get("running"), 120)
        assert body["promoted"] == "blue", body
        assert _get(_slots(body)["blue"]["host_port"]) == "p1"
    for dep in ("par-a", "par-b"):
        assert client.delete(f"/v1/repos/{dep}").status_code == 200


def test_subdirectory_build_args_and_recorded_commit(
    client: TestClient[Any], engine: Engine, git_server: Any
) -> None:
    daemon, builder = git_server
    repo = builder.new("mono")
    repo.write("README.md", "a monorepo")
    sha = _agent(repo, "sub", subdir="agents/web")
    body = _deploy(
        client,
        id="mono",
        repo=f"{daemon.url}/mono.git",
        subdir="agents/web",
        build_args={"VERSION": "42"},
    )
    blue = _slots(body)["blue"]
    assert blue["commit"] == sha
    assert _get(blue["host_port"], "/build-arg.txt") == "42"
    revision = blue["revision_id"]
    labels = engine.image_labels(_revision_image(client, revision))
    assert labels["io.dockyard.source.commit"] == sha
    assert labels["io.dockyard.source.subdir"] == "agents/web"
    assert client.delete("/v1/repos/mono").status_code == 200


def _revision_image(client: TestClient[Any], revision_id: str) -> str:
    store = client.app.state.services.store
    with client.portal() as portal:
        revision = portal.call(store.get_revision, revision_id)
    assert revision is not None and revision.image_tag
    return revision.image_tag


def test_image_mode_serves_the_mounted_source(
    client: TestClient[Any], engine: Engine, git_server: Any, tmp_path: Path
) -> None:
    daemon, builder = git_server
    # An operator's base image: busybox only.
    ctx = tmp_path / "base"
    ctx.mkdir()
    shutil.copy2("/bin/busybox", ctx / "busybox")
    (ctx / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    )
    engine.build_image(ctx, "localhost/dockyard-test/busybox:e2e")
    repo = builder.new("plain")
    repo.write("www/health", "ok")
    repo.write("www/index.html", "mounted")
    sha = repo.commit("plain source, no Dockerfile")
    body = _deploy(
        client,
        id="mounted",
        repo=f"{daemon.url}/plain.git",
        build_mode="image",
        image="localhost/dockyard-test/busybox:e2e",
        # As the validator's sandbox: cwd /app, a writable noexec tmpfs at /app/logs.
        command=[
            "sh",
            "-c",
            "mkdir /tmp/www && cp /app/www/* /tmp/www/ && pwd > /tmp/www/pwd && "
            "echo written > logs/probe && cp logs/probe /tmp/www/logs && "
            "grep ' /app/logs ' /proc/mounts > /tmp/www/mounts; "
            "exec httpd -f -p 8000 -h /tmp/www",
        ],
    )
    blue = _slots(body)["blue"]
    assert blue["state"] == "PROMOTED", body
    assert blue["commit"] == sha
    assert _get(blue["host_port"]) == "mounted"
    assert _get(blue["host_port"], "/pwd") == "/app"
    assert _get(blue["host_port"], "/logs") == "written"
    options = _get(blue["host_port"], "/mounts").split()[3].split(",")
    assert {"rw", "nosuid", "nodev", "noexec"} <= set(options), options
    mounts = engine.container_mounts(blue["container_name"])
    app = next(m for m in mounts if m["Destination"] == "/app")
    assert app["RW"] is False
    # The engine wrote nothing into the cached checkout (the mount is a view of it).
    data = Path(client.app.state.services.settings.data_dir)
    [checkout] = (data / "sources").glob(f"*/{sha}")
    assert sorted(p.name for p in checkout.iterdir()) == [".git", "www"]
    assert app["Source"] != str(checkout) and Path(app["Source"]).parent == data / "views"
    assert client.delete("/v1/repos/mounted").status_code == 200


@pytest.mark.parametrize(
    ("name", "ref", "reason"),
    [("missing-ref", "no-such-branch", "ref_not_found")],
)
def test_refused_sources_end_failed_with_their_reason(
    client: TestClient[Any], engine: Engine, git_server: Any, name: str, ref: str, reason: str
) -> None:
    daemon, builder = git_server
    repo = builder.new(name)
    _agent(repo, "x")
    r = client.post(
        "/v1/repos?wait=true",
        json={"id": name, "repo": f"{daemon.url}/{name}.git", "ref": ref, "health": HEALTH},
    )
    body = r.json()
    blue = _slots(body)["blue"]
    assert (blue["state"], blue["reason"]) == ("FAILED", reason), body
    assert _containers(engine, name) == []
    assert client.delete(f"/v1/repos/{name}").status_code == 200


def test_a_short_sha_is_refused_at_admission(
    client: TestClient[Any], engine: Engine, git_server: Any
) -> None:
    """As the README says: no fetch, no deployment, a 422 naming the ref."""
    daemon, builder = git_server
    repo = builder.new("short-sha")
    _agent(repo, "x")
    r = client.post(
        "/v1/repos?wait=true",
        json={"id": "short-sha", "repo": f"{daemon.url}/short-sha.git", "ref": "abc1234"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "invalid_repo_url"
    assert "abc1234" in r.json()["message"] and "40-hex" in r.json()["message"]
    assert client.get("/v1/repos/short-sha").status_code == 404
    assert _containers(engine, "short-sha") == []


def test_builds_without_network_and_with_a_timeout_leave_nothing(
    client: TestClient[Any], engine: Engine, git_server: Any
) -> None:
    daemon, builder = git_server
    repo = builder.new("hostile-build")
    repo.write("busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    repo.write(
        "Dockerfile",
        (
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            'RUN wget -T 3 -q -O /tmp/x http://127.0.0.1:1/ || (echo "network: none" && exit 7)\n'
        ),
    )
    repo.commit("needs network")
    repo.branch("forever")
    repo.write(
        "Dockerfile",
        (
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nRUN sleep 3600\n'
        ),
    )
    repo.commit("never ends")
    url = f"{daemon.url}/hostile-build.git"

    r = client.post("/v1/repos?wait=true", json={"id": "nonet", "repo": url, "ref": "main"})
    blue = _slots(r.json())["blue"]
    assert (blue["state"], blue["reason"]) == ("FAILED", "build_failed"), r.json()
    logs = client.get("/v1/repos/nonet/logs?build=true")
    assert logs.status_code in (200, 404)

    started = time.monotonic()
    r = client.post("/v1/repos?wait=true", json={"id": "forever", "repo": url, "ref": "forever"})
    blue = _slots(r.json())["blue"]
    assert (blue["state"], blue["reason"]) == ("FAILED", "build_timeout"), r.json()
    assert time.monotonic() - started < 60
    # No build container survives the timeout.
    build_containers = "\n".join(engine.build_container_lines())
    assert "sleep" not in build_containers
    for dep in ("nonet", "forever"):
        assert client.delete(f"/v1/repos/{dep}").status_code == 200


@pytest.fixture(scope="module")
def base_python_image(engine: Engine) -> str:
    """The offline Python base image (contrib/base-image/build.sh; ~1 min once per host,
    then a few seconds to import it into an engine)."""
    from tests.conftest import ROOT

    command = ["bash", str(ROOT / "contrib" / "base-image" / "build.sh")]
    env = dict(os.environ)
    if engine.kind == "docker":
        command += ["--engine", "docker"]
        env["DOCKER_HOST"] = engine.url
    subprocess.run(command, check=True, capture_output=True, timeout=900, env=env)
    return "localhost/dockyard/base-python:bookworm"


def test_the_example_agent_from_this_checkout(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory, base_python_image: str
) -> None:
    """What the README's first command prints: deploy contrib/example-agent from this
    checkout (trusted with --allow-local-repo) and talk Autoppia's protocol to it."""
    from dockyard.api.app import create_app
    from dockyard.core.config import Settings
    from tests.conftest import ROOT

    if not (ROOT / ".git").exists():
        pytest.skip("this checkout is not a git repository")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    _, (start, end) = PORT_RANGES[engine.kind]
    settings = Settings(
        **TEST_SETTINGS,
        **engine.settings(),
        data_dir=str(tmp_path_factory.mktemp("example")),
        local_repos=[str(ROOT)],
        port_range_start=start,
        port_range_end=end,
    )
    with TestClient(create_app(settings), timeout=300) as client:
        client.headers.update(AUTH)
        r = client.post(
            "/v1/repos?wait=true&timeout=280",
            json={
                "id": "example",
                "repo": str(ROOT),
                "subdir": "contrib/example-agent",
                "health": {**HEALTH, "deadline_s": 60},
            },
        )
        body = r.json()
        blue = _slots(body)["blue"]
        assert blue["state"] == "PROMOTED", body
        assert blue["commit"] == head
        port = blue["host_port"]
        assert json.loads(_get(port, "/health"))["status"] == "ok"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/step",
            method="POST",
            data=json.dumps(
                {"task_id": "t1", "prompt": "open it", "url": "http://site.test/", "step_index": 0}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            step = json.load(answer)
        assert step["tool_calls"] == [
            {"name": "browser.navigate", "arguments": {"url": "http://site.test/"}}
        ]
        # an untrusted local path is refused up front
        r = client.post("/v1/repos", json={"id": "untrusted", "repo": "/etc"})
        assert r.status_code == 422 and r.json()["reason"] == "invalid_repo_url"
        assert client.delete("/v1/repos/example").status_code == 200
