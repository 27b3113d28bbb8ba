"""The controller's own duties, on the fast fake runtime: the health monitor of promoted
slots and its actions, resuming after a restart, and build logs kept for failed builds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest_asyncio

from dockyard.core.controller import Controller
from dockyard.core.models import Color, DeploymentSpec, Event, HealthCheck, SlotState
from dockyard.core.runtime import ContainerSpec
from dockyard.core.services import Services
from tests.fakes import FakeRuntime, started_services

S = SlotState


@pytest_asyncio.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    async with started_services(
        tmp_path, FakeRuntime(), port_range_start=47300, port_range_end=47320
    ) as svc:
        yield svc


def spec(**fields: Any) -> DeploymentSpec:
    health = HealthCheck(interval_s=0.02, timeout_s=0.5, deadline_s=2, **fields.pop("health", {}))
    return DeploymentSpec(
        id="app",
        repo="https://github.com/acme/agent",
        ref="v1",
        grace_period_s=30,
        health=health,
        **fields,
    )


async def deploy(controller: Controller, **fields: Any) -> None:
    await controller.create(spec(**fields))
    assert await controller.wait("app", 10)


async def states(services: Services) -> dict[Color, SlotState]:
    return {s.color: s.state for s in await services.store.list_slots("app")}


async def test_monitor_records_health_and_rolls_back(services: Services) -> None:
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller, health={"failure_threshold": 2, "on_failure": "rollback"})
    await controller.redeploy("app", {"ref": "v2"})
    assert await controller.wait("app", 10)
    assert await states(services) == {Color.BLUE: S.DRAINING, Color.GREEN: S.PROMOTED}
    runtime: FakeRuntime = services.runtime  # type: ignore[assignment]
    async with aiohttp.ClientSession() as session:
        await controller.check_promoted(session)
        green = await services.store.get_slot("app", Color.GREEN)
        assert green.health.status == "healthy" and green.health.last_latency_ms is not None
        runtime.sick.add("dockyard-app-green")
        await controller.check_promoted(session)
        green = await services.store.get_slot("app", Color.GREEN)
        assert (green.health.status, green.health.consecutive_failures) == ("unhealthy", 1)
        await controller.check_promoted(session)  # threshold reached: roll back
    assert await states(services) == {Color.BLUE: S.PROMOTED, Color.GREEN: S.DRAINING}
    kinds = [e.kind for e in await services.store.list_events("app")]
    assert "promoted_unhealthy" in kinds
    await controller.stop()


async def test_monitor_restart_action_replaces_the_container(services: Services) -> None:
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller, health={"failure_threshold": 1, "on_failure": "restart"})
    runtime: FakeRuntime = services.runtime  # type: ignore[assignment]
    before = (await runtime.inspect("dockyard-app-blue")).id  # type: ignore[union-attr]
    runtime.sick.add("dockyard-app-blue")
    async with aiohttp.ClientSession() as session:
        await controller.check_promoted(session)
    after = await runtime.inspect("dockyard-app-blue")
    assert after is not None and after.id != before and after.running
    blue = await services.store.get_slot("app", Color.BLUE)
    assert blue.state is S.PROMOTED and blue.container_id == after.id
    assert "restarted" in [e.kind for e in await services.store.list_events("app")]
    await controller.stop()


async def test_resume_fails_interrupted_slots_and_reaps_orphans(services: Services) -> None:
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller)
    await controller.stop()
    store, runtime = services.store, services.runtime
    # A crash mid-deploy into green: its intent (STAGING, port, name) is stored, its
    # container runs; plus a container nobody accounts for.
    green = await store.get_slot("app", Color.GREEN)
    port = await store.lease_port("app:green")
    for to in (S.BUILDING, S.STAGING):
        moved = msgspec.structs.replace(
            green, state=to, host_port=port, container_name="dockyard-app-green"
        )
        await store.save_slot(
            moved,
            Event(
                deployment_id="app",
                kind="slot_transition",
                color=Color.GREEN,
                from_state=green.state,
                to_state=to,
            ),
        )
        green = moved
    blue = await store.get_slot("app", Color.BLUE)
    image = next(iter(runtime.images))  # type: ignore[attr-defined]
    for name, p in (("dockyard-app-green", port), ("dockyard-ghost-blue", 47319)):
        await runtime.run(
            ContainerSpec(
                name=name,
                image=image,
                container_port=8000,
                host_port=p,
                labels=services.labels(),
            )
        )
    # Another dockyard's container (another data directory) is never touched.
    foreign = {**services.labels(), "io.dockyard.instance": "someone-else"}
    await runtime.run(
        ContainerSpec(
            name="dockyard-theirs-blue",
            image=image,
            container_port=8000,
            host_port=47318,
            labels=foreign,
        )
    )
    stale = await store.lease_port("ghost:blue")

    restarted = Controller.from_services(services)
    await restarted.start()
    green = await store.get_slot("app", Color.GREEN)
    assert (green.state, green.reason) == (S.FAILED, "controller_restarted")
    assert (await store.get_slot("app", Color.BLUE)).state is S.PROMOTED
    names = {c.name for c in await runtime.list()}
    assert names == {blue.container_name, "dockyard-theirs-blue"}
    leases = await store.list_leases()
    assert stale not in leases and port not in leases and blue.host_port in leases
    await restarted.stop()


async def test_resume_restores_drain_timers(services: Services) -> None:
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller)
    await controller.redeploy("app", {"ref": "v2", "grace_period_s": 0.2})
    assert await controller.wait("app", 10)
    await controller.stop()  # the drain timer dies with it
    assert (await states(services))[Color.BLUE] is S.DRAINING
    restarted = Controller.from_services(services)
    await restarted.start()
    for _ in range(100):
        if (await states(services))[Color.BLUE] is S.RETIRED:
            break
        await asyncio.sleep(0.05)
    assert (await states(services))[Color.BLUE] is S.RETIRED
    await restarted.stop()


async def test_a_failed_build_keeps_its_log(services: Services) -> None:
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller, build_args={"BUILD": "fail"})
    blue = await services.store.get_slot("app", Color.BLUE)
    assert (blue.state, blue.reason) == (S.FAILED, "build_failed")
    log = controller.ops.build_log_path("app", Color.BLUE).read_text()
    assert "boom" in log and "dockyard: build_failed" in log
    await controller.delete("app")
    assert not controller.ops.build_log_path("app", Color.BLUE).exists()
    await controller.stop()


async def test_a_port_busy_on_the_host_is_skipped(services: Services) -> None:
    """A leased port that something outside dockyard still holds is not used."""
    import socket

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 47300))  # the pool's first port
        squatter.listen()
        controller = Controller.from_services(services)
        await controller.start()
        await deploy(controller)
        blue = await services.store.get_slot("app", Color.BLUE)
        assert blue.state is S.PROMOTED and blue.host_port == 47301
        assert 47300 not in await services.store.list_leases()
        await controller.stop()


async def _kinds(services: Services) -> list[str]:
    return [e.kind for e in await services.store.list_events("app")]


async def test_resume_deploys_a_deployment_created_but_never_deployed(
    services: Services,
) -> None:
    """Killed right after ``created``: the stored deployment gets its deploy."""
    await services.store.create_deployment(spec())
    restarted = Controller.from_services(services)
    await restarted.start()
    assert await restarted.wait("app", 10)
    assert (await states(services))[Color.BLUE] is S.PROMOTED
    [resumed] = [
        e for e in await services.store.list_events("app") if e.kind == "operation_resumed"
    ]
    assert (resumed.reason, resumed.data["operation"]) == ("controller_restarted", "deploy")
    await restarted.stop()


async def test_resume_runs_a_redeploy_requested_but_never_run(services: Services) -> None:
    """Killed right after ``redeploy_requested``: the new spec is stored (generation 2) but
    no slot built it; the restart deploys it rather than leave the old revision running."""
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller)
    await controller.stop()
    await services.store.update_deployment(msgspec.structs.replace(spec(), ref="v2"))
    restarted = Controller.from_services(services)
    await restarted.start()
    assert await restarted.wait("app", 10)
    assert await states(services) == {Color.BLUE: S.DRAINING, Color.GREEN: S.PROMOTED}
    green = await services.store.get_slot("app", Color.GREEN)
    revision = await services.store.get_revision(green.revision_id or "")
    assert revision is not None and revision.ref == "v2"
    assert "operation_resumed" in await _kinds(services)
    await restarted.stop()


async def test_resume_promotes_a_healthy_slot_never_promoted(services: Services) -> None:
    """Killed between HEALTHY and the promotion: the restart promotes it (the old slot
    drains), with an ``operation_resumed`` event."""
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller)
    await controller.redeploy("app", {"ref": "v2", "auto_promote": False})
    assert await controller.wait("app", 10)
    await controller.stop()
    assert await states(services) == {Color.BLUE: S.PROMOTED, Color.GREEN: S.HEALTHY}
    # Without auto_promote, HEALTHY is where the slot is meant to stay.
    quiet = Controller.from_services(services)
    await quiet.start()
    assert await states(services) == {Color.BLUE: S.PROMOTED, Color.GREEN: S.HEALTHY}
    await quiet.stop()
    green = await services.store.get_slot("app", Color.GREEN)
    revision = await services.store.get_revision(green.revision_id or "")
    assert revision is not None and revision.spec is not None
    meant = msgspec.structs.replace(
        revision, spec=msgspec.structs.replace(revision.spec, auto_promote=True)
    )
    # Give the slot the auto_promote revision a deploy that was cut short would have had.
    moved = msgspec.structs.replace(meant, id=meant.id + "-auto")
    await services.store.add_revision(moved)
    await services.store.save_slot(msgspec.structs.replace(green, revision_id=moved.id))
    restarted = Controller.from_services(services)
    await restarted.start()
    assert await restarted.wait("app", 10)
    assert await states(services) == {Color.BLUE: S.DRAINING, Color.GREEN: S.PROMOTED}
    resumed = [e for e in await services.store.list_events("app") if e.kind == "operation_resumed"]
    assert [e.data["operation"] for e in resumed] == ["promote"]
    await restarted.stop()


async def test_resume_finishes_a_requested_delete(services: Services) -> None:
    controller = Controller.from_services(services)
    await controller.start()
    await deploy(controller)
    await controller.stop()
    await controller.ops.event("app", "delete_requested")
    restarted = Controller.from_services(services)
    await restarted.start()
    assert await services.store.get_deployment("app") is None
    assert await services.runtime.list(services.labels()) == []
    assert await services.store.list_leases() == {}
    await restarted.stop()
