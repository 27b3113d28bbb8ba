"""The plugin core: discovery through entry points, blocking, registrars, loud failures,
and every hook reaching its implementations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from litestar import get

from dockyard.core import hookimpl
from dockyard.core.errors import PluginError, PolicyRefused, UnknownPluginError
from dockyard.core.models import DeploymentSpec, Event
from dockyard.core.plugins import build_plugin_manager, check_spec, current_plugin, emit_event
from tests.conftest import EXAMPLE_PLUGIN, ROOT, pip_install_target

PROBE = """
import json
from dockyard.core.plugins import build_plugin_manager
pm = build_plugin_manager()
regs = pm.registries
print(json.dumps({
    "plugins": {p["name"]: p for p in pm.describe()},
    "runtimes": {n: regs.runtimes.owner(n) for n in regs.runtimes.names()},
}))
"""


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed into a private target directory."""
    return pip_install_target(EXAMPLE_PLUGIN, tmp_path_factory.mktemp("site"))


def _probe(site: Path, **env: str) -> dict[str, Any]:
    full_env = {**os.environ, "PYTHONPATH": str(site)}
    full_env.pop("DOCKYARD_DISABLE_PLUGINS", None)
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=full_env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_third_party_plugin_is_discovered_through_its_entry_point(installed_example: Path) -> None:
    found = _probe(installed_example)
    assert found["runtimes"]["example"] == "example"
    assert found["runtimes"]["podman"] == "podman"
    example = found["plugins"]["example"]
    assert example["version"] == "0.1.0"
    assert set(example["hooks"]) == {
        "dockyard_register_runtimes",
        "dockyard_check_spec",
        "dockyard_event",
    }


def test_disable_plugins_blocks_a_third_party_plugin(installed_example: Path) -> None:
    found = _probe(installed_example, DOCKYARD_DISABLE_PLUGINS="example, other")
    assert "example" not in found["runtimes"]
    assert "example" not in found["plugins"]
    assert "podman" in found["runtimes"]


def test_cli_lists_the_third_party_plugin(installed_example: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed_example)}
    out = subprocess.run(
        [sys.executable, "-m", "dockyard.api.cli", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "example" in out and "runtimes: docker, example, podman" in out


def test_disable_plugins_blocks_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKYARD_DISABLE_PLUGINS", "podman")
    pm = build_plugin_manager(load_entry_points=False)
    with pytest.raises(UnknownPluginError, match="unknown runtime 'podman'"):
        pm.registries.runtimes.get("podman")


def test_unknown_plugin_name_lists_what_exists() -> None:
    pm = build_plugin_manager(load_entry_points=False)
    with pytest.raises(UnknownPluginError, match=r"unknown runtime 'nope'; available: .*podman"):
        pm.registries.runtimes.get("nope")


def test_implementation_without_a_spec_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def dockyard_register_runtime(self, register: Any) -> None:  # missing "s"
            """A misspelt hook: pluggy would silently never call it."""

    with pytest.raises(PluginError, match="dockyard_register_runtime"):
        build_plugin_manager(load_entry_points=False, extra_plugins=[("typo", Typo())])


def test_implementation_with_wrong_arguments_fails_loudly() -> None:
    class Wrong:
        @hookimpl
        def dockyard_event(self, evt: Any) -> None:
            """Wrong argument name."""

    with pytest.raises(PluginError, match="wrong"):
        build_plugin_manager(load_entry_points=False, extra_plugins=[("wrong", Wrong())])


def test_a_name_registered_twice_is_an_error() -> None:
    class Twice:
        @hookimpl
        def dockyard_register_runtimes(self, register: Any) -> None:
            register("podman", object)

    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("twice", Twice())])
    with pytest.raises(PluginError, match="runtime 'podman' registered twice"):
        _ = pm.registries


class EveryRegistrar:
    """A plugin using every registrar hook."""

    @hookimpl
    def dockyard_register_runtimes(self, register: Any) -> None:
        register("rt", "runtime-factory")

    @hookimpl
    def dockyard_register_routers(self, register: Any) -> None:
        register("rtr", "router-factory")

    @hookimpl
    def dockyard_register_stores(self, register: Any) -> None:
        register("st", "store-factory")

    @hookimpl
    def dockyard_register_strategies(self, register: Any) -> None:
        register("strat", "strategy-factory")

    @hookimpl
    def dockyard_register_protocols(self, register: Any) -> None:
        register("proto", "protocol-factory")

    @hookimpl
    def dockyard_register_sources(self, register: Any) -> None:
        register("src", "source-factory")


