"""Hostile repositories: real builds and real containers through the API, each ending in a
clear reason with the host unharmed and nothing left behind.

Every agent here is a busybox ``FROM scratch`` image built offline from a repository served
by a loopback git daemon. A hostile agent waits for a go signal (``/tmp/go``, written with
``podman exec``) before it misbehaves, so the tests first check, on the host, that the limit
it attacks is really in place (the cgroup's ``pids.max``, ``memory.limit_in_bytes``): a fork
bomb never runs unlimited. Tests that rely on a limit run only where the runtime says the
limit holds (``/v1/healthz``: ``limits_enforced``, ``runtime.egress_enforced``) and are
skipped with the runtime's own note where it does not (rootless Podman on cgroup v1).

The engines are the contract suite's private Podman services (``tests/contract``), rootful
and rootless. A build that needs the network is also covered by
``tests/test_e2e.py::test_builds_without_network_and_with_a_timeout_leave_nothing``; the one
here reaches for a host service on loopback, which a build sharing the host's network
namespace (Podman 4.3's default for API builds) would get.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import AUTH, TEST_SETTINGS
from tests.contract.conftest import ENGINES, DockerEngine, PodmanEngine, busybox_path
from tests.gitserver import GitDaemon, Repo, RepoBuilder

pytestmark = [pytest.mark.slow]

ENGINE_KINDS = [
    pytest.param("podman-rootful", id="rootful", marks=[pytest.mark.podman]),
    pytest.param(
        "podman-rootless", id="rootless", marks=[pytest.mark.podman, pytest.mark.rootless]
    ),
    pytest.param("docker", id="docker", marks=[pytest.mark.docker]),
]
PORTS = {
    "podman-rootful": (46500, 46540),
    "podman-rootless": (46550, 46590),
    "docker": (46600, 46640),
}
#: The tests that run on the Docker engine too (the network policy); the others use
#: Podman's CLI and cgroup layout.
DOCKER_TESTS = {
    "test_agent_reaches_its_gateway_and_nothing_else",
    "test_nothing_is_left_on_the_engine",
}


class DockerCLI:
    """The few ``podman``-CLI calls the network tests make, through the ``docker`` CLI
    against the private dockerd (``.ImageName`` is Docker's ``.Config.Image``)."""

    def __init__(self, engine: DockerEngine) -> None:
        self.engine = engine
        self.rootless = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        docker = shutil.which("docker")
        if docker is None:
            pytest.skip("the docker CLI is not installed")
        args = tuple(a.replace("{{.ImageName}}", "{{.Config.Image}}") for a in args)
        return subprocess.run(
            [docker, "-H", self.engine.url, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )


LABELS = {"io.dockyard.managed": "true"}
HEALTH = {"interval_s": 0.2, "timeout_s": 2, "deadline_s": 20}
MIB = 1024 * 1024

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
COPY start.sh /start.sh
CMD ["/bin/sh", "/start.sh"]
"""
#: ``/cgi-bin/try?host:port``: one HTTP request from inside the agent, and what came back.
TRY_CGI = r"""#!/bin/sh
echo "Content-Type: text/plain"
echo ""
host="${QUERY_STRING%%:*}"; port="${QUERY_STRING##*:}"
out=$(printf 'GET / HTTP/1.0\r\nHost: agent\r\n\r\n' | nc -w 3 "$host" "$port" 2>&1 | tail -n 1)
echo "result=${out:-no answer}"
echo "gateway=${OPENAI_BASE_URL:-}"
"""
WAIT_FOR_GO = "while [ ! -e /tmp/go ]; do sleep 0.1; done\n"


# ----------------------------------------------------------------------------- helpers
class Answer(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_service(host: str, body: str) -> Iterator[int]:
    """A tiny HTTP server answering ``body`` on ``host``:<free port>."""
    handler = type("Handler", (Answer,), {"body": body.encode()})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def remote_host() -> Iterator[str | None]:
    """An HTTP server on another "host": a network namespace of our own behind a veth pair,
    routed by this host (as the internet would be). None when it cannot be made here."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"dyh-{tag}", f"dyhh{tag}", f"dyhn{tag}"
    octet = int(tag[:2], 16) % 200 + 20
    ip = shutil.which("ip")
    server: subprocess.Popen[bytes] | None = None
    if ip is None or os.geteuid() != 0:
        yield None
        return
    steps = [
        ["netns", "add", ns],
        ["link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["link", "set", ns_if, "netns", ns],
        ["addr", "add", f"10.251.{octet}.1/30", "dev", host_if],
        ["link", "set", host_if, "up"],
        ["-n", ns, "addr", "add", f"10.251.{octet}.2/30", "dev", ns_if],
        ["-n", ns, "link", "set", ns_if, "up"],
        ["-n", ns, "route", "add", "default", "via", f"10.251.{octet}.1"],
    ]
    target: str | None = None
    www: Path | None = None
    try:
        for step in steps:
            subprocess.run([ip, *step], check=True, capture_output=True, timeout=10)
        www = Path(tempfile.mkdtemp(prefix="dyh-www-"))
        (www / "index.html").write_text("remote-ok\n")
        server = subprocess.Popen(
            [ip, "netns", "exec", ns, str(busybox_path()), "httpd", "-f", "-h", str(www),
             "-p", f"10.251.{octet}.2:8080"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while target is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((f"10.251.{octet}.2", 8080), timeout=1).close()
                target = f"10.251.{octet}.2:8080"
            time.sleep(0.05)
    except (subprocess.SubprocessError, OSError):
        target = None
    try:
        yield target
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        if www is not None:
            shutil.rmtree(www, ignore_errors=True)
        subprocess.run([ip, "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=10)


_REPOS: dict[tuple[int, str], Repo] = {}


def agent(
    builder: RepoBuilder,
    name: str,
    start: str,
    *,
    health: bool = True,
    dockerfile: str = "",
    www: dict[str, str] | None = None,
) -> Repo:
    """A repository whose image runs ``start`` (a busybox sh script) as its main process;
    ``www`` adds files under /www. Made once per git server (both engines use it)."""
    made = _REPOS.get((id(builder), name))
    if made is not None:
        return made
    repo = _REPOS[(id(builder), name)] = builder.new(name)
    for path, text in (www or {}).items():
        repo.write(f"www/{path}", text)
    repo.write("busybox", busybox_path().read_bytes(), mode=0o755)
    repo.write("Dockerfile", dockerfile or DOCKERFILE)
    repo.write("start.sh", "#!/bin/sh\n" + start)
    repo.write("www/index.html", name)
    repo.write("www/cgi-bin/try", TRY_CGI, mode=0o755)
    if health:
        repo.write("www/health", "ok")
    repo.commit(name)
    return repo


def slots(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["color"]: s for s in body["slots"]}


def wait_for(
    client: TestClient[Any], dep: str, check: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/v1/repos/{dep}").json()
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def failed(body: dict[str, Any]) -> bool:
    return slots(body)["blue"]["state"] == "FAILED" and slots(body)["blue"]["host_port"] is None


def leases(client: TestClient[Any]) -> dict[int, str]:
    store = client.app.state.services.store
    with client.portal() as portal:
        return portal.call(store.list_leases)  # type: ignore[no-any-return]


def get(port: int, path: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return str(r.read().decode())


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def cgroup_file(pid: int, controller: str, name: str) -> Path | None:
    """``name`` in the cgroup (v1 or v2) of ``pid`` for ``controller``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        base = f"/sys/fs/cgroup/{controllers}" if controllers else "/sys/fs/cgroup"
        if controller in controllers.split(",") or (not controllers and controller == ""):
            candidate = Path(base + path) / name
            if candidate.exists():
                return candidate
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            candidate = Path("/sys/fs/cgroup" + line[3:]) / name
            if candidate.exists():
                return candidate
    return None


def host_can_fork() -> float:
    """Seconds this host takes to start a process (it must stay able to)."""
    started = time.monotonic()
    subprocess.run(["true"], check=True, timeout=10)
    return time.monotonic() - started


class Hostile:
    """One dockyard on one engine, with the host services the agents attack."""

    def __init__(
        self,
        client: TestClient[Any],
        engine: PodmanEngine | DockerCLI,
        builder: RepoBuilder,
        daemon: GitDaemon,
        services: dict[str, Any],
    ) -> None:
        self.client, self.engine, self.builder, self.daemon = client, engine, builder, daemon
        self.services = services
        self.health = client.get("/v1/healthz").json()
        self.ids: set[str] = set()

    def left_behind(self) -> list[str]:
        """Containers of this module's deployments still on the engine (other test runs
        may share the engine: their containers are not ours to judge)."""
        return [
            name
            for dep in sorted(self.ids)
            for name in self.engine.container_names({"io.dockyard.deployment": dep})
        ]

    def require_limits(self) -> None:
        if not self.health["limits_enforced"]:
            pytest.skip(f"resource limits do not hold here: {self.health['limits_note']}")

    def require_egress(self) -> None:
        runtime = self.health["runtime"]
        if not runtime.get("egress_enforced"):
            pytest.skip(f"the network policy does not hold here: {runtime.get('egress_note')}")

    def url(self, repo: Repo) -> str:
        return f"{self.daemon.url}/{repo.git_dir.name}"

    def deploy(self, dep: str, repo: Repo, *, wait: bool = True, **spec: Any) -> dict[str, Any]:
        self.ids.add(dep)
        body = {"id": dep, "repo": self.url(repo), "health": HEALTH, **spec}
        r = self.client.post(f"/v1/repos?wait={str(wait).lower()}&timeout=120", json=body)
        assert r.status_code in (200, 202), r.text
        return r.json()  # type: ignore[no-any-return]

    def container(self, dep: str, color: str = "blue") -> str:
        return f"dockyard-{dep}-{color}"

    def pid(self, name: str) -> int:
        return int(self.engine.cli("inspect", "--format", "{{.State.Pid}}", name).stdout)

    def go(self, name: str) -> None:
        self.engine.cli("exec", name, "touch", "/tmp/go")

    def events(self, dep: str) -> list[dict[str, Any]]:
        return self.client.get(f"/v1/repos/{dep}/events").json()  # type: ignore[no-any-return]

    def delete(self, dep: str) -> None:
        assert self.client.delete(f"/v1/repos/{dep}").status_code == 200
        assert self.engine.container_names({"io.dockyard.deployment": dep}) == []
        assert not [o for o in leases(self.client).values() if o.startswith(f"{dep}:")]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GitDaemon, Any]]:
    root = tmp_path_factory.mktemp("repos") / "served"
    builder = RepoBuilder(root)
    with GitDaemon(root) as daemon:
        yield daemon, builder


@pytest.fixture(scope="module")
def host_services() -> Iterator[dict[str, Any]]:
    """The gateway (loopback; rootless Podman's on the host's primary address), a host
    service on every address, a loopback-only service, and a remote host: what an agent may
    reach (the gateway) and may not (the rest)."""
    with (
        http_service("127.0.0.1", "gateway-ok") as gateway,
        http_service(_primary_ip(), "gateway-ok") as primary_gateway,
        http_service("0.0.0.0", "host-open") as open_port,
        http_service("127.0.0.1", "host-loopback") as loopback,
        remote_host() as remote,
    ):
        yield {
            "gateway": gateway,
            "primary_gateway": primary_gateway,
            "open": open_port,
            "loopback": loopback,
            "remote": remote,
        }


@pytest.fixture(autouse=True)
def _delete_what_a_failed_test_left(
    hostile: Hostile, request: pytest.FixtureRequest
) -> Iterator[None]:
    before = set(hostile.ids)
    yield
    for dep in hostile.ids - before:
        hostile.client.delete(f"/v1/repos/{dep}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs on both Podman engines; on Docker only those in DOCKER_TESTS (the
    others read Podman's CLI and cgroup paths), so no Docker variant is made for them."""
    if "hostile" not in metafunc.fixturenames:
        return
    kinds = [
        k
        for k in ENGINE_KINDS
        if metafunc.function.__name__ in DOCKER_TESTS or not str(k.values[0]).startswith("docker")
    ]
    metafunc.parametrize("hostile", kinds, indirect=True, scope="module")


@pytest.fixture(scope="module")
def hostile(
    request: pytest.FixtureRequest,
    git_server: tuple[GitDaemon, RepoBuilder],
    host_services: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Hostile]:
    from dockyard.api.app import create_app
    from dockyard.core.config import Settings

    kind = str(request.param)
    engine: Any = ENGINES.get(kind, request.session)
    if isinstance(engine, DockerEngine):
        engine = DockerCLI(engine)
    else:
        assert isinstance(engine, PodmanEngine)
    start, end = PORTS[kind]
    # Rootless Podman cannot reach a gateway on the host's loopback: it gets one on the
    # host's primary address (reached through slirp4netns).
    gateway_at = (
        f"{_primary_ip()}:{host_services['primary_gateway']}"
        if engine.rootless
        else f"127.0.0.1:{host_services['gateway']}"
    )
    gateway = f"http://{gateway_at}/v1"
    settings = Settings(
        **{**TEST_SETTINGS, "monitor_interval_s": 0.5},
        **engine.settings(),
        data_dir=str(tmp_path_factory.mktemp("data")),
        insecure_sources=True,
        port_range_start=start,
        port_range_end=end,
        build_timeout_s=30,
        agent_gateway=gateway,
        max_container_lifetime_s=600,
    )
    daemon, builder = git_server
    with TestClient(create_app(settings), timeout=120) as client:
        client.headers.update(AUTH)
        hostile = Hostile(client, engine, builder, daemon, host_services)
        yield hostile
        for deployment in client.get("/v1/status").json().get("deployments", []):
            client.delete(f"/v1/repos/{deployment['id']}")  # what a failed test left
        assert leases(client) == {}, "port leases left behind"
    assert hostile.left_behind() == [], "containers left behind"
    if gateway is not None:  # the gateway network of this run's (random) gateway port
        digest = hashlib.sha256(gateway_at.encode()).hexdigest()
        agents = "dockyard-agents-docker" if isinstance(engine, DockerCLI) else "dockyard-agents"
        engine.cli("network", "rm", f"{agents}-gw-{digest[:8]}", check=False)
    if isinstance(engine, DockerCLI):  # the private dockerd's bridges outlive it otherwise
        engine.cli("network", "prune", "-f", "--filter", "label=io.dockyard.network", check=False)


# ------------------------------------------------------------------------------- tests
def test_fork_bomb_is_held_by_the_pids_limit(hostile: Hostile) -> None:
    """pids 64: the bomb fills its cgroup and no more; the host keeps forking; the agent is
    stopped at its lifetime (``lifetime_exceeded``) and removed.

    The bomb is a tree of interactive shells, each forking itself forever: an interactive
    shell survives a failed fork (a plain ``f() { f | f & }`` dies out at the limit)."""
    hostile.require_limits()
    repo = agent(
        hostile.builder,
        "forkbomb",
        "httpd -p 8000 -h /www\n" + WAIT_FOR_GO + "sh /www/bomb.sh &\nexec sleep 2147483647\n",
        www={"bomb.sh": "yes 'sh /www/bomb.sh &' | sh -i >/dev/null 2>&1\n"},
    )
    body = hostile.deploy("bomb", repo, resources={"pids": 64}, max_lifetime_s=6)
    assert slots(body)["blue"]["state"] == "PROMOTED", body
    name = hostile.container("bomb")
    pid = hostile.pid(name)
    pids_max = cgroup_file(pid, "pids", "pids.max")
    assert pids_max is not None and pids_max.read_text().strip() == "64", "no pids limit: no bomb"
    current = pids_max.with_name("pids.current")
    hostile.go(name)
    fork_s = 0.0
    samples = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            samples.append(int(current.read_text()))
        fork_s = max(fork_s, host_can_fork())
        time.sleep(0.02)
    peak = max(samples)
    events = pids_max.with_name("pids.events")
    refusals = int(events.read_text().split()[1]) if events.exists() else None
    assert peak == 64, f"the bomb peaked at {peak} processes"
    assert samples.count(64) > len(samples) // 2, f"the bomb did not hold: {samples}"
    assert refusals is None or refusals > 1000, f"the pids limit refused {refusals} forks"
    assert fork_s < 1.0, f"the host took {fork_s:.2f} s to start a process"
    body = wait_for(hostile.client, "bomb", failed, 30)
    blue = slots(body)["blue"]
    assert (blue["state"], blue["reason"]) == ("FAILED", "lifetime_exceeded"), body
    assert "maximum lifetime of 6 s" in blue["message"]
    assert hostile.engine.container_names({"io.dockyard.deployment": "bomb"}) == []
    hostile.delete("bomb")


def test_memory_hog_is_killed_and_its_slot_fails(hostile: Hostile) -> None:
    """memory 48 MiB (swap included): the hog is OOM-killed, the agent ends FAILED with the
    exit code in its message, and the host's memory is untouched."""
    hostile.require_limits()
    repo = agent(
        hostile.builder,
        "memhog",
        "httpd -p 8000 -h /www\n" + WAIT_FOR_GO + "x=$(head -c 1000000000 /dev/zero | tr '\\0' a)\n"
        "echo survived\n",
    )
    body = hostile.deploy("hog", repo, resources={"memory_mb": 48})
    assert slots(body)["blue"]["state"] == "PROMOTED", body
    name = hostile.container("hog")
    limit = cgroup_file(hostile.pid(name), "memory", "memory.limit_in_bytes") or cgroup_file(
        hostile.pid(name), "memory", "memory.max"
    )
    assert limit is not None and int(limit.read_text()) == 48 * MIB, "no memory limit: no hog"
    available = _mem_available()
    hostile.go(name)
    body = wait_for(hostile.client, "hog", failed, 30)
    blue = slots(body)["blue"]
    assert blue["state"] == "FAILED", body
    assert blue["reason"] in ("container_oom", "container_exited"), body
    if blue["reason"] == "container_exited":  # Podman 4.3 here does not report OOMKilled
        assert "code 137" in blue["message"] and "OOM" in blue["message"], blue
    assert _mem_available() > available - 200 * MIB
    hostile.delete("hog")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def test_disk_filler_is_held_by_the_tmpfs_cap(hostile: Hostile) -> None:
    """tmpfs 16 MiB: /tmp and /dev/shm fill up to 16 MiB and no more (ENOSPC), Podman's
    /dev up to its 64 MiB (all three in memory, counted against the memory limit), the root
    and the app are read-only, nothing reaches the host's disk; the agent keeps serving.
    Holds rootless too (mount options)."""
    repo = agent(
        hostile.builder,
        "diskfill",
        "for d in /tmp /dev/shm /dev; do\n"
        '  dd if=/dev/zero of=$d/fill bs=1M count=200 2>&1 | sed "s|^|fill $d: |"\n'
        '  echo "size $d: $(du -k $d/fill | cut -f1)"\n'
        "done\n"
        "(echo x > /fill-root) 2>&1 | sed 's|^|fill /: |'\n"
        "(echo x > /www/fill) 2>&1 | sed 's|^|fill /www: |'\n"
        "echo fill-done\n"
        "exec httpd -f -p 8000 -h /www\n",
    )
    body = hostile.deploy("fill", repo, resources={"tmpfs_mb": 16})
    assert slots(body)["blue"]["state"] == "PROMOTED", body
    name = hostile.container("fill")
    lines = hostile.client.get("/v1/repos/fill/logs?tail=100").json()["lines"]
    text = "\n".join(lines)
    assert "fill-done" in text, text
    for directory, cap_kib in (("/tmp", 16 * 1024), ("/dev/shm", 16 * 1024), ("/dev", 65536)):
        assert f"fill {directory}: dd: error writing" in text and "No space left" in text, text
        found = re.search(rf"size {re.escape(directory)}: (\d+)", text)
        assert found is not None, text
        kib = int(found.group(1))
        assert cap_kib - 1024 <= kib <= cap_kib, f"{directory} took {kib} KiB"
    assert "fill /: " in text and "Read-only file system" in text, text
    assert "fill /www: " in text
    size_rw = hostile.engine.cli("inspect", "--size", "--format", "{{.SizeRw}}", name).stdout
    assert int(size_rw) < MIB, f"the container wrote {size_rw} bytes to the host's disk"
    port = slots(body)["blue"]["host_port"]
    assert get(port, "/health").strip() == "ok"
    hostile.delete("fill")


def test_log_flood_is_capped(hostile: Hostile) -> None:
    """An agent writing to stdout as fast as it can: its log file on the host never grows
    past ``log_max_bytes`` (10 MiB; conmon truncates it), and its logs stay readable."""
    repo = agent(
        hostile.builder,
        "logflood",
        "httpd -p 8000 -h /www\nexec yes 'flood flood flood flood flood flood flood flood'\n",
    )
    body = hostile.deploy("flood", repo)
    assert slots(body)["blue"]["state"] == "PROMOTED", body
    name = hostile.container("flood")
    path = Path(
        hostile.engine.cli(
            "inspect", "--format", "{{.HostConfig.LogConfig.Path}}", name
        ).stdout.strip()
    )
    sizes = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            sizes.append(path.stat().st_size)
        time.sleep(0.02)
    cap = 10 * MIB
    assert sizes and max(sizes) <= cap + 64 * 1024, f"the log grew to {max(sizes)} bytes"
    assert any(b < a for a, b in itertools.pairwise(sizes)), (
        "the flood never reached the cap (no truncation seen)"
    )
    lines: list[str] = []
    deadline = time.monotonic() + 5
    while not lines and time.monotonic() < deadline:  # empty right after a truncation
        r = hostile.client.get("/v1/repos/flood/logs?tail=3")
        assert r.status_code == 200, r.text
        lines = r.json()["lines"]
    # Readable: whole lines of the flood come back (the newest may be a partial entry that
    # conmon split off mid-write).
    assert any("flood flood" in line for line in lines), lines
    hostile.delete("flood")


def test_build_that_needs_the_network_fails(hostile: Hostile) -> None:
    """A ``RUN`` step reaching for a service on the host's loopback (what a build sharing the
    host's network namespace would get) and for a remote host: the build has no network."""
    open_port = hostile.services["open"]
    remote = hostile.services["remote"] or "10.251.0.2:8080"
    host, port = remote.split(":")
    dockerfile = DOCKERFILE.replace(
        "COPY www /www\n",
        "COPY www /www\n"
        f"RUN (printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 127.0.0.1 {open_port} | grep host-open"
        f" && echo REACHED-HOST) || (printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}"
        " | grep remote-ok && echo REACHED-REMOTE) || (echo 'no network' && exit 7)\n",
    )
    repo = agent(
        hostile.builder, "netbuild", "exec httpd -f -p 8000 -h /www\n", dockerfile=dockerfile
    )
    body = hostile.deploy("netbuild", repo)
    blue = slots(body)["blue"]
    assert (blue["state"], blue["reason"]) == ("FAILED", "build_failed"), body
    log = hostile.client.get("/v1/repos/netbuild/logs?build=true").json()["lines"]
    text = "\n".join(log)
    assert "no network" in log and not {"REACHED-HOST", "REACHED-REMOTE"} & set(log), text
    assert "nc: can't connect to remote host (127.0.0.1): Connection refused" in log, text
    hostile.delete("netbuild")


def test_agent_reaches_its_gateway_and_nothing_else(hostile: Hostile) -> None:
    """Egress: the gateway (the operator's, on the host's loopback; rootless, on its primary
    address) answers through the URL
    the agent gets in OPENAI_BASE_URL; the host's services (on any address, any port), a
    remote host, another agent and a container without the gateway get nothing."""
    hostile.require_egress()
    services = hostile.services
    repo = agent(hostile.builder, "netagent", "exec httpd -f -p 8000 -h /www\n")
    body = hostile.deploy("net", repo)
    peer_body = hostile.deploy("peer", repo)
    port = slots(body)["blue"]["host_port"]
    peer_port = slots(peer_body)["blue"]["host_port"]

    def attempt(target: str) -> dict[str, str]:
        text = get(port, f"/cgi-bin/try?{target}", timeout=20)
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    gateway_url = attempt("127.0.0.1:1")["gateway"]
    match = re.fullmatch(r"http://(\d+\.\d+\.\d+\.\d+):(\d+)/v1", gateway_url)
    assert match, f"OPENAI_BASE_URL={gateway_url!r}"
    bridge, gw_port = match.group(1), int(match.group(2))
    assert gw_port == services["primary_gateway" if hostile.engine.rootless else "gateway"]
    assert attempt(f"{bridge}:{gw_port}")["result"] == "gateway-ok"

    peer = hostile.container("peer")
    peer_ip = hostile.engine.cli(
        "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", peer
    ).stdout.strip()
    forbidden = {
        "host service on all addresses": f"{bridge}:{services['open']}",
        "host service on loopback": f"{bridge}:{services['loopback']}",
        "another agent's published port": f"{bridge}:{peer_port}",
        "another agent": f"{peer_ip}:8000",
        "host's primary address": f"{_primary_ip()}:{services['open']}",
    }
    if services["remote"]:
        forbidden["a remote host"] = services["remote"]
    for what, target in forbidden.items():
        result = attempt(target)["result"]
        assert "-ok" not in result and "host-" not in result, f"{what} ({target}): {result}"
        assert re.search(r"No route to host|timed out|refused|unreachable", result), result
    assert get(peer_port, "/health").strip() == "ok"  # answers from the host still work

    # A container with egress "none" (no gateway configured) does not get the gateway.
    import asyncio

    from dockyard.core.runtime import ContainerSpec

    image = hostile.engine.cli("inspect", "--format", "{{.ImageName}}", peer).stdout.strip()

    async def lonely() -> str:
        runtime = hostile.engine.make_runtime()
        await runtime.open()
        try:
            info = await runtime.run(
                ContainerSpec(
                    name=f"dyhostile-{uuid.uuid4().hex[:8]}",
                    image=image,
                    container_port=8000,
                    command=["httpd", "-f", "-p", "8000", "-h", "/www"],
                    labels={"io.dockyard.test": "hostile"},
                )
            )
            try:
                assert info.host_port
                out = ""
                for _ in range(50):
                    with contextlib.suppress(OSError):
                        cgi = f"/cgi-bin/try?{bridge}:{gw_port}"
                        out = await asyncio.to_thread(get, info.host_port, cgi, 20)
                        break
                    await asyncio.sleep(0.1)
                return out
            finally:
                await runtime.remove(info.id)
        finally:
            await runtime.close()

    seen = dict(line.split("=", 1) for line in asyncio.run(lonely()).splitlines() if "=" in line)
    assert seen["gateway"] == "" and "gateway-ok" not in seen["result"], seen
    hostile.delete("net")
    hostile.delete("peer")


def _primary_ip() -> str:
    """This host's source address towards the outside (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return str(s.getsockname()[0])


def test_health_check_that_never_passes_fails_at_its_deadline(hostile: Hostile) -> None:
    """No /health: FAILED (``health_check_failed``) once its 3 s deadline passes, not
    before and not much after; the container is removed and its port freed."""
    repo = agent(hostile.builder, "nohealth", "exec httpd -f -p 8000 -h /www\n", health=False)
    hostile.deploy("sick", repo, wait=False, health={**HEALTH, "deadline_s": 3})
    body = wait_for(hostile.client, "sick", lambda b: slots(b)["blue"]["state"] == "STAGING", 60)
    port = slots(body)["blue"]["host_port"]
    staged = time.monotonic()
    body = wait_for(hostile.client, "sick", failed, 30)
    took = time.monotonic() - staged
    blue = slots(body)["blue"]
    assert (blue["state"], blue["reason"]) == ("FAILED", "health_check_failed"), body
    assert "not healthy within 3 s" in blue["message"]
    assert 2.5 <= took <= 12, f"failed {took:.1f} s after staging"
    assert port not in leases(hostile.client)
    assert refused(port), f"port {port} still answers"
    assert hostile.engine.container_names({"io.dockyard.deployment": "sick"}) == []
    hostile.delete("sick")


def test_hardening_holds_and_the_host_says_what_it_cannot_enforce(hostile: Hostile) -> None:
    """Nothing in a request turns hardening off; limits above the operator's caps are
    refused; the container runs hardened; a host that cannot enforce a limit says so in
    the deployment's events (``limits_not_enforced``)."""
    client = hostile.client
    repo = agent(hostile.builder, "hardened", "exec httpd -f -p 8000 -h /www\n")
    for extra in (
        {"privileged": True},
        {"cap_add": ["NET_ADMIN"]},
        {"read_only": False},
        {"network": "host"},
        {"mounts": [["/", "/host"]]},
        {"user": "0"},
        {"security_opt": ["seccomp=unconfined"]},
        {"egress": "any"},
    ):
        body = {"id": "bad", "repo": hostile.url(repo), **extra}
        r = client.post("/v1/repos", json=body)
        assert r.status_code == 400, (extra, r.text)
    r = client.post("/v1/repos", json={"id": "big", "repo": hostile.url(repo),
                                       "resources": {"memory_mb": 4096}})  # fmt: skip
    assert r.status_code == 422
    assert "resources.memory_mb: 4096 exceeds the operator's cap of 2048" in r.json()["message"]
    r = client.post(
        "/v1/repos", json={"id": "old", "repo": hostile.url(repo), "max_lifetime_s": 601}
    )
    assert r.status_code == 422 and "max_lifetime_s: 601 exceeds" in r.json()["message"]

    body = hostile.deploy("hard", repo)
    assert slots(body)["blue"]["state"] == "PROMOTED", body
    data = hostile.engine.cli_json("inspect", hostile.container("hard"))[0]
    hc = data["HostConfig"]
    assert "no-new-privileges" in hc["SecurityOpt"] and hc["ReadonlyRootfs"] is True
    assert hc["Privileged"] is False and not hc["CapAdd"]
    bindings = [b for v in data["NetworkSettings"]["Ports"].values() for b in v or []]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    assert set(data["NetworkSettings"]["Networks"]) <= {
        n for n in data["NetworkSettings"]["Networks"] if n.startswith("dockyard-agents")
    }
    kinds = {e["kind"]: e for e in hostile.events("hard")}
    runtime = hostile.health["runtime"]
    if hostile.health["limits_enforced"] and runtime["egress_enforced"]:
        assert "limits_not_enforced" not in kinds
        assert hc["PidsLimit"] == 256 and hc["Memory"] == 512 * MIB
    else:
        event = kinds["limits_not_enforced"]
        assert event["message"] and event["data"] == {
            "resources": hostile.health["limits_enforced"],
            "network": runtime["egress_enforced"],
        }
        assert hostile.health["limits_note"] in event["message"]
    hostile.delete("hard")


def test_nothing_is_left_on_the_engine(hostile: Hostile) -> None:
    """After every hostile deployment was deleted: no container, no lease."""
    assert hostile.left_behind() == []
    assert leases(hostile.client) == {}
    assert json.loads(json.dumps(hostile.health))["status"] == "ok"
