"""The network policy under rootless Podman (``backends/podman/rootless_net.py``), on a real
rootless engine run by the unprivileged test user (``tests/contract/conftest.py``).

Agents are probed from inside with busybox ``nc`` through ``podman exec`` (run as the
engine's user, not through the runtime under test). Every target is on this host or never
reached: the host's own non-loopback address (found by a UDP ``connect``, which sends
nothing), another agent's address, slirp4netns' host alias, and a TEST-NET address
(198.51.100.1) that the table rejects before any packet leaves the agent.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.backends.podman import PodmanRuntime
from dockyard.backends.podman.rootless_net import (
    ROOTLESS_EGRESS_NOTE,
    AgentNetns,
    AgentRules,
    agent_ruleset,
)
from dockyard.core.config import Settings
from dockyard.core.errors import EgressNotEnforceable, RuntimeOperationError
from dockyard.core.runtime import Runtime
from dockyard.core.services import Services
from tests.conftest import free_port
from tests.contract import conftest as contract
from tests.contract.conftest import PodmanEngine

engine = contract.engine_fixture(
    [p for p in contract.PODMAN_RUNTIMES if p.values[0] == "podman-rootless"]
)
token = contract.token
runtime = contract.runtime
test_image = contract.test_image
make_spec = contract.make_spec

REMOTE = "198.51.100.1"  # TEST-NET-2: rejected inside the agent, never sent


def test_agent_ruleset_rejects_all_but_replies_port_and_gateway() -> None:
    text = agent_ruleset(8080, ("192.0.2.7", 4000))
    assert "ip daddr 192.0.2.7 tcp dport 4000 accept" in text
    assert "input tcp dport 8080 accept" in text
    assert text.index("dport 4000 accept") < text.index("reject with icmpx")
    none = agent_ruleset(8080, None)
    assert "daddr" not in none and "output counter reject" in none


def _host_address() -> str:
    """The host's own address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((REMOTE, 9))
        except OSError as exc:
            pytest.skip(f"this host has no route to a non-loopback address: {exc}")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip(f"this host's only address is on loopback ({address})")
    return address


