"""Docker-specific checks of :mod:`dockyard.backends.docker`, beyond the shared contract.

The contract suite reads hardening back through ``runtime.inspect()``; here it is read from
the daemon's own API (not through aiodocker) and from the host: the container processes'
``/proc`` status and limits, the cgroup files, the listening sockets and the log files. The
daemon and the test image come from ``tests/contract/conftest.py`` (a private dockerd).
Tests of pure functions (Dockerfile reading, ``.dockerignore``, parsing) need no daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.backends import docker as backend
from dockyard.backends.docker import (
    ROOTLESS_V1_NOTE,
    DockerRuntime,
    external_images,
    is_ignored,
    limits_status,
    parse_hardening,
    read_dockerignore,
)
from dockyard.core.config import Settings
from dockyard.core.errors import (
    BuildFailed,
    BuildTimeout,
    ConfigError,
    RuntimeOperationError,
    RuntimeUnavailable,
)
from dockyard.core.plugins import Registrar
from dockyard.core.runtime import BuildRequest, Limits, Runtime
from tests import hostprobe
from tests.conftest import ROOT, free_port
from tests.contract import conftest as contract
from tests.contract.conftest import DockerEngine, TestImage, make_context
from tests.serve import wait_for_healthz

MIB = 1024 * 1024

# The contract suite's private dockerd, runtime and test image, used here by name.
engine = contract.engine_fixture(contract.DOCKER_RUNTIMES)
token = contract.token
runtime = contract.runtime
test_image = contract.test_image
make_spec = contract.make_spec


@pytest.fixture(scope="module", autouse=True)
def _prune_agent_networks() -> Iterator[None]:
    """The agent networks the runtime made (and kept) go after this module, if the session's
    dockerd was started: their bridges would otherwise outlive the private dockerd."""
    yield
    started = contract.ENGINES._engines.get("docker")
    if isinstance(started, DockerEngine) and started.daemon is not None:
        filters = {"label": ["io.dockyard.network"]}
        with contextlib.suppress(Exception):
            _api(started).request("POST", "/networks/prune", params={"filters": filters})


def _api(engine: DockerEngine) -> Any:
    assert engine.daemon is not None
    return engine.daemon.api


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _all_images(engine: DockerEngine) -> set[str]:
    return {str(i["Id"]) for i in _api(engine).json("GET", "/images/json", params={"all": "1"})}


# ------------------------------------------------------------- real daemon, its own view
async def test_daemon_view_confirms_hardening(
    runtime: Runtime, engine: DockerEngine, make_spec: Any
) -> None:
    limits = Limits(
        memory_mb=80, cpus=0.25, pids=48, nofile=300, nproc=200, tmpfs_mb=8, log_max_files=2
    )
    spec = make_spec("daemon", limits=limits)
    started = await runtime.run(spec)
    if hasattr(started, "started_at"):  # the contract's newer field: the latest start
        assert started.started_at is not None and abs(time.time() - started.started_at) < 60
    info = await runtime.info()
    assert info.limits_enforced and not info.rootless  # a rootful daemon on this host

    data = _api(engine).json("GET", f"/containers/{spec.name}/json")
    hc = data["HostConfig"]
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    assert hc["SecurityOpt"] == ["no-new-privileges"]
    assert hc["ReadonlyRootfs"] is True and hc["Privileged"] is False
    assert hc["Init"] is True
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in hc["Ulimits"]} == {
        "nofile": (300, 300),
        "nproc": (200, 200),
    }
    assert list(hc["Tmpfs"]) == ["/tmp"] and "size=8m" in hc["Tmpfs"]["/tmp"]
    assert hc["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert hc["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}}
    assert hc["Memory"] == 80 * MIB and hc["MemorySwap"] == 80 * MIB
    assert hc["NanoCpus"] == 250_000_000 and hc["PidsLimit"] == 48
    assert hc["NetworkMode"] == backend.AGENT_NETWORK  # the agent network, egress "none"
    assert hc["Sysctls"] == {
        "net.ipv6.conf.all.disable_ipv6": "1",
        "net.ipv6.conf.default.disable_ipv6": "1",
    }
    assert data["Config"]["Labels"]["io.dockyard.managed"] == "true"
    assert not data["Mounts"]  # no host mounts unless asked, never the engine socket

    # Every process of the container, as the host's /proc sees it.
    pids = _descendants(int(data["State"]["Pid"]))
    # IPv6 is off in the container's network namespace: no IPv6 address, not even ::1.
    assert Path(f"/proc/{pids[0]}/net/if_inet6").read_text() == ""
    assert len(pids) >= 2  # the init and the app
    assert "docker-init" in Path(f"/proc/{pids[0]}/cmdline").read_bytes().decode()
    hostprobe.assert_unprivileged(pids, nofile=300, nproc=200)
    if info.cgroup_version == "v1":  # the kernel's own view
        hostprobe.assert_cgroup_v1_limits(
            pids[0], memory_bytes=80 * MIB, pids=48, cfs_quota_us=25000
        )


async def test_port_listens_on_loopback_only(
    runtime: Runtime, engine: DockerEngine, make_spec: Any
) -> None:
    port = free_port()
    spec = make_spec("listen", host_port=port)
    await runtime.run(spec)
    ports = _api(engine).json("GET", f"/containers/{spec.name}/json")["NetworkSettings"]["Ports"]
    assert ports["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
    listeners = hostprobe.listeners(port)
    assert listeners, f"nothing listens on port {port}"
    assert set(listeners) == {"127.0.0.1"}, listeners


async def test_logs_rotate_and_keep_max_files(
    runtime: Runtime, engine: DockerEngine, make_spec: Any
) -> None:
    """json-file with max-size and max-file: unlike Podman 4.3, rotated copies are kept,
    and no file exceeds the cap."""
    cap = 16 * 1024
    script = (
        "i=0; while [ $i -lt 3000 ]; do echo log-line-$i-padding-padding-padding; i=$((i+1)); "
        "done; echo last-line; exec httpd -f -p 8080 -h /www"
    )
    limits = Limits(log_max_bytes=cap, log_max_files=2)
    spec = make_spec("logcap", limits=limits, command=["sh", "-c", script])
    info = await runtime.run(spec)
    assert info.hardening.log_max_size == "16k"
    path = Path(_api(engine).json("GET", f"/containers/{spec.name}/json")["LogPath"])
    for _ in range(50):
        lines = await runtime.logs(spec.name, tail=1)
        if lines == ["last-line"]:
            break
        await asyncio.sleep(0.1)
    files = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))
    assert files == [path.name, f"{path.name}.1"], files
    for name in files:
        assert (path.parent / name).stat().st_size <= cap + 1024  # one line past the cap
    assert await runtime.logs(spec.name, tail=1) == ["last-line"]


# ----------------------------------------------------------- network policy (agent networks)
def _get(port: int, path: str, attempts: int = 50) -> str:
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"127.0.0.1:{port}{path} did not answer")


async def test_agent_networks_gateway_env_and_published_port(
    runtime: Runtime, engine: DockerEngine, make_spec: Any
) -> None:
    """Egress "gateway": the container joins the gateway's kept bridge (its own interface
    ``dyad<daemon>g<hash>``, no masquerade, bindings on 127.0.0.1, not internal), gets the
    gateway at the bridge address in OPENAI_BASE_URL (over the spec's env), the firewall
    grants it, and its port published on 127.0.0.1 answers (docker-proxy)."""
    gw_port = free_port()
    spec = make_spec(
        "gw",
        egress="gateway",
        gateway=f"http://127.0.0.1:{gw_port}/v1",
        env={"OPENAI_BASE_URL": "http://attacker.example/v1", "KEEP": "me"},
    )
    digest = hashlib.sha256(f"127.0.0.1:{gw_port}".encode()).hexdigest()[:8]
    info = _api(engine).json("GET", "/info")
    daemon_id = f"{info['ID']}:{info['DockerRootDir']}"
    name, iface = f"{backend.AGENT_NETWORK}-gw-{digest}", backend.agent_iface(daemon_id, digest)
    assert len(iface) <= 15 and iface.startswith("dyad") and not iface.startswith("dya0")
    try:
        started = await runtime.run(spec)
        assert started.host_port and "ok" in _get(started.host_port, "/health")
        network = _api(engine).json("GET", f"/networks/{name}")
        assert network["Internal"] is False and network["EnableIPv6"] is False
        assert network["Options"] == {
            "com.docker.network.bridge.name": iface,
            "com.docker.network.bridge.enable_ip_masquerade": "false",
            "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
        }
        assert network["Labels"] == {
            "io.dockyard.managed": "true",
            "io.dockyard.network": "agents",
            "io.dockyard.gateway": f"127.0.0.1:{gw_port}",
        }
        bridge_ip = network["IPAM"]["Config"][0]["Gateway"]
        data = _api(engine).json("GET", f"/containers/{spec.name}/json")
        assert data["HostConfig"]["NetworkMode"] == name
        env = data["Config"]["Env"]
        assert f"OPENAI_BASE_URL=http://{bridge_ip}:{gw_port}/v1" in env and "KEEP=me" in env
        assert "OPENAI_BASE_URL=http://attacker.example/v1" not in env
        assert Path(f"/proc/sys/net/ipv4/conf/{iface}/route_localnet").read_text().strip() == "1"
        grants = runtime._firewall.elements()  # type: ignore[attr-defined]
        allowed = [json.dumps(e) for e in grants.get("gateway_allow", [])]
        assert any(iface in e and "127.0.0.1" in e and str(gw_port) in e for e in allowed), grants
        assert any(
            network["IPAM"]["Config"][0]["Subnet"].split("/")[0] in json.dumps(e)
            for e in grants.get("agent_subnets", [])
        ), grants
        assert (await runtime.info()).egress_enforced
    finally:
        await runtime.remove(spec.name)
        _api(engine).request("DELETE", f"/networks/{name}")


async def test_named_network_is_refused(
    runtime: Runtime, engine: DockerEngine, make_spec: Any
) -> None:
    spec = make_spec("named", network="bridge")
    with pytest.raises(RuntimeOperationError, match="named network is not supported"):
        await runtime.run(spec)
    assert not _api(engine).containers({"io.dockyard.test": spec.labels["io.dockyard.test"]})


async def test_no_firewall_no_container(engine: DockerEngine, make_spec: Any) -> None:
    """Without a working ``nft`` the runtime says the policy does not hold and starts
    nothing (``network_policy_failed``)."""
    rt = DockerRuntime(socket=engine.url, nft_path="/nonexistent/nft")
    await rt.open()
    try:
        info = await rt.info()
        assert info.egress_enforced is False and "not found" in info.egress_note
        spec = make_spec("nofw")
        with pytest.raises(RuntimeOperationError) as caught:
            await rt.run(spec)
        assert caught.value.reason == "network_policy_failed", caught.value.message
        assert await rt.inspect(spec.name) is None
    finally:
        await rt.close()


# ------------------------------------------------------------------------------ builds
async def test_missing_base_image_is_refused_before_building(
    runtime: Runtime, engine: DockerEngine, tmp_path: Path
) -> None:
    """The legacy builder would pull it; the runtime refuses first, and nothing runs."""
    before = _all_images(engine)
    context = make_context(tmp_path / "ctx", "FROM localhost/dyc-nowhere:1\nRUN echo never\n")
    with pytest.raises(BuildFailed, match="never pulls images") as caught:
        await runtime.build(BuildRequest(context=str(context), tag="localhost/dyc-pull:1"))
    assert caught.value.reason == "build_failed"
    assert _all_images(engine) == before
    # Through a global ARG, a build argument, or COPY --from: the same.
    dockerfile = "ARG BASE=localhost/dyc-nowhere:2\nFROM $BASE\n"
    context = make_context(tmp_path / "arg", dockerfile)
    with pytest.raises(BuildFailed, match="dyc-elsewhere"):
        await runtime.build(
            BuildRequest(
                context=str(context),
                tag="localhost/dyc-pull:2",
                build_args={"BASE": "localhost/dyc-elsewhere:1"},
            )
        )
    context = make_context(tmp_path / "from", "FROM scratch\nCOPY --from=busybox:1 /a /a\n")
    with pytest.raises(BuildFailed, match="busybox:1"):
        await runtime.build(BuildRequest(context=str(context), tag="localhost/dyc-pull:3"))


async def test_multi_stage_build_with_local_images(
    runtime: Runtime, test_image: TestImage, tmp_path: Path
) -> None:
    dockerfile = (
        f"ARG BASE={test_image.tag}\n"
        "FROM $BASE AS first\nRUN echo staged > /staged.txt\n"
        "FROM scratch\nCOPY --from=first /bin/busybox /bin/busybox\n"
        "COPY --from=0 /staged.txt /staged.txt\n"
        f"COPY --from={test_image.tag} /www/health /health\n"
    )
    context = make_context(tmp_path / "ctx", dockerfile)
    tag = f"localhost/dyc-multi-{uuid.uuid4().hex[:8]}:1"
    try:
        built = await runtime.build(BuildRequest(context=str(context), tag=tag))
        assert await runtime.image_exists(tag)
        assert built.id
    finally:
        await runtime.remove_image(tag, force=True)


async def test_failed_build_leaves_no_layers(
    runtime: Runtime, engine: DockerEngine, test_image: TestImage, tmp_path: Path
) -> None:
    before = _all_images(engine)
    dockerfile = (
        f"FROM {test_image.tag}\nRUN echo one > /one\nRUN echo two > /two\n"
        "RUN echo about-to-fail && exit 3\n"
    )
    context = make_context(tmp_path / "ctx", dockerfile)
    tag = f"localhost/dyc-fail-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(BuildFailed) as caught:
        await runtime.build(BuildRequest(context=str(context), tag=tag))
    assert "returned a non-zero code: 3" in caught.value.message
    assert _all_images(engine) == before, "the layers of the failed build are gone"
    assert engine.build_containers("") == []


@pytest.mark.slow
async def test_build_timeout_cancels_the_running_step(
    runtime: Runtime, engine: DockerEngine, test_image: TestImage, tmp_path: Path
) -> None:
    """While the step runs its container is visible (so the contract suite's leftover check
    would see one); the timeout ends it and removes its layers."""
    before = _all_images(engine)
    dockerfile = f"FROM {test_image.tag}\nRUN echo first > /first\nRUN echo hanging && sleep 3600\n"
    context = make_context(tmp_path / "ctx", dockerfile)
    tag = f"localhost/dyc-hang-{uuid.uuid4().hex[:8]}:1"
    task = asyncio.create_task(
        runtime.build(BuildRequest(context=str(context), tag=tag, timeout_s=4))
    )
    seen: list[str] = []
    deadline = time.monotonic() + 4
    while not any("sleep 3600" in line for line in seen) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        seen = engine.build_container_lines()
    assert len(seen) == 1 and "sleep 3600" in seen[0], seen
    with pytest.raises(BuildTimeout) as caught:
        await task
    assert caught.value.detail["stopped"] is True
    assert caught.value.detail["container"] in seen[0]
    assert engine.build_container_lines() == []
    assert _all_images(engine) == before
    assert not await runtime.image_exists(tag)


async def test_build_with_network_joins_the_configured_network(
    runtime: Runtime, test_image: TestImage, tmp_path: Path
) -> None:
    dockerfile = (
        f"FROM {test_image.tag}\nRUN sed -n 's/^ *\\([^:]*\\):.*/iface=\\1/p' /proc/net/dev\n"
    )
    context = make_context(tmp_path / "ctx", dockerfile)
    tag = f"localhost/dyc-net-{uuid.uuid4().hex[:8]}:1"
    try:
        built = await runtime.build(BuildRequest(context=str(context), tag=tag, network=True))
    finally:
        await runtime.remove_image(tag, force=True)
    interfaces = sorted(line.split("=", 1)[1] for line in built.log if line.startswith("iface="))
    assert interfaces == ["eth0", "lo"]


async def test_dockerignore_is_applied_to_the_context(
    runtime: Runtime, test_image: TestImage, tmp_path: Path
) -> None:
    context = make_context(
        tmp_path / "ctx",
        f"FROM {test_image.tag}\nCOPY . /ctx\nRUN find /ctx -type f | sort | sed 's/^/file=/'\n",
    )
    (context / "secret.env").write_text("TOKEN=1\n")
    (context / "logs").mkdir()
    (context / "logs" / "a.log").write_text("a\n")
    (context / "logs" / "keep.log").write_text("k\n")
    (context / ".dockerignore").write_text("*.env\nlogs\n!logs/keep.log\nDockerfile\nbusybox\n")
    tag = f"localhost/dyc-ignore-{uuid.uuid4().hex[:8]}:1"
    try:
        built = await runtime.build(BuildRequest(context=str(context), tag=tag))
    finally:
        await runtime.remove_image(tag, force=True)
    files = {line.removeprefix("file=/ctx/") for line in built.log if line.startswith("file=")}
    assert "secret.env" not in files and "logs/a.log" not in files and "busybox" not in files
    assert {"logs/keep.log", "www/health", ".dockerignore"} <= files


# ------------------------------------------------------------------ the API and the CLI
def test_healthz_reports_the_docker_daemon(engine: DockerEngine, tmp_path: Path) -> None:
    from litestar.testing import TestClient

    from dockyard.api.app import create_app
    from tests.conftest import TEST_SETTINGS

    settings = Settings(**{**TEST_SETTINGS, **engine.settings()}, data_dir=str(tmp_path))
    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/healthz").json()
    assert body["status"] == "ok", body
    runtime_info = body["runtime"]
    assert runtime_info["name"] == "docker"
    assert runtime_info["rootless"] is False
    assert runtime_info["socket"] == engine.url
    assert runtime_info["extra"]["network"] == engine.daemon.network  # type: ignore[union-attr]
    assert body["limits_enforced"] is True and body["limits_note"] == ""
    assert runtime_info["egress_enforced"] is True, runtime_info["egress_note"]


def test_serve_with_runtime_docker(engine: DockerEngine, tmp_path: Path) -> None:
    """``dockyard serve --runtime docker`` finds the daemon through DOCKER_HOST."""
    port = free_port()
    env = {**os.environ, "DOCKER_HOST": engine.url}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "dockyard.api.cli", "serve", "--runtime", "docker"),
            *("--port", str(port), "--data-dir", str(tmp_path / "data")),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = wait_for_healthz(proc, port)
        assert body["runtime"]["name"] == "docker"
        assert body["runtime"]["socket"] == engine.url
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


# --------------------------------------------------------------- connection, no daemon
async def test_configured_socket_must_answer(tmp_path: Path) -> None:
    rt = DockerRuntime(socket=str(tmp_path / "nothing.sock"))
    with pytest.raises(RuntimeUnavailable, match="configured socket"):
        await rt.open()
    with pytest.raises(RuntimeUnavailable, match="not open"):
        await rt.info()


async def test_no_daemon_anywhere_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dead = tmp_path / "dead.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(dead))
    server.close()  # a socket file nobody listens on
    monkeypatch.setattr(
        DockerRuntime, "_candidates", lambda self: [(f"unix://{dead}", "test"), ("unix://", "x")]
    )
    rt = DockerRuntime(connect_timeout_s=2)
    with pytest.raises(RuntimeUnavailable, match="systemctl start docker") as caught:
        await rt.open()
    assert str(dead) in caught.value.message
    await rt.close()  # closing what never opened is fine


def test_cli_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/absent.sock",
        "DOCKYARD_RUNTIME": "docker",
    }
    result = subprocess.run(
        [
            *(sys.executable, "-m", "dockyard.api.cli", "serve", "--port", str(free_port())),
            *("--data-dir", str(tmp_path / "data")),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dockyard: error: "), result.stderr
    assert "absent.sock" in errors[0] and "systemctl start docker" in errors[0]


def test_missing_extra_is_a_clear_error() -> None:
    """Without aiodocker dockyard still loads (the plugin registers ``docker``); choosing the
    runtime says which extra to install."""
    code = (
        "import sys; sys.modules['aiodocker'] = None\n"
        "from dockyard.core.config import Settings\n"
        "from dockyard.core.errors import RuntimeUnavailable\n"
        "from dockyard.core.plugins import build_plugin_manager\n"
        "pm = build_plugin_manager(load_entry_points=False)\n"
        "factory = pm.registries.runtimes.get('docker')\n"
        "pm.registries.runtimes.get('podman')\n"
        "try:\n"
        "    factory(Settings())\n"
        "except RuntimeUnavailable as exc:\n"
        "    print(exc.message)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'dockyard[docker]'" in result.stdout


def test_registered_under_docker_and_built_from_settings() -> None:
    register: Registrar[Any] = Registrar("runtime")
    backend.dockyard_register_runtimes(register=register)
    factory = register.get("docker")
    rt = factory(Settings(plugins={"docker": {"socket": "/srv/docker.sock", "network": "agents"}}))
    assert isinstance(rt, DockerRuntime) and rt.name == "docker"
    assert rt._socket == "unix:///srv/docker.sock" and rt._network == "agents"
    with pytest.raises(ConfigError, match="unknown option"):
        factory(Settings(plugins={"docker": {"sockett": "/x"}}))
    with pytest.raises(ConfigError, match="wrong type"):
        factory(Settings(plugins={"docker": {"build_log_lines": "many"}}))
    with pytest.raises(ConfigError, match="wrong type"):
        factory(Settings(plugins={"docker": {"build_nofile": True}}))


def test_the_private_aiodocker_request_path_still_exists() -> None:
    """aiodocker's images.build() has no memory/CPU/network/ulimit parameters, so the build
    goes through ``Docker._query``; fail here, not in a build, if that ever changes."""
    import aiodocker

    params = inspect.signature(aiodocker.Docker._query).parameters
    assert {"path", "method", "params", "data", "headers", "timeout"} <= set(params)
    stop = inspect.signature(aiodocker.containers.DockerContainer.stop).parameters
    assert {"t", "timeout"} <= set(stop)


# ---------------------------------------------------------------------- pure functions
def test_agent_interfaces_are_short_per_daemon_and_not_podmans() -> None:
    none, gw = backend.agent_iface("daemon-a"), backend.agent_iface("daemon-a", "0123abcd")
    assert none.startswith("dyad") and gw.startswith(none + "g") and len(gw) <= 15
    assert backend.agent_iface("daemon-b") != none  # two dockerds, two bridges
    assert not none.startswith("dya0") and not gw.startswith("dya0")  # Podman's


async def test_policy_refusals_need_no_daemon() -> None:
    """A daemon on another host, and rootless Docker with a gateway on the host's
    loopback: ``network_policy_failed`` before anything is created."""
    from dockyard.core.runtime import ContainerSpec

    rt = DockerRuntime()
    rt._url, rt._info = "tcp://10.0.0.5:2375", {}
    spec = ContainerSpec(name="x", image="i", container_port=80)
    with pytest.raises(RuntimeOperationError) as caught:
        await rt._agent_network(spec)
    assert caught.value.reason == "network_policy_failed" and "not on this host" in str(
        caught.value
    )
    rt._url = "unix:///run/user/1000/docker.sock"
    rt._info = {"SecurityOptions": ["name=rootless"]}
    gateway = ContainerSpec(
        name="x", image="i", container_port=80, egress="gateway", gateway="127.0.0.1:9999"
    )
    with pytest.raises(RuntimeOperationError) as caught:
        await rt._agent_network(gateway)
    assert caught.value.reason == "network_policy_failed" and "loopback" in str(caught.value)
    with pytest.raises(RuntimeOperationError, match="named network"):
        await rt._agent_network(ContainerSpec(name="x", image="i", container_port=80, network="h"))


def test_limits_status() -> None:
    full = {"MemoryLimit": True, "SwapLimit": True, "CpuCfsQuota": True, "PidsLimit": True}
    assert limits_status({**full, "CgroupVersion": "1"}) == (True, "")
    assert limits_status({**full, "CgroupVersion": "2"}) == (True, "")
    rootless = {**full, "SecurityOptions": ["name=seccomp,profile=default", "name=rootless"]}
    assert limits_status({**rootless, "CgroupVersion": "1"}) == (False, ROOTLESS_V1_NOTE)
    assert limits_status({**rootless, "CgroupVersion": "2"}) == (True, "")
    enforced, note = limits_status({**full, "SwapLimit": False})
    assert not enforced and "swap" in note and "swapaccount=1" in note
    enforced, note = limits_status({**full, "PidsLimit": False, "MemoryLimit": False})
    assert not enforced and "memory, pids" in note
    assert backend.cgroup_version({}) == "v1"


def test_parse_hardening_docker_shape() -> None:
    attrs: dict[str, Any] = {
        "HostConfig": {
            "CapAdd": None,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "ReadonlyRootfs": True,
            "PidsLimit": 64,
            "Memory": 1024,
            "MemorySwap": 1024,
            "NanoCpus": 500_000_000,
            "Ulimits": [{"Name": "nofile", "Soft": 10, "Hard": 20}],
            "Tmpfs": {"/tmp": "rw,size=64m"},
            "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        },
        "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "4000"}]}},
    }
    h = parse_hardening(attrs)
    assert h.cap_drop_all and h.no_new_privileges and h.read_only
    assert (h.pids_limit, h.memory_bytes, h.memory_swap_bytes, h.nano_cpus) == (
        64,
        1024,
        1024,
        500_000_000,
    )
    assert h.ulimits == {"nofile": (10, 20)}
    assert h.published == [("127.0.0.1", 4000, 8080)]
    assert h.log_max_size == "10m"
    attrs["NetworkSettings"] = {"Ports": {}}  # stopped: no actual binding
    attrs["HostConfig"]["CapAdd"] = ["NET_ADMIN"]
    h = parse_hardening(attrs, limits_enforced=False)
    assert not h.cap_drop_all and h.published == []
    assert (h.pids_limit, h.memory_bytes, h.memory_swap_bytes, h.nano_cpus) == (None,) * 4


def test_log_sizes_as_docker_spells_them() -> None:
    assert backend._size(10 * MIB) == "10m"
    assert backend._size(16 * 1024) == "16k"
    assert backend._size(1000) == "1000"


def test_external_images() -> None:
    assert external_images("FROM scratch\nCOPY a /a\n") == []
    assert external_images("FROM python:3.11-slim\nRUN true\n") == ["python:3.11-slim"]
    multi = (
        "# escape=`\n"
        "ARG BASE=localhost/base:1\nARG TOOLS\n"
        "FROM --platform=linux/amd64 ${BASE} AS Build\n"
        "RUN echo `\n  continued\n"
        "FROM build AS second\n"
        "COPY --from=Build /a /a\nCOPY --from=0 /b /b\nCOPY --from=localhost/tools:2 /c /c\n"
        "FROM ${TOOLS:-localhost/tools:2}\n"
        "ARG LATE=ignored\nFROM localhost/late:${LATE:-3}\n"
    )
    assert external_images(multi) == ["localhost/base:1", "localhost/tools:2", "localhost/late:3"]
    assert external_images(multi, {"BASE": "localhost/other:9", "TOOLS": "t:1"}) == [
        "localhost/other:9",
        "localhost/tools:2",
        "t:1",
        "localhost/late:3",
    ]
    for dockerfile in ("FROM $NOWHERE\n", "FROM\n", "ARG X\nFROM $X\n"):
        with pytest.raises(BuildFailed) as caught:
            external_images(dockerfile)
        assert caught.value.reason == "dockerfile_refused"


def test_dockerignore_patterns(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text(
        "# comment\n\n*.env\n/build\n**/node_modules\ndocs/*.md\n!docs/keep.md\nsub/**/x?.txt\n"
    )
    patterns = read_dockerignore(tmp_path)
    ignored = {
        "a.env": True,
        "sub/a.env": False,  # * does not cross directories
        "build": True,
        "build/out/bin": True,  # inside an ignored directory
        "node_modules/x.js": True,
        "deep/er/node_modules/y.js": True,
        "docs/a.md": True,
        "docs/keep.md": False,
        "docs/deep/a.md": False,
        "sub/x1.txt": True,
        "sub/a/b/x2.txt": True,
        "sub/a/b/x22.txt": False,
        "Dockerfile": False,
    }
    assert {path: is_ignored(path, patterns) for path in ignored} == ignored


def test_context_tar_applies_dockerignore_and_keeps_the_dockerfile(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("print(1)\n")
    (tmp_path / "secret.env").write_text("X=1\n")
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "link").symlink_to("app/main.py")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / ".dockerignore").write_text("*.env\nDockerfile\n.dockerignore\n")
    with backend.context_tar(tmp_path, "Dockerfile") as body:
        data = body.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"app", "app/main.py", "Dockerfile", ".dockerignore", "link"}
    assert members["link"].issym() and members["link"].linkname == "app/main.py"
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())


def test_build_progress_tracks_the_running_step_and_its_own_layers() -> None:
    seen: list[str] = []
    progress = backend._BuildProgress(on_log=seen.append, max_lines=100)
    stream = [
        {"stream": "Step 1/4 : FROM localhost/base:1"},
        {"stream": "\n"},
        {"stream": " ---> 1111111111aa\n"},  # the base image: never ours
        {"stream": "Step 2/4 : RUN echo a\n ---> Running in 2222222222bb\n"},
        {"stream": "a\n"},
        {"stream": "Removing intermediate container 2222222222bb\n ---> 3333333333cc\n"},
        {"stream": "Step 3/4 : COPY x /x\n ---> Using cache\n ---> 4444444444dd\n"},
        {"stream": "Step 4/4 : RUN sleep 1\n ---> Running in 5555555555ee\n"},
    ]
    for message in stream:
        progress.feed(message)
    assert progress.committed == ["3333333333cc"]  # not the base, not a cached layer
    assert progress.running == "5555555555ee"
    progress.feed({"error": "boom", "errorDetail": {"message": "boom"}})
    progress.flush()
    assert progress.error == "boom"
    assert seen[0] == "Step 1/4 : FROM localhost/base:1" and seen[-1] == "ERROR: boom"
    assert list(progress.lines) == seen


async def test_a_broken_build_stream_fails_the_build() -> None:
    class Content:
        async def iter_any(self) -> Any:
            yield b'{"stream":"ok\\n"}\r\n{"str'
            yield b'eam":"split\\n"}\r\nnot json\r\n'
            yield b"x" * (backend.MAX_STREAM_MESSAGE + 1)

    progress = backend._BuildProgress(on_log=None, max_lines=10)
    response: Any = type("Response", (), {"content": Content()})()
    with pytest.raises(BuildFailed, match="larger than 4 MiB"):
        async for message in backend.build_stream_messages(response):
            progress.feed(message)
    assert list(progress.lines) == ["ok", "split", "not json"]


def test_started_at_parses_docker_timestamps() -> None:
    assert backend.started_at("1970-01-01T00:01:40.123456789Z") == pytest.approx(100.123456)
    assert backend.started_at("1970-01-01T02:00:00+02:00") == 0.0
    assert backend.started_at("0001-01-01T00:00:00Z") is None  # never started
    assert backend.started_at("") is None and backend.started_at("yesterday") is None
