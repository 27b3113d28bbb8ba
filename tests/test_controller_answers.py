"""The controller answers (fast, on the fake runtime and source): a deploy ends in a
:class:`~dockyard.core.views.DeployOutcome` (URL, commit, image, promoted slot, or why it
failed), a deployment renders from :meth:`Controller.state` with the one promoted URL, and
``delete(missing_ok=True)`` removes what an id whose record is gone left behind. The real
engines prove the same path end to end in ``test_evaluation_e2e.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dockyard.core.controller import Controller
from dockyard.core.errors import NotFound
from dockyard.core.models import Color, DeploymentSpec, HealthCheck, SlotState
from dockyard.core.runtime import LABEL_DEPLOYMENT, ContainerSpec
from dockyard.core.views import promoted_url
from tests.fakes import FakeRuntime, started_services


@pytest_asyncio.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    ports = {"port_range_start": 62330, "port_range_end": 62340}
    async with started_services(tmp_path, FakeRuntime(), **ports) as services:
        controller = Controller.from_services(services)
        await controller.start()
        try:
            yield controller
        finally:
            await controller.stop()


def spec(deployment_id: str = "app", **fields: Any) -> DeploymentSpec:
    health = fields.pop("health", HealthCheck(interval_s=0.02, timeout_s=0.5, deadline_s=2))
    return DeploymentSpec(
        id=deployment_id, repo="https://github.com/acme/agent", ref="v1", health=health, **fields
    )


async def test_a_deploy_answers_with_its_url_commit_and_image(controller: Controller) -> None:
    await controller.create(spec())
    outcome = await controller.finished("app", 10)
    assert outcome.ok and outcome.reason is None
    assert outcome.promoted is Color.BLUE
    slot = await controller.services.store.get_slot("app", Color.BLUE)
    assert outcome.url == f"http://127.0.0.1:{slot.host_port}"
    revision = await controller.services.store.get_revision(slot.revision_id or "")
    assert revision is not None
    assert outcome.commit == revision.commit and outcome.image == revision.image_tag
    assert outcome.image_reused is False
    state = await controller.state("app")
    assert state.url == outcome.url == promoted_url(controller.services.router, "app", slot)
    assert state.promoted is not None and state.promoted.color is Color.BLUE
    assert [(s.slot.color, s.commit) for s in state.slots] == [
        (Color.BLUE, revision.commit),
        (Color.GREEN, None),
    ]
    assert state.operation is not None and state.operation.kind == "deploy"
    assert not state.operation.running and state.operation.waiting_for_drain is None


async def test_a_failed_build_answers_why_and_keeps_the_commit(controller: Controller) -> None:
    await controller.create(spec(build_args={"BUILD": "fail"}))
    outcome = await controller.finished("app", 10)
    assert not outcome.ok and outcome.url is None and outcome.promoted is None
    assert outcome.reason == "build_failed"
    assert outcome.message and "build failed on request" in outcome.message
    assert outcome.commit is not None and len(outcome.commit) == 40  # fetched before it failed
    assert outcome.image is None
    assert [p.name for p in controller.build_logs("app")] == ["blue.log"]


async def test_a_failed_redeploy_fails_while_the_old_slot_serves(controller: Controller) -> None:
    await controller.create(spec())
    first = await controller.finished("app", 10)
    assert first.ok
    await controller.redeploy("app", {"ref": "v2", "build_args": {"BUILD": "fail"}})
    second = await controller.finished("app", 10)
    assert not second.ok and second.reason == "build_failed"
    assert (second.url, second.promoted) == (first.url, Color.BLUE)  # still serving
    assert second.commit is not None and second.commit != first.commit
    await controller.redeploy("app", {"ref": "v3", "build_args": {}})
    third = await controller.finished("app", 10)
    assert third.ok and third.promoted is Color.GREEN and third.reason is None


async def test_finished_is_bounded(controller: Controller) -> None:
    # Never healthy: the deploy keeps probing for 30 s.
    health = HealthCheck(interval_s=0.05, deadline_s=30)
    await controller.create(spec(health=health, build_args={"HEALTH": "fail"}))
    with pytest.raises(TimeoutError):
        await controller.finished("app", 0.2)
    await controller.delete("app")


async def test_delete_leaves_nothing_and_missing_ok_removes_leftovers(
    controller: Controller,
) -> None:
    store, runtime = controller.services.store, controller.services.runtime
    await controller.create(spec())
    assert (await controller.finished("app", 10)).ok
    await controller.delete("app")
    assert await runtime.list(controller.services.labels(**{LABEL_DEPLOYMENT: "app"})) == []
    assert await store.list_leases() == {}
    assert controller.build_logs("app") == []
    with pytest.raises(NotFound):
        await controller.delete("app")
    # What a lost record left under an id: a container, a port lease.
    port = await store.lease_port("ghost:blue")
    labels = controller.services.labels(**{LABEL_DEPLOYMENT: "ghost"})
    await runtime.run(
        ContainerSpec(name="dockyard-ghost-blue", image="x", container_port=8080, labels=labels)
    )
    await controller.delete("ghost", missing_ok=True)
    assert await runtime.list(labels) == []
    assert port not in await store.list_leases()
    outcome = await controller.outcome("ghost")
    assert outcome.reason == "not_promoted" and outcome.commit is None


async def test_remove_labelled_keeps_the_ids_asked_for(controller: Controller) -> None:
    for name in ("one", "two"):
        await controller.create(spec(name, labels={"example_flow": "x"}))
        assert (await controller.finished(name, 10)).ok
    removed = await controller.remove_labelled("example_flow", keep={"two"})
    assert removed == ["one"]
    assert [d.id for d in await controller.deployments()] == ["two"]
    state = await controller.state("two")
    assert state.promoted is not None and state.promoted.state is SlotState.PROMOTED
