"""Operator caps, the maximum lifetime, the network policy handed to runtimes, the agent
firewall's rules and the events that say what a host cannot enforce. Fast: fake runtime,
fake nft; the real thing is ``tests/test_hostile.py``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio

from dockyard.backends.firewall import AgentFirewall, AgentNetwork, ruleset
from dockyard.backends.podman import _K8S_LOG_LINE, _timestamp
from dockyard.core.config import Settings, load_settings
from dockyard.core.controller import Controller
from dockyard.core.errors import ConfigError, RuntimeOperationError, ValidationError
from dockyard.core.models import Color, DeploymentSpec, Resources, SlotState
from dockyard.core.policy import (
    check_spec,
    effective_lifetime,
    effective_limits,
    network_policy,
    parse_gateway,
)
from dockyard.core.runtime import ContainerInfo, ContainerSpec
from dockyard.core.services import Services
from dockyard.plugins.evaluation.options import EvaluationConfig
from tests.fakes import FakeRuntime, started_services

S = SlotState


def spec(**fields: Any) -> DeploymentSpec:
    health = {"interval_s": 0.02, "timeout_s": 0.5, "deadline_s": 2, **fields.pop("health", {})}
    raw = {"id": "app", "repo": "https://github.com/acme/agent", "health": health, **fields}
    return msgspec.convert(raw, DeploymentSpec)


# ------------------------------------------------------------------------------ caps
@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"memory_mb": 4096}, "resources.memory_mb: 4096 exceeds the operator's cap of 2048"),
        ({"cpus": 4}, "resources.cpus: 4 exceeds the operator's cap of 2"),
        ({"pids": 1000}, "resources.pids: 1000 exceeds the operator's cap of 768"),
        ({"tmpfs_mb": 512}, "resources.tmpfs_mb: 512 exceeds the operator's cap of 256"),
    ],
)
def test_a_request_above_a_cap_is_refused_naming_the_field(
    resources: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        check_spec(spec(resources=resources), Settings())
    assert caught.value.message == message
    assert caught.value.status_code == 422


def test_requests_can_lower_the_caps_and_defaults_above_a_cap_are_lowered() -> None:
    settings = Settings()
    low = spec(resources={"memory_mb": 64, "cpus": 0.5, "pids": 32, "tmpfs_mb": 8})
    check_spec(low, settings)
    limits = effective_limits(low, settings)
    assert (limits.memory_mb, limits.cpus, limits.pids, limits.tmpfs_mb) == (64, 0.5, 32, 8)

    tight = Settings(max_memory_mb=256, max_cpus=0.5, max_pids=100, max_tmpfs_mb=16)
    defaults = spec()
    assert defaults.resources == Resources()
    check_spec(defaults, tight)  # defaults are not requests: lowered, not refused
    limits = effective_limits(defaults, tight)
    assert (limits.memory_mb, limits.cpus, limits.pids, limits.tmpfs_mb) == (256, 0.5, 100, 16)
    with pytest.raises(ValidationError, match=r"resources\.memory_mb: 300 exceeds"):
        check_spec(spec(resources={"memory_mb": 300}), tight)


def test_lifetime_can_only_lower_the_operators() -> None:
    assert effective_lifetime(spec(), Settings()) is None
    assert effective_lifetime(spec(max_lifetime_s=30), Settings()) == 30
    capped = Settings(max_container_lifetime_s=600)
    assert effective_lifetime(spec(), capped) == 600
    assert effective_lifetime(spec(max_lifetime_s=30), capped) == 30
    with pytest.raises(ValidationError, match="max_lifetime_s: 601 exceeds the operator's cap"):
        check_spec(spec(max_lifetime_s=601), capped)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"id": "a", "repo": "x", "max_lifetime_s": 0}, DeploymentSpec)


def test_the_logs_tmpfs_is_capped_like_any_tmpfs() -> None:
    from dockyard.core.policy import effective_scratch

    tight = Settings(max_tmpfs_mb=16)
    check_spec(spec(), tight)  # the default 64 MiB is lowered, not refused
    assert effective_scratch({"/app/logs": 64}, tight) == {"/app/logs": 16}
    assert effective_scratch({"/app/logs": 0}, tight) == {}
    with pytest.raises(ValidationError, match="logs_tmpfs_mb: 32 exceeds the operator's cap of 16"):
        check_spec(spec(logs_tmpfs_mb=32), tight)


def test_sandbox_settings_come_from_the_environment() -> None:
    settings = load_settings(
        environ={"DOCKYARD_EVAL_GATEWAY_VARS": "SANDBOX_GATEWAY_URL=, LLM=/v1"}
    )
    assert settings.eval_gateway_vars == {"SANDBOX_GATEWAY_URL": "", "LLM": "/v1"}
    assert EvaluationConfig.from_settings(settings).gateway_variables() == {
        "OPENAI_BASE_URL": "",
        "SANDBOX_GATEWAY_URL": "",
        "LLM": "/v1",
    }
    assert EvaluationConfig.from_settings(Settings()).gateway_variables() == {
        "SANDBOX_GATEWAY_URL": "",
        "OPENAI_BASE_URL": "/openai/v1",
        "CHUTES_BASE_URL": "/chutes/v1",
    }
    with pytest.raises(ConfigError, match="eval_gateway_vars"):
        load_settings(environ={"DOCKYARD_EVAL_GATEWAY_VARS": "BAD NAME=/x"})
    with pytest.raises(ConfigError, match="eval_gateway_vars"):
        load_settings(environ={"DOCKYARD_EVAL_GATEWAY_VARS": "OK=no-slash"})


def test_caps_come_from_the_environment_and_are_validated() -> None:
    settings = load_settings(
        environ={"DOCKYARD_MAX_MEMORY_MB": "1024", "DOCKYARD_MAX_CONTAINER_LIFETIME_S": "60"}
    )
    assert (settings.max_memory_mb, settings.max_container_lifetime_s) == (1024, 60)
    with pytest.raises(ConfigError, match="max_pids"):
        load_settings(environ={"DOCKYARD_MAX_PIDS": "0"})


# --------------------------------------------------------------------------- gateway
@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:9999", ("127.0.0.1", 9999, "")),
        ("http://10.0.0.5:8080/v1/", ("10.0.0.5", 8080, "/v1")),
    ],
)
def test_gateway_values(value: str, parsed: tuple[str, int, str]) -> None:
    assert parse_gateway(value) == parsed
    assert network_policy(Settings(agent_gateway=value)) == ("gateway", value)


@pytest.mark.parametrize(
    "value",
    [
        "gateway.local:9999",
        "127.0.0.1",
        "https://127.0.0.1:9999",
        "http://u:p@127.0.0.1:9999",
        "[::1]:9999",
        "127.0.0.1:99999",
        "http://127.0.0.1:9999/v1?key=secret",
    ],
)
def test_bad_gateways_are_configuration_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="agent_gateway"):
        Settings(agent_gateway=value)


def test_no_gateway_means_no_egress() -> None:
    assert network_policy(Settings()) == ("none", None)


# ------------------------------------------------------------------- through the app
class RecordingRuntime(FakeRuntime):
    """Records the specs it runs; containers report a start time ``age_s`` in the past."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[ContainerSpec] = []
        self.age_s = 0.0

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        self.specs.append(spec)
        info = await super().run(spec)
        info = msgspec.structs.replace(info, started_at=time.time() - self.age_s)
        self.containers[info.id] = info
        return info

    async def died(self, name: str, code: int, *, oom: bool = False) -> None:
        await self.stop(name)
        info = self._find(name)
        assert info is not None
        self.containers[info.id] = msgspec.structs.replace(info, exit_code=code, oom_killed=oom)


