"""Garbage collection of the networks dockyard leaves on a host, on real rootful Podman:
agent networks of gateways no longer configured and build networks a killed build left go
(``networks`` kind of ``core/gc.py``); one a container joined, the configured gateway's,
other prefixes' and other data directories' stay.

Other developers' tests use this host's Podman at the same time, so every network here has
a name of this test's own (its agent network prefix, its data directory's build scope) and
the runtime under gc lists only those: the assertions and the removals concern this test's
networks alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.backends.podman import PodmanRuntime
from dockyard.backends.podman.network_gc import created_at
from dockyard.core.gc import GRACE_S, GarbageCollector
from tests.contract import conftest as contract
from tests.contract.conftest import PodmanEngine
from tests.fakes import started_services

engine = contract.engine_fixture([contract.PODMAN_RUNTIMES[0]])  # rootful: host networks


def test_libpod_creation_times_are_read() -> None:
    assert created_at("2026-11-29T20:20:42.439179804Z") == pytest.approx(1795983642.439179)
    assert created_at("2026-11-29T21:20:42.5+01:00") == pytest.approx(1795983642.5)
    assert created_at("") == 0.0
    assert created_at("yesterday") == 0.0


@pytest.fixture
def made(engine: PodmanEngine) -> Iterator[list[str]]:
    """Names of networks (and containers) the test made; removed afterwards, whatever
    happened."""
    names: list[str] = []
    yield names
    for name in reversed(names):
        engine.cli("rm", "--force", "--time", "0", name, check=False)
        engine.cli("network", "rm", "--force", name, check=False)


def network(engine: PodmanEngine, made: list[str], name: str, **labels: str) -> str:
    args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    engine.cli("network", "create", "--disable-dns", *args, name)
    made.append(name)
    return name


def network_names(engine: PodmanEngine) -> set[str]:
    return set(engine.cli("network", "ls", "--format", "{{.Name}}").stdout.split())


@pytest.mark.podman
@pytest.mark.slow
async def test_gc_removes_unused_networks_of_its_own_and_keeps_the_rest(
    engine: PodmanEngine, made: list[str], tmp_path: Path, offline_base_image: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    prefix = f"dockyard-gctest{tag}"  # this test's agent network name
    state = tmp_path / "state"
    runtime = PodmanRuntime(socket=engine.url, **{**engine.runtime_kwargs, "state_dir": str(state)})
    runtime.agent_network = prefix
    agents = {"io.dockyard.managed": "true", "io.dockyard.network": "agents"}
    stale = network(
        engine, made, f"{prefix}-gw-0001", **agents, **{"io.dockyard.gateway": "127.0.0.1:1"}
    )
    joined = network(
        engine, made, f"{prefix}-gw-0002", **agents, **{"io.dockyard.gateway": "127.0.0.1:2"}
    )
    configured = network(
        engine, made, f"{prefix}-gw-0003", **agents, **{"io.dockyard.gateway": "127.0.0.1:3"}
    )
    other = network(
        engine,
        made,
        f"dockyard-gcother{tag}-gw-0001",
        **agents,
        **{"io.dockyard.gateway": "127.0.0.1:1"},
    )
    build = {"io.dockyard.managed": "true", "io.dockyard.network": "build"}
    left_build = network(
        engine,
        made,
        f"dockyard-build-gc{tag}",
        **build,
        **{"io.dockyard.build.scope": runtime.build_scope},
    )
    foreign_build = network(
        engine,
        made,
        f"dockyard-build-gcx{tag}",
        **build,
        **{"io.dockyard.build.scope": "000000000000"},
    )
    container = f"dockyard-gctest{tag}"
    made.append(container)
    engine.cli(
        "run", "-d", "--name", container, "--network", joined, offline_base_image, "sleep", "300"
    )

    async with started_services(
        tmp_path,
        runtime,
        agent_gateway="http://127.0.0.1:3/v1",
        port_range_start=61350,
        port_range_end=61360,
    ) as services:
        listed = {n.name: n for n in await runtime.list_networks()}
        assert set(listed) == {stale, joined, configured, left_build}
        assert listed[joined].containers == 1 and listed[stale].containers == 0
        assert abs(listed[stale].created - time.time()) < 600  # libpod's time, read

        young = GarbageCollector(services.settings, services.store, runtime)
        report = await young.collect()
        assert not [r for r in report.removed if r.kind == "networks"]  # in the grace period

        later = GarbageCollector(
            services.settings,
            services.store,
            runtime,
            clock=lambda: time.time() + 2 * GRACE_S + 86400,
        )
        dry = await later.collect(dry_run=True)
        assert {r.name for r in dry.removed if r.kind == "networks"} == {stale, left_build}
        assert stale in network_names(engine)
        report = await later.collect()
        assert {r.name for r in report.removed if r.kind == "networks"} == {stale, left_build}
        assert not [e for e in report.errors if "networks" in e]
        assert report.usage["networks"].count == 2 and report.usage["networks"].in_use == 2

    names = network_names(engine)
    assert stale not in names and left_build not in names
    assert {joined, configured, other, foreign_build} <= names