def test_every_registrar_hook_fills_its_registry() -> None:
    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("every", EveryRegistrar())])
    regs = pm.registries
    assert regs.runtimes.get("rt") == "runtime-factory"
    assert regs.routers.get("rtr") == "router-factory"
    assert regs.stores.get("st") == "store-factory"
    assert regs.strategies.get("strat") == "strategy-factory"
    assert regs.protocols.get("proto") == "protocol-factory"
    assert regs.sources.get("src") == "source-factory"
    assert regs.runtimes.owner("rt") == "every"
    assert regs.stores.owner("sqlite") == "sqlite"


async def test_dockyard_event_reaches_sync_and_async_observers_and_survives_failures() -> None:
    seen: list[tuple[str, str]] = []

    class Sync:
        @hookimpl
        def dockyard_event(self, event: Event) -> None:
            seen.append(("sync", event.kind))

    class Async:
        @hookimpl
        async def dockyard_event(self, event: Event) -> None:
            seen.append(("async", event.kind))

    class Broken:
        @hookimpl
        def dockyard_event(self, event: Event) -> None:
            raise RuntimeError("observer bug")

    pm = build_plugin_manager(
        load_entry_points=False,
        extra_plugins=[("sync", Sync()), ("broken", Broken()), ("async", Async())],
    )
    await emit_event(pm, Event(deployment_id="app", kind="slot_transition"))
    assert sorted(seen) == [("async", "slot_transition"), ("sync", "slot_transition")]


async def test_dockyard_check_spec_can_refuse_a_deployment() -> None:
    class OnlyAcme:
        @hookimpl
        async def dockyard_check_spec(self, spec: DeploymentSpec) -> None:
            if "/acme/" not in spec.repo:
                raise PolicyRefused("only acme's repositories")

    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("acme", OnlyAcme())])
    await check_spec(pm, DeploymentSpec(id="ok", repo="https://github.com/acme/agent"))
    with pytest.raises(PolicyRefused, match="only acme"):
        await check_spec(pm, DeploymentSpec(id="no", repo="https://github.com/evil/agent"))


def test_example_plugin_policy_uses_its_options(example_plugin_module: Any) -> None:
    from dockyard.core.config import Settings

    example_plugin_module._runtime_factory(
        Settings(plugins={"example": {"allowed_owners": ["acme"]}})
    )
    try:
        with pytest.raises(PolicyRefused, match="'evil'"):
            example_plugin_module.dockyard_check_spec(
                DeploymentSpec(id="x", repo="https://github.com/evil/agent")
            )
    finally:
        example_plugin_module._runtime_factory(Settings())


def test_dockyard_api_handlers_mounts_plugin_routes(api_client_factory: Any) -> None:
    @get("/v1/hello", operation_id="hello", opt={"scope": "read"})
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @get("/v1/undeclared", operation_id="undeclared")
    async def undeclared() -> dict[str, str]:
        return {"secret": "data"}

    class Routes:
        @hookimpl
        def dockyard_api_handlers(self, register: Any) -> None:
            register("hello", hello)
            register("undeclared", undeclared)

    with api_client_factory(extra_plugins=[("routes", Routes())]) as client:
        response = client.get("/v1/hello")
        assert response.status_code == 200
        assert response.json() == {"hello": "world"}
        names = {p["name"] for p in client.get("/v1/plugins").json()}
        assert "routes" in names
        # A plugin route that declares no scope is refused, even to an admin: fail closed.
        response = client.get("/v1/undeclared")
        assert response.status_code == 403
        assert "declares no scope" in response.json()["message"]


