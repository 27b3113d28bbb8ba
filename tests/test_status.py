"""``GET /v1/status``: one page of deployments from one store query, a cursor, filters.

The store side (pages, filters, one snapshot) is pinned for every store by the contract
suite (``dockyard.testing.store_contract``); these tests pin the HTTP surface on the
fast fake runtime and source: small items, a cursor that walks every deployment once,
``state`` and ``evaluation`` filters, and a clear 400 naming the field for bad input.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dockyard.core import hookimpl
from dockyard.core.models import DeploymentSpec, Event, SlotState
from dockyard.core.states import transition
from dockyard.core.store import StatusFilter
from dockyard.plugins.sqlite_store import SqliteStore

FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 1, "deadline_s": 3}


def _deploy(client: Any, deployment_id: str, **fields: Any) -> dict[str, Any]:
    spec = {
        "id": deployment_id,
        "repo": "https://github.com/acme/agent",
        "ref": "v1",
        "health": FAST_HEALTH,
        **fields,
    }
    r = client.post("/v1/repos?wait=true", json=spec)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _walk(client: Any, query: str) -> list[str]:
    """Every id the status list gives, page by page, following the cursor."""
    ids: list[str] = []
    cursor = None
    for _ in range(50):
        url = f"/v1/status?{query}" + (f"&cursor={cursor}" if cursor else "")
        r = client.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        ids += [d["id"] for d in body["deployments"]]
        cursor = body["cursor"]
        if cursor is None:
            return ids
    raise AssertionError("the cursor never ended")


def test_status_pages_filters_and_stays_small(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47040, port_range_end=47060) as client:
        full = _deploy(client, "bravo", env={"TOKEN_LIKE": "hidden"})
        _deploy(client, "alpha", labels={"dockyard_evaluation": "ev-1"})
        failed = _deploy(client, "charlie", ref="missing")
        assert failed["slots"][0]["state"] == "FAILED"
        _deploy(client, "delta")

        r = client.get("/v1/status")
        assert r.status_code == 200
        body = r.json()
        assert body["cursor"] is None
        items = {d["id"]: d for d in body["deployments"]}
        assert list(items) == ["alpha", "bravo", "charlie", "delta"]
        bravo = items["bravo"]
        # The list item: what the CLI shows, nothing more (no spec, no env names).
        assert set(bravo) == {
            "id",
            "repo",
            "ref",
            "generation",
            "updated_at",
            "promoted",
            "url",
            "slots",
            "operation",
        }
        assert "hidden" not in r.text and "TOKEN_LIKE" not in r.text
        assert bravo["promoted"] == full["promoted"] == "blue"
        assert bravo["url"] == full["url"]
        assert (bravo["repo"], bravo["ref"]) == ("https://github.com/acme/agent", "v1")
        blue, green = bravo["slots"]
        assert (blue["color"], green["color"]) == ("blue", "green")
        assert blue["commit"] == full["slots"][0]["commit"] and len(blue["commit"]) == 40
        assert blue["host_port"] == full["slots"][0]["host_port"]
        assert blue["health"] == full["slots"][0]["health"]
        assert green == {
            "color": "green",
            "state": "IDLE",
            "commit": None,
            "host_port": None,
            "health": {
                "status": "unknown",
                "last_latency_ms": None,
                "consecutive_failures": 0,
                "checked_at": None,
            },
            "reason": None,
            "message": None,
        }
        assert items["charlie"]["slots"][0]["reason"] == "ref_not_found"
        assert items["charlie"]["operation"]["kind"] == "deploy"

        for limit in (1, 2, 3, 4, 1000):
            assert _walk(client, f"limit={limit}") == ["alpha", "bravo", "charlie", "delta"]
        page = client.get("/v1/status?limit=2").json()
        assert [d["id"] for d in page["deployments"]] == ["alpha", "bravo"]
        assert page["cursor"] == "bravo"

        assert _walk(client, "limit=1&state=PROMOTED") == ["alpha", "bravo", "delta"]
        assert _walk(client, "limit=1&state=FAILED") == ["charlie"]
        assert _walk(client, "state=DRAINING") == []
        assert _walk(client, "limit=1&evaluation=true") == ["alpha"]
        assert _walk(client, "limit=1&evaluation=false") == ["bravo", "charlie", "delta"]
        assert _walk(client, "state=PROMOTED&evaluation=false") == ["bravo", "delta"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=many", "limit"),
        ("state=SLEEPING", "state"),
        ("evaluation=maybe", "evaluation"),
        ("cursor=Not%20An%20Id", "cursor"),
    ],
)
def test_status_refuses_bad_parameters_naming_them(
    fake_client_factory: Any, query: str, field: str
) -> None:
    with fake_client_factory() as client:
        r = client.get(f"/v1/status?{query}")
        assert r.status_code == 400, r.text
        assert field in r.json()["message"]


class TeamFilter:
    """A plugin whose own label answers ``evaluation=`` (the evaluation plugin disabled)."""

    @hookimpl
    def dockyard_register_status_filters(self, register: Any) -> None:
        register("evaluation", "team")


def test_the_evaluation_filter_tests_the_label_a_plugin_registers(
    fake_client_factory: Any,
) -> None:
    """``evaluation=`` names a status filter (``dockyard_register_status_filters``): its
    label comes from the plugin that registers it, not from the API."""
    ports = {"port_range_start": 47062, "port_range_end": 47080}
    with fake_client_factory(
        extra_plugins=[("team", TeamFilter())], disable=["evaluation"], **ports
    ) as client:
        _deploy(client, "alpha", labels={"team": "x"})
        _deploy(client, "bravo", labels={"dockyard_evaluation": "ev-1"})
        assert _walk(client, "evaluation=true") == ["alpha"]
        assert _walk(client, "evaluation=false") == ["bravo"]
    with fake_client_factory(disable=["evaluation"], **ports) as client:
        assert _walk(client, "") == ["alpha", "bravo"]
        r = client.get("/v1/status?evaluation=true")
        assert r.status_code == 400, r.text
        assert r.json()["message"] == "evaluation: no loaded plugin registers this status filter"


async def test_the_client_walks_every_page(tmp_path: Any) -> None:
    """``DockyardClient.status_all`` (what ``dockyard status`` prints) follows the cursor
    over real HTTP."""
    from dockyard.client import DockyardClient
    from dockyard.core.config import Settings
    from dockyard.core.models import DeploymentSpec
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services
    from tests.conftest import AUTH, TEST_SETTINGS
    from tests.fakes import FakeRuntime, FakeSource
    from tests.test_evaluation_client import live_dockyard

    cfg = Settings(data_dir=str(tmp_path / "data"), **TEST_SETTINGS)
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=FakeRuntime(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    with live_dockyard(cfg, services) as (url, app):
        loop = app.state.loop
        for name in ("c", "a", "b", "labelled"):
            labels = {"dockyard_evaluation": "ev-1"} if name == "labelled" else {}
            spec = DeploymentSpec(id=name, repo="https://github.com/acme/x", labels=labels)
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(services.store.create_deployment(spec), loop)
            )
        token = AUTH["Authorization"].removeprefix("Bearer ")
        async with DockyardClient(url, token=token) as client:
            every = await client.status_all(page_size=1)
            assert [d["id"] for d in every] == ["a", "b", "c", "labelled"]
            others = await client.status_all(page_size=2, evaluation=False)
            assert [d["id"] for d in others] == ["a", "b", "c"]
            page = await client.status(limit=3)
            assert page["cursor"] == "c"


async def test_a_repeated_status_read_is_served_until_any_connection_writes(
    tmp_path: Any,
) -> None:
    """The SQLite store keeps a page read with nothing written since (a dict lookup, no
    thread, no query); any write drops it: one through this store, and one through a
    second store on the same file (another process's connection: ``data_version``)."""
    ours, theirs = SqliteStore(tmp_path / "db"), SqliteStore(tmp_path / "db")
    await ours.open()
    await theirs.open()
    try:
        for i in range(3):
            await ours.create_deployment(DeploymentSpec(id=f"d{i}", repo="https://x.test/r"))
        first = await ours.list_status(limit=2)
        assert [d.id for d in first.deployments] == ["d0", "d1"]
        assert await ours.list_status(limit=2) is first  # nothing written: the same page
        assert (await ours.list_status(limit=3)).cursor is None  # another query, its own
        failed = StatusFilter(state=SlotState.FAILED)
        assert (await ours.list_status(limit=2, where=failed)).deployments == []

        await ours.create_deployment(DeploymentSpec(id="a0", repo="https://x.test/r"))
        mine = await ours.list_status(limit=2)
        assert [d.id for d in mine.deployments] == ["a0", "d0"]

        await theirs.delete_deployment("a0")  # the other connection
        after = await ours.list_status(limit=2)
        assert [d.id for d in after.deployments] == ["d0", "d1"]
        assert await ours.list_status(limit=2) is after

        slot = (await theirs.list_slots("d0"))[0]
        moved = transition(slot, SlotState.BUILDING)
        await theirs.save_slot(
            moved,
            Event(
                deployment_id="d0",
                kind="slot_transition",
                color=slot.color,
                from_state=slot.state,
                to_state=SlotState.BUILDING,
            ),
        )
        seen = await ours.list_status(limit=2)
        assert seen.deployments[0].slots[0].state is SlotState.BUILDING

        await ours.close()
        await ours.open()  # a reopened store starts with nothing kept
        assert [d.id for d in (await ours.list_status(limit=2)).deployments] == ["d0", "d1"]
    finally:
        await ours.close()
        await theirs.close()


def test_a_rendered_page_is_reused_until_the_page_or_an_operation_changes() -> None:
    """The API renders a status page once per store page object and operations' state: the
    same page with the same operations is the same view; a new page object (something was
    written) or an operation that changed renders again, and shows it."""
    from dockyard.api.deployments import _rendered_status
    from dockyard.core.store import DeploymentStatus, StatusPage
    from dockyard.core.views import OperationState

    class Operations:
        """What the status rendering asks a controller: operations and URLs."""

        def __init__(self) -> None:
            self.ops: dict[str, OperationState] = {}

        def operation_state(self, deployment_id: str) -> OperationState | None:
            return self.ops.get(deployment_id)

        def url_for(self, deployment_id: str, promoted: Any) -> str | None:
            return None

    controller: Any = Operations()
    item = DeploymentStatus(
        id="a", repo="r", generation=1, created_at=1.0, updated_at=1.0, slots=[]
    )
    page = StatusPage(deployments=[item])
    query = (None, 100, None, None, None)
    first = _rendered_status(controller, page, query)
    assert _rendered_status(controller, page, query) is first
    controller.ops["a"] = OperationState(
        kind="deploy", running=True, started_at=2.0, finished_at=None, error=None
    )
    running = _rendered_status(controller, page, query)
    assert running is not first and running.deployments[0].operation is not None
    assert running.deployments[0].operation.running
    assert _rendered_status(controller, page, query) is running
    written = StatusPage(deployments=[item])  # an equal page the store read again
    assert _rendered_status(controller, written, query) is not running