@pytest_asyncio.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    async with started_services(
        tmp_path,
        RecordingRuntime(),
        port_range_start=47700,
        port_range_end=47720,
        agent_gateway="http://127.0.0.1:9999/v1",
        max_memory_mb=1024,
    ) as svc:
        yield svc


async def deploy(controller: Controller, **fields: Any) -> None:
    await controller.create(spec(grace_period_s=30, ref="v1", **fields))
    assert await controller.wait("app", 10)


async def test_containers_get_the_capped_limits_the_policy_and_an_event(
    services: Services,
) -> None:
    controller = Controller.from_services(services)
    runtime: RecordingRuntime = services.runtime  # type: ignore[assignment]
    with pytest.raises(ValidationError, match=r"resources\.memory_mb: 2048 exceeds"):
        await controller.create(spec(resources={"memory_mb": 2048}))
    await deploy(controller, resources={"pids": 100}, env={"OPENAI_BASE_URL": "http://evil/"})
    (ran,) = runtime.specs
    assert (ran.limits.memory_mb, ran.limits.pids) == (512, 100)
    assert (ran.egress, ran.gateway) == ("gateway", "http://127.0.0.1:9999/v1")
    events = [e for e in await services.store.list_events("app") if e.kind == "limits_not_enforced"]
    assert len(events) == 1 and events[0].color is Color.BLUE
    assert events[0].data == {"resources": False, "network": False}
    assert "fake runtime" in (events[0].message or "")
    await controller.stop()