def test_hooks_are_called_through_pluggy_honouring_tryfirst_trylast_and_wrappers() -> None:
    calls: list[str] = []

    class Late:
        @hookimpl(trylast=True)
        def dockyard_register_sources(self, register: Any) -> None:
            calls.append("late")
            register("late-src", "late")

    class Plain:
        @hookimpl
        def dockyard_register_sources(self, register: Any) -> None:
            calls.append("plain")
            register("plain-src", "plain")

    class Early:
        @hookimpl(tryfirst=True)
        def dockyard_register_sources(self, register: Any) -> None:
            calls.append("early")
            register("early-src", "early")

    class Wrapper:
        @hookimpl(wrapper=True)
        def dockyard_register_sources(self, register: Any) -> Any:
            calls.append("before")
            register("wrapped-src", "wrapped")
            result = yield
            calls.append(f"after {len(register)}")
            return result

    # Registered in the order least likely to give this result by accident: the trylast
    # one last (newest first would put it first) and the tryfirst one first.
    pm = build_plugin_manager(
        load_entry_points=False,
        extra_plugins=[
            ("early", Early()),
            ("plain", Plain()),
            ("wrapper", Wrapper()),
            ("late", Late()),
        ],
    )
    sources = pm.registries.sources
    assert calls[0] == "before" and calls[-1] == f"after {len(sources)}"
    ours = [c for c in calls if c in ("early", "plain", "late")]
    assert ours == ["early", "plain", "late"]
    assert sources.owner("early-src") == "early" and sources.owner("late-src") == "late"
    assert sources.get("wrapped-src") == "wrapped"  # the wrapper ran around the others


async def test_event_observers_run_in_pluggy_order_and_a_wrapper_sees_them() -> None:
    seen: list[str] = []

    class First:
        @hookimpl(tryfirst=True)
        def dockyard_event(self, event: Event) -> None:
            seen.append("first")

    class Last:
        @hookimpl(trylast=True)
        async def dockyard_event(self, event: Event) -> None:
            seen.append("last")

    class Broken:
        @hookimpl
        def dockyard_event(self, event: Event) -> None:
            raise RuntimeError("observer bug")

    class Around:
        @hookimpl(wrapper=True)
        def dockyard_event(self, event: Event) -> Any:
            seen.append(f"around {event.kind}")
            results = yield
            seen.append(f"{len(results)} results")
            return results

    pm = build_plugin_manager(
        load_entry_points=False,
        extra_plugins=[
            ("last", Last()),
            ("broken", Broken()),
            ("around", Around()),
            ("first", First()),
        ],
    )
    await emit_event(pm, Event(deployment_id="app", kind="probe"))
    assert seen[0] == "around probe" and seen[1] == "first"
    assert seen[-1] == "last"  # awaited after the wrapper saw the results
    assert "results" in seen[-2]


def test_a_failing_registrar_names_its_plugin() -> None:
    class Faulty:
        @hookimpl
        def dockyard_register_routers(self, register: Any) -> None:
            raise RuntimeError("boom")

    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("faulty", Faulty())])
    with pytest.raises(PluginError, match="plugin 'faulty' failed in dockyard_register_routers"):
        pm.registries  # noqa: B018


def test_a_hook_wrapper_registers_under_its_plugins_name() -> None:
    """Before and after its ``yield`` (also when an implementation under it failed) a hook
    wrapper's registrations are its plugin's; the others' stay theirs."""

    class Plain:
        @hookimpl
        def dockyard_register_sources(self, register: Any) -> None:
            register("plain-src", "plain")

    class Failing:
        @hookimpl
        def dockyard_register_strategies(self, register: Any) -> None:
            raise RuntimeError("no strategy today")

    class Wrapper:
        @hookimpl(wrapper=True)
        def dockyard_register_sources(self, register: Any) -> Any:
            register("before-src", "before")
            result = yield
            register("after-src", "after")
            return result

        @hookimpl(wrapper=True)
        def dockyard_register_strategies(self, register: Any) -> Any:
            try:
                yield
            except PluginError:
                register("fallback", "fallback")

    class OldStyle:
        @hookimpl(hookwrapper=True)
        def dockyard_register_sources(self, register: Any) -> Any:
            register("old-src", "old")
            yield

    pm = build_plugin_manager(
        load_entry_points=False,
        extra_plugins=[
            ("plain", Plain()),
            ("failing", Failing()),
            ("wrapper", Wrapper()),
            ("oldstyle", OldStyle()),
        ],
    )
    sources = pm.registries.sources
    assert sources.owner("before-src") == sources.owner("after-src") == "wrapper"
    assert sources.owner("old-src") == "oldstyle"
    assert sources.owner("plain-src") == "plain" and sources.owner("git") == "git"
    assert pm.registries.strategies.owner("fallback") == "wrapper"
    assert current_plugin() == "?"
