"""Races on one deployment, through the HTTP API on the fast fake runtime and source.

The app is served by uvicorn on loopback in the test's event loop and called over real
connections (``httpx`` + ``asyncio.gather``), so concurrent requests interleave at every
await of their handlers exactly as in production; the test can also await the controller.
The real-engine proof of drains under load is ``tests/test_redeploy_load.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import uvicorn
from litestar import Litestar

from dockyard.api.app import create_app
from dockyard.core import hookimpl
from dockyard.core.config import Settings
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from tests.conftest import AUTH, TEST_SETTINGS, free_port
from tests.fakes import FakeRuntime, FakeSource

FAST_HEALTH = {"interval_s": 0.02, "timeout_s": 1, "deadline_s": 3}
SPEC = {
    "id": "app",
    "repo": "https://github.com/acme/agent",
    "ref": "v0",
    "grace_period_s": 0.2,
    "health": FAST_HEALTH,
}


class Served(httpx.AsyncClient):
    """An HTTP client of a dockyard served on loopback; ``app`` is the served app."""

    app: Litestar


class SlowPolicy:
    """A policy that takes its time (as one asking another service would): admission
    awaits it, so concurrent requests overlap there."""

    @hookimpl
    async def dockyard_check_spec(self, spec: Any) -> None:
        await asyncio.sleep(random.uniform(0, 0.02))


@contextlib.asynccontextmanager
async def api(tmp_path: Path, ports: tuple[int, int]) -> AsyncIterator[Served]:
    cfg = Settings(
        data_dir=str(tmp_path / "data"),
        port_range_start=ports[0],
        port_range_end=ports[1],
        **TEST_SETTINGS,
    )
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False, extra_plugins=[("slow", SlowPolicy())]),
        runtime=FakeRuntime(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    app = create_app(cfg, services=services)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert not serving.done(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
            await asyncio.sleep(0.01)
        async with Served(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as client:
            client.app = app
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=60)


async def test_twenty_concurrent_redeploys_store_the_accepted_request(tmp_path: Path) -> None:
    async with api(tmp_path, (47300, 47310)) as client:
        r = await client.post("/v1/repos?wait=true", json=SPEC)
        assert r.status_code == 200, r.text
        refs = [f"r{i}" for i in range(20)]
        # Each redeploy's probes start after a second: the accepted one still runs when
        # the last request arrives.
        slow = {**FAST_HEALTH, "startup_delay_s": 1}
        answers = await asyncio.gather(
            *(
                client.post("/v1/repos/app/redeploy", json={"ref": ref, "health": slow})
                for ref in refs
            )
        )
        statuses = [a.status_code for a in answers]
        assert sorted(statuses) == [202] + [409] * 19, statuses
        accepted = refs[statuses.index(202)]
        for answer in answers:
            if answer.status_code == 409:
                assert answer.json()["reason"] == "conflict"
                assert "busy" in answer.json()["message"]

        assert await client.app.state.controller.wait("app", 20)
        body = (await client.get("/v1/repos/app")).json()
        assert body["spec"]["ref"] == accepted
        assert body["operation"]["error"] is None
        events = (await client.get("/v1/repos/app/events")).json()
        requested = [e for e in events if e["kind"] == "redeploy_requested"]
        assert len(requested) == 1, requested
        assert requested[0]["data"]["ref"] == accepted
        assert requested[0]["data"]["changed"] == ["health", "ref"]
        fetched = [e["data"]["ref"] for e in events if e["kind"] == "source_fetched"]
        assert fetched == ["v0", accepted]


async def test_a_refused_redeploy_changes_nothing_while_one_is_admitted(
    tmp_path: Path,
) -> None:
    """A request refused by validation releases the deployment; a valid one after it wins."""
    async with api(tmp_path, (47320, 47330)) as client:
        assert (await client.post("/v1/repos?wait=true", json=SPEC)).status_code == 200
        bad, good = await asyncio.gather(
            client.post("/v1/repos/app/redeploy", json={"ref": "v1", "container_port": 0}),
            client.post("/v1/repos/app/redeploy?wait=true", json={"ref": "v2"}),
        )
        assert bad.status_code in (400, 409), bad.text
        assert good.status_code == 200, good.text
        assert good.json()["spec"]["ref"] == "v2"
        assert good.json()["spec"]["container_port"] == 8000


async def test_create_and_delete_of_one_id_race_without_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="dockyard")
    async with api(tmp_path, (47340, 47360)) as client:
        controller = client.app.state.controller
        runtime = client.app.state.services.runtime
        for round_ in range(30):
            delay = (round_ % 10) * 0.003
            create, remove = await asyncio.gather(
                client.post("/v1/repos", json=SPEC),
                _later(delay, client.delete("/v1/repos/app")),
            )
            assert create.status_code in (202, 409), create.text
            assert remove.status_code in (200, 404, 409), remove.text
            op = controller.operation("app")
            if op is not None:
                assert await controller.wait("app", 10)
                assert op.error is None or op.error["reason"] != "internal_error", op.error
            r = await client.delete("/v1/repos/app")
            assert r.status_code in (200, 404), r.text
            assert (await client.get("/v1/repos/app")).status_code == 404
            assert runtime.containers == {}
            store = client.app.state.services.store
            assert await store.list_leases() == {}
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert crashes == [], [r.getMessage() for r in crashes]


async def _later(delay: float, coro: Any) -> Any:
    await asyncio.sleep(delay)
    return await coro


async def test_a_redeploy_waits_for_the_draining_slot_instead_of_cutting_it_short(
    tmp_path: Path,
) -> None:
    grace = 1.5
    async with api(tmp_path, (47380, 47390)) as client:
        r = await client.post("/v1/repos?wait=true", json={**SPEC, "grace_period_s": grace})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/repos/app/redeploy?wait=true", json={"ref": "v1"})
        slots = {s["color"]: s for s in r.json()["slots"]}
        assert (slots["blue"]["state"], slots["green"]["state"]) == ("DRAINING", "PROMOTED")
        blue_port = slots["blue"]["host_port"]

        # The next redeploy needs blue: it is accepted, and waits out blue's grace period.
        r = await client.post("/v1/repos/app/redeploy", json={"ref": "v2"})
        assert r.status_code == 202, r.text
        body = await _until(client, lambda b: (b["operation"] or {}).get("waiting_for_drain"))
        waiting = body["operation"]["waiting_for_drain"]
        assert waiting["color"] == "blue"
        assert waiting["until"] > time.time()
        # Still serving its old revision while the redeploy waits.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{blue_port}/") as answer,
        ):
            assert answer.status == 200
        assert await client.app.state.controller.wait("app", 10)

        events = (await client.get("/v1/repos/app/events")).json()
        drained = next(
            e for e in events if e["kind"] == "slot_transition" and e["to_state"] == "DRAINING"
        )
        retired = next(
            e
            for e in events
            if e["kind"] == "slot_transition"
            and e["color"] == "blue"
            and e["to_state"] == "RETIRED"
        )
        assert retired["at"] - drained["at"] >= grace - 0.05
        assert retired["message"] == "grace period over"
        wait_events = [e for e in events if e["kind"] == "drain_wait"]
        assert len(wait_events) == 1 and wait_events[0]["color"] == "blue"
        assert 0 < wait_events[0]["data"]["seconds"] <= grace
        assert not any(e.get("message") == "replaced by a new deploy" for e in events)
        final = (await client.get("/v1/repos/app")).json()
        slots = {s["color"]: s for s in final["slots"]}
        assert (slots["blue"]["state"], slots["green"]["state"]) == ("PROMOTED", "DRAINING")
        assert final["operation"]["waiting_for_drain"] is None


async def test_delete_cancels_a_redeploy_that_waits_for_a_drain(tmp_path: Path) -> None:
    async with api(tmp_path, (47400, 47410)) as client:
        await client.post("/v1/repos?wait=true", json={**SPEC, "grace_period_s": 60})
        await client.post("/v1/repos/app/redeploy?wait=true", json={"ref": "v1"})
        r = await client.post("/v1/repos/app/redeploy", json={"ref": "v2"})
        assert r.status_code == 202
        await _until(client, lambda b: (b["operation"] or {}).get("waiting_for_drain"))
        started = time.monotonic()
        assert (await client.delete("/v1/repos/app")).status_code == 200
        assert time.monotonic() - started < 10
        assert client.app.state.services.runtime.containers == {}


async def _until(client: Served, check: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = (await client.get("/v1/repos/app")).json()
        if check(body):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


async def test_concurrent_deletes_remove_once_and_refuse_new_operations(tmp_path: Path) -> None:
    async with api(tmp_path, (47420, 47430)) as client:
        await client.post("/v1/repos?wait=true", json=SPEC)
        first, second, redeploy = await asyncio.gather(
            client.delete("/v1/repos/app"),
            client.delete("/v1/repos/app"),
            _later(0.001, client.post("/v1/repos/app/redeploy", json={"ref": "v1"})),
        )
        assert sorted([first.status_code, second.status_code]) == [200, 404]
        assert redeploy.status_code in (404, 409), redeploy.text
        assert (await client.get("/v1/repos/app")).status_code == 404
        assert client.app.state.services.runtime.containers == {}
        assert await client.app.state.services.store.list_leases() == {}


async def test_refused_creates_leave_no_lock_behind(tmp_path: Path) -> None:
    async with api(tmp_path, (47440, 47450)) as client:
        for i in range(5):
            body = {**SPEC, "id": f"bad-{i}", "resources": {"memory_mb": 60000}}
            r = await client.post("/v1/repos", json=body)
            assert r.status_code == 422, r.text
        assert client.app.state.controller._locks == {}
        assert (await client.post("/v1/repos?wait=true", json=SPEC)).status_code == 200
        assert set(client.app.state.controller._locks) == {"app"}