async def test_the_monitor_ends_containers_past_their_lifetime(services: Services) -> None:
    controller = Controller.from_services(services)
    runtime: RecordingRuntime = services.runtime  # type: ignore[assignment]
    runtime.age_s = 100
    await deploy(controller, max_lifetime_s=60)
    async with aiohttp.ClientSession() as session:
        await controller.check_promoted(session)
    blue = await services.store.get_slot("app", Color.BLUE)
    assert (blue.state, blue.reason) == (S.FAILED, "lifetime_exceeded")
    assert blue.message == "the container ran longer than its maximum lifetime of 60 s"
    assert runtime.containers == {} and await services.store.list_leases() == {}
    await controller.stop()


async def test_a_young_container_is_left_alone(services: Services) -> None:
    controller = Controller.from_services(services)
    await deploy(controller, max_lifetime_s=60)
    async with aiohttp.ClientSession() as session:
        await controller.check_promoted(session)
    assert (await services.store.get_slot("app", Color.BLUE)).state is S.PROMOTED
    await controller.stop()


@pytest.mark.parametrize(
    ("code", "oom", "reason", "words"),
    [
        (137, False, "container_exited", "code 137 (SIGKILL, not sent by dockyard: usually"),
        (137, True, "container_oom", "killed the container at its memory limit"),
        (3, False, "container_exited", "the container exited with code 3"),
    ],
)
async def test_a_dead_container_fails_its_slot(
    services: Services, code: int, oom: bool, reason: str, words: str
) -> None:
    controller = Controller.from_services(services)
    runtime: RecordingRuntime = services.runtime  # type: ignore[assignment]
    await deploy(controller)
    await runtime.died("dockyard-app-blue", code, oom=oom)
    async with aiohttp.ClientSession() as session:
        await controller.check_promoted(session)
    blue = await services.store.get_slot("app", Color.BLUE)
    assert (blue.state, blue.reason) == (S.FAILED, reason)
    assert words in (blue.message or "")
    await controller.stop()


async def test_a_dead_container_is_left_to_its_health_action(services: Services) -> None:
    controller = Controller.from_services(services)
    runtime: RecordingRuntime = services.runtime  # type: ignore[assignment]
    await deploy(controller, health={"failure_threshold": 1, "on_failure": "restart"})
    await runtime.died("dockyard-app-blue", 1)
    async with aiohttp.ClientSession() as session:
        await controller.check_promoted(session)
    blue = await services.store.get_slot("app", Color.BLUE)
    assert blue.state is S.PROMOTED  # restarted by on_failure, not failed by the watchdog
    info = await runtime.inspect("dockyard-app-blue")
    assert info is not None and info.running
    await controller.stop()


def test_hardening_and_caps_through_the_api(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47730, port_range_end=47735) as client:
        base = {"id": "app", "repo": "https://github.com/acme/agent"}
        for extra in (
            {"privileged": True},
            {"cap_add": ["SYS_ADMIN"]},
            {"read_only": False},
            {"network": "host"},
            {"egress": "gateway"},
            {"gateway": "1.2.3.4:80"},
            {"user": "0"},
            {"mounts": [["/", "/host"]]},
            {"resources": {"memory_mb": 512, "swap_mb": 1024}},
        ):
            r = client.post("/v1/repos", json={**base, **extra})
            assert r.status_code == 400, (extra, r.text)
        r = client.post("/v1/repos", json={**base, "resources": {"pids": 769}})
        assert r.status_code == 422
        assert r.json()["message"] == "resources.pids: 769 exceeds the operator's cap of 768"
        assert client.get("/v1/repos/app").status_code == 404


