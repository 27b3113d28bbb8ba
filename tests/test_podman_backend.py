"""Podman-specific checks of :mod:`dockyard.backends.podman`, beyond the shared contract.

The contract suite reads hardening back through ``runtime.inspect()``; here it is read
from Podman's own CLI (``podman inspect``/``podman top``, run locally as the engine's user,
not through the API) and from the host: the container processes' ``/proc`` status and
limits, the cgroup files, the listening sockets and the log file. Engines and the test
image come from ``tests/contract/conftest.py`` (rootful and rootless).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dockyard.backends import podman as backend
from dockyard.backends.podman import (
    ROOTLESS_V1_NOTE,
    PodmanRuntime,
    limits_status,
    parse_hardening,
)
from dockyard.core.config import Settings
from dockyard.core.errors import ConfigError, RuntimeUnavailable
from dockyard.core.plugins import Registrar
from dockyard.core.runtime import Limits, Runtime
from tests import hostprobe
from tests.conftest import free_port
from tests.contract import conftest as contract
from tests.contract.conftest import Engine

MIB = 1024 * 1024

# The contract suite's Podman engines (rootful and rootless), runtime and test image, used
# here by name: every test below that takes ``engine`` or ``runtime`` runs once per engine.
engine = contract.engine_fixture(contract.PODMAN_RUNTIMES)
token = contract.token
runtime = contract.runtime
test_image = contract.test_image
make_spec = contract.make_spec


def _host_pids(engine: Engine, name: str) -> list[int]:
    """Host PIDs of every process in the container, from ``podman top``."""
    out = engine.cli("top", name, "hpid").stdout.split()
    return [int(p) for p in out[1:]]


# ---------------------------------------------------------------- real engines, CLI view
async def test_cli_inspect_confirms_hardening(
    runtime: Runtime, engine: Engine, make_spec: Any
) -> None:
    limits = Limits(memory_mb=80, cpus=0.25, pids=48, nofile=300, nproc=200, tmpfs_mb=8)
    spec = make_spec("cli", limits=limits)
    await runtime.run(spec)
    info = await runtime.info()

    data = engine.cli_json("inspect", spec.name)[0]
    hc = data["HostConfig"]
    assert hc["CapAdd"] == []
    assert set(hc["CapDrop"]) >= backend.DEFAULT_CAPABILITIES
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["ReadonlyRootfs"] is True
    assert hc["Init"] is True
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in hc["Ulimits"]}
    assert ulimits["RLIMIT_NOFILE"] == (300, 300)
    assert ulimits["RLIMIT_NPROC"] == (200, 200)
    assert list(hc["Tmpfs"]) == ["/tmp"] and "size=8m" in hc["Tmpfs"]["/tmp"]
    bindings = [b for port in hc["PortBindings"].values() for b in port]
    assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings)
    assert hc["LogConfig"]["Type"] == "k8s-file" and hc["LogConfig"]["Size"]
    assert data["Config"]["Labels"]["io.dockyard.managed"] == "true"

    # Every process of the container, as Podman's top and the host's /proc see it.
    top = engine.cli("top", spec.name, "capbnd", "capeff").stdout.splitlines()[1:]
    assert top and all(line.split() == ["none", "none"] for line in top)
    pids = _host_pids(engine, spec.name)
    assert pids
    hostprobe.assert_unprivileged(pids, nofile=300, nproc=200)

    if info.limits_enforced:
        assert hc["PidsLimit"] == 48
        assert hc["Memory"] == 80 * MIB and hc["MemorySwap"] == 80 * MIB
        assert hc["NanoCpus"] == 250_000_000 or (hc["CpuQuota"], hc["CpuPeriod"]) == (
            25_000,
            100_000,
        )
        if info.cgroup_version == "v1":  # the kernel's own view
            hostprobe.assert_cgroup_v1_limits(
                pids[0], memory_bytes=80 * MIB, pids=48, cfs_quota_us=25000
            )
    else:
        assert engine.rootless
        assert info.limits_note
        assert hc["Memory"] == 0 and hc["PidsLimit"] == 0, "limits must not even be requested"
    if engine.rootless and info.cgroup_version == "v1":
        assert info.limits_enforced is False
        assert info.limits_note == ROOTLESS_V1_NOTE


async def test_port_listens_on_loopback_only(
    runtime: Runtime, engine: Engine, make_spec: Any
) -> None:
    port = free_port()
    spec = make_spec("listen", host_port=port)
    await runtime.run(spec)
    ports = engine.cli_json("inspect", spec.name)[0]["NetworkSettings"]["Ports"]
    assert ports["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
    listeners = hostprobe.listeners(port)
    assert listeners, f"nothing listens on port {port}"
    assert set(listeners) == {"127.0.0.1"}, listeners


async def test_log_size_cap_holds(runtime: Runtime, engine: Engine, make_spec: Any) -> None:
    """k8s-file + size: the file never exceeds the cap (Podman 4.3 truncates it; no
    rotated copies are kept, so log_max_files has no effect)."""
    cap = 16 * 1024
    script = (
        "i=0; while [ $i -lt 3000 ]; do echo log-line-$i-padding-padding-padding; i=$((i+1)); "
        "done; echo last-line; exec httpd -f -p 8080 -h /www"
    )
    spec = make_spec("logcap", limits=Limits(log_max_bytes=cap), command=["sh", "-c", script])
    info = await runtime.run(spec)
    data = engine.cli_json("inspect", spec.name)[0]
    assert data["HostConfig"]["LogConfig"]["Size"] in ("16.38kB", "16.38KB")
    assert info.hardening.log_max_size
    path = Path(data["HostConfig"]["LogConfig"]["Path"])
    for _ in range(50):
        if "last-line" in path.read_text():
            break
        await asyncio.sleep(0.1)
    assert path.stat().st_size <= cap
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("ctr.log")) == [
        "ctr.log"
    ]
    lines = await runtime.logs(spec.name, tail=5)
    assert lines[-1] == "last-line"


# ------------------------------------------------------------------- socket discovery
@pytest.mark.podman
async def test_private_service_is_started_and_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("podman") is None or os.geteuid() != 0:
        contract.unavailable("a rootful private service needs podman and root")
    monkeypatch.setattr(PodmanRuntime, "_candidates", lambda self: [])
    rt = PodmanRuntime()
    await rt.open()
    try:
        assert rt.url is not None and rt.url.startswith("unix:///")
        sock = Path(rt.url.removeprefix("unix://"))
        assert sock.is_socket()
        service = rt._service
        assert service is not None and service.process is not None
        pid = service.process.pid
        info = await rt.info()
        assert info.extra["private_service"] is True
        assert info.socket == rt.url
    finally:
        await rt.close()
    assert not sock.exists() and not sock.parent.exists()
    assert not Path(f"/proc/{pid}").exists(), "the service was stopped and reaped"
    await rt.close()  # closing twice is fine


async def test_missing_podman_is_runtime_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PodmanRuntime, "_candidates", lambda self: [])
    rt = PodmanRuntime(podman_path="/nonexistent/podman")
    with pytest.raises(RuntimeUnavailable, match="Podman is not installed: apt-get install podman"):
        await rt.open()


async def test_configured_socket_must_answer(tmp_path: Path) -> None:
    rt = PodmanRuntime(socket=str(tmp_path / "nothing.sock"))
    with pytest.raises(RuntimeUnavailable, match="configured socket"):
        await rt.open()
    with pytest.raises(RuntimeUnavailable, match="not open"):
        await rt.info()


def test_socket_probe_rejects_dead_sockets(tmp_path: Path) -> None:
    """The discovery probe: a socket file nobody listens on, or none at all, does not answer."""
    sock = tmp_path / "dead.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.close()
    assert backend.socket_answers(f"unix://{sock}", timeout_s=1) is False
    assert backend.socket_answers(str(tmp_path / "absent.sock")) is False


# ---------------------------------------------------------------- registration, settings
def test_registered_under_podman_and_built_from_settings() -> None:
    register: Registrar[Any] = Registrar("runtime")
    backend.dockyard_register_runtimes(register=register)
    factory = register.get("podman")
    rt = factory(
        Settings(podman_socket="/srv/podman.sock", plugins={"podman": {"build_log_lines": 10}})
    )
    assert isinstance(rt, PodmanRuntime) and rt.name == "podman"
    assert rt._socket == "unix:///srv/podman.sock"
    assert rt.options.build_log_lines == 10
    from_option = factory(Settings(plugins={"podman": {"socket": "unix:///x.sock"}}))
    assert from_option._socket == "unix:///x.sock"
    with pytest.raises(ConfigError, match="unknown option"):
        factory(Settings(plugins={"podman": {"sockett": "/x"}}))
    with pytest.raises(ConfigError, match="wrong type"):
        factory(Settings(plugins={"podman": {"build_log_lines": "many"}}))


# ----------------------------------------------------------------------- pure parsing
def test_limits_status() -> None:
    def info(rootless: bool, cgroup: str, controllers: list[str] | None = None) -> Any:
        host = {"security": {"rootless": rootless}, "cgroupVersion": cgroup}
        if controllers is not None:
            host["cgroupControllers"] = controllers
        return {"host": host}

    assert limits_status(info(False, "v1")) == (True, "")
    assert limits_status(info(True, "v1")) == (False, ROOTLESS_V1_NOTE)
    assert "memory, CPU and pids limits do not hold" in ROOTLESS_V1_NOTE
    assert limits_status(info(True, "v2", ["cpu", "memory", "pids"])) == (True, "")
    enforced, note = limits_status(info(True, "v2", ["cpu"]))
    assert not enforced and "memory, pids" in note


def test_parse_hardening_docker_and_podman_shapes() -> None:
    attrs: dict[str, Any] = {
        "HostConfig": {
            "CapAdd": None,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges:true"],
            "ReadonlyRootfs": True,
            "PidsLimit": 64,
            "Memory": 1024,
            "MemorySwap": 1024,
            "NanoCpus": 0,
            "CpuQuota": 50_000,
            "CpuPeriod": 100_000,
            "Ulimits": [{"Name": "nofile", "Soft": 10, "Hard": 20}],
            "Tmpfs": {"/tmp": "size=64m"},
            "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "4000"}]},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}},
        },
        "NetworkSettings": {"Ports": {"8080/tcp": None}},
    }
    h = parse_hardening(attrs)
    assert h.cap_drop_all and h.no_new_privileges and h.read_only
    assert (h.pids_limit, h.memory_bytes, h.memory_swap_bytes) == (64, 1024, 1024)
    assert h.nano_cpus == 500_000_000
    assert h.ulimits == {"nofile": (10, 20)}
    assert h.published == []  # not running: NetworkSettings has no binding
    assert h.log_max_size == "10m"

    attrs["NetworkSettings"] = {}
    attrs["HostConfig"]["CapAdd"] = ["CAP_NET_ADMIN"]
    h = parse_hardening(attrs, limits_enforced=False)
    assert not h.cap_drop_all
    assert h.published == [("127.0.0.1", 4000, 8080)]
    assert (h.pids_limit, h.memory_bytes, h.memory_swap_bytes, h.nano_cpus) == (None,) * 4

    partial = {"HostConfig": {"CapDrop": ["CAP_CHOWN"], "SecurityOpt": []}}
    h = parse_hardening(partial)
    assert not h.cap_drop_all and not h.no_new_privileges and not h.read_only


def test_build_tag_is_validated() -> None:
    assert backend._split_ref("localhost/app:v1") == ("localhost/app", "v1")
    assert backend._split_ref("registry:5000/app") == ("registry:5000/app", "latest")
    with pytest.raises(backend.BuildFailed):
        backend._split_ref("app@sha256:abc")


def test_healthz_tells_whether_limits_are_enforced(engine: Engine, tmp_path: Path) -> None:
    """``/v1/healthz`` through the real API says what the engine reports: rootful on this
    host enforces limits; rootless on cgroup v1 does not, and says why."""
    from litestar.testing import TestClient

    from dockyard.api.app import create_app

    settings = Settings(data_dir=str(tmp_path), podman_socket=engine.url, monitor_interval_s=0)
    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/healthz").json()
    assert body["status"] == "ok"
    runtime_info = body["runtime"]
    assert runtime_info["rootless"] is engine.rootless
    cgroup_v1 = runtime_info["cgroup_version"] == "v1"
    if engine.rootless and cgroup_v1:
        assert body["limits_enforced"] is False
        assert "ignored" in body["limits_note"]
    else:
        assert body["limits_enforced"] is True
        assert body["limits_note"] == ""
    if body["limits_enforced"]:
        return
    # With require_limits, a host that cannot enforce them is refused at start, in one line.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dockyard.api.cli",
            "serve",
            "--podman-socket",
            engine.url,
            "--data-dir",
            str(tmp_path / "strict"),
            "--port",
            str(free_port()),
        ],
        env={**os.environ, "DOCKYARD_REQUIRE_LIMITS": "true"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "dockyard: error: require_limits is set" in result.stderr