class Listener:
    """A TCP listener on the host that answers ``reply`` and counts its connections."""

    def __init__(self, host: str, reply: bytes) -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.reply = reply
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                conn.sendall(self.reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def host_listeners() -> Iterator[tuple[str, Listener, Listener]]:
    """The host's address, a gateway there and another service there."""
    host = _host_address()
    gateway, service = Listener(host, b"gateway-ok\n"), Listener(host, b"host-service\n")
    try:
        yield host, gateway, service
    finally:
        gateway.close()
        service.close()


def _connect(engine: PodmanEngine, name: str, host: str, port: int) -> tuple[int, str]:
    """``nc`` from inside container ``name``: exit code and output."""
    script = f"nc -w 3 {host} {port} </dev/null 2>&1"
    done = engine.cli("exec", name, "sh", "-c", script, check=False)
    return done.returncode, done.stdout + done.stderr


def _refused(result: tuple[int, str]) -> bool:
    """Rejected by the table, with its admin-prohibited ICMP (EHOSTUNREACH): not a reset
    from a closed port, not a timeout."""
    code, output = result
    return code != 0 and "No route to host" in output


def _host_addresses() -> list[str]:
    """Every IPv4 address of the host but loopback (its bridges' included)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    return [
        str(a["local"])
        for link in json.loads(out)
        for a in link.get("addr_info", [])
        if not str(a["local"]).startswith("127.")
    ]


def _get(port: int, path: str) -> str:
    for _ in range(50):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"127.0.0.1:{port}{path} did not answer")


def _address(engine: PodmanEngine, name: str) -> str:
    networks = engine.cli_json("inspect", name)[0]["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


@pytest.mark.slow
async def test_rootless_agents_reach_their_gateway_and_nothing_else(
    runtime: Runtime,
    engine: PodmanEngine,
    make_spec: Any,
    host_listeners: tuple[str, Listener, Listener],
) -> None:
    """An agent with a gateway reaches it; it is refused by a remote address, the host's
    non-loopback address (another port there), slirp4netns' host alias and another agent,
    from its very first instruction on; its published port answers the host."""
    info = await runtime.info()
    assert info.rootless and info.egress_enforced, info.egress_note
    host, gateway, service = host_listeners
    early = (
        f"nc -w 3 {REMOTE} 80 </dev/null >/tmp/early 2>&1; echo rc=$? >>/tmp/early; "
        "exec httpd -f -p 8080 -h /www"
    )
    agent = make_spec(
        "gw", egress="gateway", gateway=f"http://{host}:{gateway.port}/v1",
        command=["sh", "-c", early],
    )  # fmt: skip
    other = make_spec("other")
    started = await runtime.run(agent)
    peer = await runtime.run(other)
    assert started.host_port and "ok" in _get(started.host_port, "/health")
    assert peer.host_port and "ok" in _get(peer.host_port, "/health")

    env = engine.cli_json("inspect", agent.name)[0]["Config"]["Env"]
    assert f"OPENAI_BASE_URL=http://{host}:{gateway.port}/v1" in env
    code, output = _connect(engine, agent.name, host, gateway.port)
    assert code == 0 and "gateway-ok" in output, output
    assert gateway.accepted == 1

    early_out = engine.cli("exec", agent.name, "cat", "/tmp/early").stdout
    assert "No route to host" in early_out and "rc=0" not in early_out, early_out
    for target in ((REMOTE, 80), (host, service.port), ("10.0.2.2", gateway.port)):
        assert _refused(_connect(engine, agent.name, *target)), target
    peer_ip = _address(engine, other.name)
    assert _refused(_connect(engine, agent.name, peer_ip, 8080))
    # The peer (egress none) reaches neither the gateway nor the agent.
    assert _refused(_connect(engine, other.name, host, gateway.port))
    assert _refused(_connect(engine, other.name, _address(engine, agent.name), 8080))
    # Every address of the host (its bridges' too), on a port where nothing listens: a
    # closed port would answer "Connection refused", the table answers first.
    addresses = _host_addresses()
    assert host in addresses
    probes = " ".join(f"{a}:{service.port}" for a in addresses)
    script = (
        f'for t in {probes}; do nc -w 3 ${{t%:*}} ${{t#*:}} </dev/null 2>&1; echo "$t rc=$?"; done'
    )
    seen = engine.cli("exec", agent.name, "sh", "-c", script, check=False).stdout
    for address in addresses:
        assert f"{address}:{service.port} rc=1" in seen, seen
    assert seen.count("No route to host") == len(addresses), seen
    assert service.accepted == 0 and gateway.accepted == 1

    # The table is in the agents' own network namespaces, and its reject rule counted.
    netns = AgentNetns()
    pid = int(engine.cli_json("inspect", agent.name)[0]["State"]["Pid"])
    listing = netns.listing(pid)
    assert f"ip daddr {host} tcp dport {gateway.port} accept" in listing
    rejected = re.search(r"counter packets (\d+) bytes \d+ reject", listing)
    assert rejected and int(rejected.group(1)) >= 4, listing


@pytest.mark.slow
async def test_rootless_policy_survives_the_rootless_namespace(
    runtime: Runtime, engine: PodmanEngine, make_spec: Any
) -> None:
    """Each start loads the table into the new agent's own namespace, whatever became of
    rootless Podman's shared namespace meanwhile (it is made anew when its last container
    stops): an agent started after another stopped is held all the same."""
    first = make_spec("first")
    await runtime.run(first)
    await runtime.remove(first.name)
    second = make_spec("second")
    await runtime.run(second)
    assert _refused(_connect(engine, second.name, REMOTE, 80))


async def test_rootless_policy_that_cannot_hold_is_reported_and_required(
    engine: PodmanEngine, tmp_path: Path
) -> None:
    """Without ``nft`` the policy cannot hold: ``info()`` and ``/v1/healthz`` say exactly
    why, and ``require_egress`` refuses to start (the API and the CLI, in one line)."""
    missing = str(tmp_path / "no-such-nft")
    rt = PodmanRuntime(socket=engine.url, nft_path=missing)
    await rt.open()
    try:
        info = await rt.info()
    finally:
        await rt.close()
    assert info.rootless and not info.egress_enforced
    assert info.egress_note.startswith(ROOTLESS_EGRESS_NOTE)
    assert f"{missing}: not found" in info.egress_note

    plugins = {"podman": {"nft_path": missing}}
    settings = Settings(
        data_dir=str(tmp_path / "a"), podman_socket=engine.url, monitor_interval_s=0,
        plugins=plugins,
    )  # fmt: skip
    from litestar.testing import TestClient

    from dockyard.api.app import create_app

    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/healthz").json()
    assert body["runtime"]["egress_enforced"] is False
    assert f"{missing}: not found" in body["runtime"]["egress_note"]

    strict = Settings(
        data_dir=str(tmp_path / "b"), podman_socket=engine.url, plugins=plugins,
        require_egress=True,
    )  # fmt: skip
    with pytest.raises(EgressNotEnforceable) as caught:
        await Services.open(strict)
    assert caught.value.reason == "egress_not_enforceable"
    assert f"{missing}: not found" in caught.value.message

    config = tmp_path / "dockyard.toml"
    config.write_text(f'[plugins.podman]\nnft_path = "{missing}"\n')
    result = subprocess.run(
        [
            sys.executable, "-m", "dockyard.api.cli", "serve", "--podman-socket", engine.url,
            "--data-dir", str(tmp_path / "c"), "--port", str(free_port()),
        ],
        env={
            **os.environ, "DOCKYARD_REQUIRE_EGRESS": "true",
            "DOCKYARD_CONFIG": str(config),
        },
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "dockyard: error: require_egress is set" in result.stderr


async def test_rootless_healthz_says_the_policy_holds(engine: PodmanEngine, tmp_path: Path) -> None:
    from litestar.testing import TestClient

    from dockyard.api.app import create_app

    settings = Settings(
        data_dir=str(tmp_path), podman_socket=engine.url, monitor_interval_s=0,
        require_egress=True,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        body = client.get("/v1/healthz").json()
    assert body["runtime"]["rootless"] is True
    assert body["runtime"]["egress_enforced"] is True, body["runtime"]["egress_note"]
    assert body["runtime"]["egress_note"] == ""


class _NetnsThatFails(AgentNetns):
    def apply(self, pid: int, rules: Any) -> None:
        raise RuntimeOperationError(
            "the agent's network policy could not be applied: refused for the test",
            reason="network_policy_failed",
        )


class _RuntimeWhosePolicyFails(PodmanRuntime):
    @property
    def agent_netns(self) -> AgentNetns:
        return _NetnsThatFails()


async def test_rootless_agent_whose_policy_does_not_load_never_runs(
    engine: PodmanEngine, make_spec: Any, token: str
) -> None:
    """Fail closed: the host can hold the policy, but this agent's table does not load
    (the real engine, only the load step replaced): no container is left, and the error
    says ``network_policy_failed``."""
    rt = _RuntimeWhosePolicyFails(socket=engine.url)
    await rt.open()
    try:
        assert (await rt.info()).egress_enforced
        with pytest.raises(RuntimeOperationError) as caught:
            await rt.run(make_spec("fails"))
    finally:
        await rt.close()
    assert caught.value.reason == "network_policy_failed", caught.value.message
    assert "refused for the test" in caught.value.message
    assert engine.container_names({contract.TEST_LABEL: token}) == []


def test_a_remote_engine_cannot_be_entered() -> None:
    assert AgentNetns().check("tcp://192.0.2.1:2375") == (
        "the engine at tcp://192.0.2.1:2375 is not on this host"
    )


def _engine_user_env(engine: PodmanEngine) -> list[str]:
    import pwd

    assert engine.user is not None
    entry = pwd.getpwnam(engine.user)
    runtime_dir = (engine.service.runtime_dir if engine.service else None) or (
        f"/run/user/{entry.pw_uid}"
    )
    return [
        "runuser", "-u", engine.user, "--", "env", "-i", f"HOME={entry.pw_dir}",
        f"XDG_RUNTIME_DIR={runtime_dir}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    ]  # fmt: skip


async def test_the_engines_own_user_enters_its_agents_namespaces(
    runtime: Runtime, engine: PodmanEngine, make_spec: Any
) -> None:
    """The path of a dockyard run as the engine's own (unprivileged) user: the very command
    lines :class:`AgentNetns` builds for a non-root dockyard (``podman unshare nsenter``,
    ``podman unshare unshare --net``), run as that user, load and list an agent's table;
    and a non-root dockyard of another uid is told why it cannot."""
    prefix = _engine_user_env(engine)

    class AsEngineUser(AgentNetns):
        as_root = False  # type: ignore[assignment]

        def _run(self, argv: list[str], stdin: str, what: str) -> str:
            return super()._run([*prefix, *argv], stdin, what)

    spec = make_spec("user")
    await runtime.run(spec)
    pid = int(engine.cli_json("inspect", spec.name)[0]["State"]["Pid"])
    netns = AsEngineUser()
    netns.apply(pid, AgentRules(8080, ("192.0.2.9", 4321)))
    assert "ip daddr 192.0.2.9 tcp dport 4321 accept" in netns.listing(pid)
    assert netns.probe() == ""
    # As root the runtime loaded the same table at start; the user just replaced it.
    assert "192.0.2.9" in AgentNetns().listing(pid)

    class OtherUser(AgentNetns):
        as_root = False  # type: ignore[assignment]

    why = OtherUser().check(engine.url)
    assert "only root or the engine's own user can enter" in why, why