def test_build_network_is_refused_at_admission_unless_allowed(fake_client_factory: Any) -> None:
    """Refused before the fetch (it used to fail the slot after fetching), on create and on
    redeploy; the operator's allow_build_network lets it through."""
    base = {"id": "app", "repo": "https://github.com/acme/agent", "ref": "v1"}
    with fake_client_factory(port_range_start=47736, port_range_end=47739) as client:
        source = client.app.state.services.sources["fake"]
        r = client.post("/v1/repos", json={**base, "build_network": True})
        assert r.status_code == 422, r.text
        assert r.json()["message"].startswith("build_network: the operator does not allow")
        assert source.fetches == 0
        assert client.get("/v1/repos/app").status_code == 404
    with fake_client_factory(
        port_range_start=47736, port_range_end=47739, allow_build_network=True
    ) as client:
        r = client.post("/v1/repos", json={**base, "build_network": True})
        assert r.status_code == 202, r.text


# --------------------------------------------------------------------- the firewall
class FakeNft:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail = fail

    def __call__(self, args: Sequence[str], stdin: str | None) -> tuple[int, str, str]:
        self.calls.append((list(args), stdin))
        if self.fail:
            return 1, "", self.fail
        return 0, '{"nftables": []}', ""


def test_the_ruleset_rejects_all_agent_traffic_but_replies_and_grants() -> None:
    rules = ruleset()
    lines = [line for line in rules.splitlines() if line.startswith("add rule")]
    joined = "\n".join(lines)
    assert 'input iifname "dya*" ct state established,related accept' in joined
    assert 'input iifname "dya*" counter reject' in joined
    assert 'forward iifname "dya*" counter reject' in joined
    assert 'forward oifname "dya*" counter drop' in joined
    assert "@gateway_allow accept" in joined and "map @gateway_dnat" in rules
    assert "ip saddr @agent_subnets ip daddr @agent_subnets counter drop" in joined
    # Re-applying keeps grants: chains are flushed, sets and maps only added.
    assert "flush chain inet dockyard input" in rules
    assert "delete" not in rules and "flush set" not in rules and "flush map" not in rules


def test_the_firewall_applies_exactly_the_networks_given_and_fails_closed() -> None:
    nft = FakeNft()
    firewall = AgentFirewall(nft)
    assert firewall.check() == ""
    firewall.apply(
        [
            AgentNetwork("dya0", "10.89.0.0/24"),
            AgentNetwork("dya0g12345678", "10.89.1.0/24", ("127.0.0.1", 9999)),
        ]
    )
    script = nft.calls[-1][1] or ""
    assert script.startswith(ruleset())  # rules and elements in one transaction
    flushes = script.index("flush set bridge dockyard agent_subnets")
    assert flushes < script.index("add element bridge dockyard agent_subnets { 10.89.0.0/24 }")
    assert '"dya0g12345678" . 9999 : 127.0.0.1 . 9999' in script
    assert '"dya0g12345678" . 127.0.0.1 . 9999' in script
    assert '"dya0" .' not in script  # no gateway for the network without one
    with pytest.raises(ValueError):
        firewall.apply([AgentNetwork("eth0", "10.0.0.0/8")])
    broken = AgentFirewall(FakeNft(fail="Operation not permitted"))
    assert "could not be applied: Operation not permitted" in broken.check()
    with pytest.raises(RuntimeOperationError) as caught:
        broken.apply([])
    assert caught.value.reason == "network_policy_failed"


# ------------------------------------------------------------------ podman parsing
def test_engine_timestamps_and_log_lines() -> None:
    assert _timestamp("0001-01-01T00:00:00Z") is None
    assert _timestamp("") is None
    assert _timestamp("2026-11-26T23:27:16.269344748Z") == pytest.approx(1795735636.269344)
    assert _timestamp("2026-11-26T23:27:16+01:00") == pytest.approx(1795732036.0)
    match = _K8S_LOG_LINE.match("2026-11-26T23:27:16.2Z stdout F flood flood")
    assert match is not None and match.groups() == ("F", "flood flood")
    assert _K8S_LOG_LINE.match("2026-11-26T23") is None
