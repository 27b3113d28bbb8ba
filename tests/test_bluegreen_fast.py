"""Blue/green orchestration through the HTTP API, on the fast fake runtime and source.

The real-Podman end-to-end proof is ``tests/test_e2e_podman.py``; these tests pin the
strategy's logic quickly, including a hypothesis state machine over random operations.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dockyard.core.config import Settings
from dockyard.core.controller import Controller
from dockyard.core.errors import Conflict
from dockyard.core.models import DeploymentSpec, SlotState
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from dockyard.core.states import is_legal
from tests.fakes import FakeRuntime, FakeSource

FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 1, "deadline_s": 3}
SPEC = {
    "id": "app",
    "repo": "https://github.com/acme/agent",
    "ref": "v1",
    "grace_period_s": 0.3,
    "health": FAST_HEALTH,
}


def _get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def _call(client: Any, fn: Any, *args: Any) -> Any:
    with client.portal() as portal:
        return portal.call(fn, *args)


def _slots(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["color"]: s for s in body["slots"]}


def _wait_for(client: Any, check: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/v1/repos/app").json()
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_deploy_redeploy_fail_switch_delete(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47000, port_range_end=47010) as client:
        services = client.app.state.services
        r = client.post("/v1/repos?wait=true", json=SPEC)
        assert r.status_code == 200, r.text
        body = r.json()
        blue = _slots(body)["blue"]
        assert body["promoted"] == "blue" and blue["state"] == "PROMOTED"
        v1_port = blue["host_port"]
        assert _get(v1_port).startswith("app-")
        assert body["url"] == f"http://127.0.0.1:{v1_port}"
        assert body["spec"]["env"] == {}

        # v2 goes to green; blue drains, then retires after the grace period.
        r = client.post("/v1/repos/app/redeploy?wait=true", json={"ref": "v2"})
        assert r.status_code == 200, r.text
        slots = _slots(r.json())
        assert slots["green"]["state"] == "PROMOTED"
        assert slots["blue"]["state"] == "DRAINING"
        assert _get(v1_port)  # still answering while it drains
        body = _wait_for(
            client,
            lambda b: (
                _slots(b)["blue"]["state"] == "RETIRED" and _slots(b)["blue"]["host_port"] is None
            ),
        )
        assert _slots(body)["blue"]["state"] == "RETIRED"
        assert _slots(body)["blue"]["host_port"] is None
        with pytest.raises(OSError):
            _get(v1_port)
        v2_port = _slots(body)["green"]["host_port"]
        leases = _call(client, services.store.list_leases)
        assert leases == {v2_port: "app:green"}

        # v3 never gets healthy: FAILED, v2 keeps serving, nothing of v3 is left.
        r = client.post(
            "/v1/repos/app/redeploy?wait=true",
            json={
                "ref": "v3",
                "build_args": {"HEALTH": "fail"},
                "health": {**FAST_HEALTH, "deadline_s": 0.5},
            },
        )
        slots = _slots(r.json())
        assert slots["blue"]["state"] == "FAILED"
        assert slots["blue"]["reason"] == "health_check_failed"
        assert "not healthy within 0.5 s" in slots["blue"]["message"]
        assert slots["green"]["state"] == "PROMOTED"
        assert _get(v2_port)
        assert _call(client, services.store.list_leases) == {v2_port: "app:green"}
        names = [c.name for c in services.runtime.containers.values()]
        assert names == ["dockyard-app-green"]

        events = client.get("/v1/repos/app/events").json()
        kinds = [(e["kind"], e.get("to_state")) for e in events]
        assert ("slot_transition", "FAILED") in kinds
        assert all(
            is_legal(SlotState(e["from_state"]), SlotState(e["to_state"]))
            for e in events
            if e["kind"] == "slot_transition"
        )

        # Logs, ANSI stripped on request, and the build log.
        logs = client.get("/v1/repos/app/logs?slot=green&strip_ansi=true").json()
        assert logs["lines"] == ["log of dockyard-app-green"]
        raw = client.get("/v1/repos/app/logs?slot=green").json()
        assert raw["lines"][0].startswith("\x1b[32m")
        build = client.get("/v1/repos/app/logs?slot=green&build=true").json()
        assert build["source"] == "build" and build["lines"]

        # delete: no container, port lease or record left.
        r = client.delete("/v1/repos/app")
        assert r.status_code == 200 and r.json() == {"deleted": "app"}
        assert services.runtime.containers == {}
        assert _call(client, services.store.list_leases) == {}
        assert client.get("/v1/repos/app").status_code == 404
        assert client.get("/v1/repos/app/events").status_code == 404


def test_switch_rolls_back_to_a_draining_then_a_retired_revision(
    fake_client_factory: Any,
) -> None:
    with fake_client_factory(port_range_start=47020, port_range_end=47030) as client:
        services = client.app.state.services
        client.post("/v1/repos?wait=true", json={**SPEC, "grace_period_s": 2})
        client.post("/v1/repos/app/redeploy?wait=true", json={"ref": "v2"})
        builds = services.runtime.builds
        # blue (v1) still drains: switch promotes it at once.
        r = client.post("/v1/repos/app/switch?wait=true")
        slots = _slots(r.json())
        assert (slots["blue"]["state"], slots["green"]["state"]) == ("PROMOTED", "DRAINING")
        assert _get(slots["blue"]["host_port"]).startswith("app-")
        # Redeploy v1 again with a short grace (it first waits out green's drain), then
        # switch back to the retained revision of the slot that retired.
        client.post("/v1/repos/app/redeploy?wait=true", json={"grace_period_s": 0.1})
        body = _wait_for(client, lambda b: "RETIRED" in {s["state"] for s in b["slots"]})
        retired = next(s for s in body["slots"] if s["state"] == "RETIRED")
        r = client.post("/v1/repos/app/switch?wait=true")
        slots = _slots(r.json())
        assert slots[retired["color"]]["state"] == "PROMOTED"
        assert slots[retired["color"]]["revision_id"] == retired["revision_id"]
        assert services.runtime.builds == builds  # images reused, nothing rebuilt


def test_a_second_operation_on_a_busy_deployment_gets_409(fake_client_factory: Any) -> None:
    slow = {**SPEC, "build_args": {"HEALTH": "fail"}, "health": {**FAST_HEALTH, "deadline_s": 2}}
    with fake_client_factory(port_range_start=47040, port_range_end=47050) as client:
        assert client.post("/v1/repos", json=slow).status_code == 202
        r = client.post("/v1/repos/app/redeploy", json={"ref": "v2"})
        assert r.status_code == 409
        assert r.json()["reason"] == "conflict"
        assert "busy" in r.json()["message"]
        assert client.post("/v1/repos/app/switch").status_code == 409
        # another deployment proceeds in parallel
        r = client.post("/v1/repos?wait=true", json={**SPEC, "id": "other"})
        assert r.status_code == 200 and r.json()["promoted"] == "blue"
        # delete cancels the running operation and removes everything
        assert client.delete("/v1/repos/app").status_code == 200
        assert client.get("/v1/repos/app").status_code == 404


def test_create_twice_is_409_and_unknown_is_404(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47060, port_range_end=47070) as client:
        assert client.post("/v1/repos?wait=true", json=SPEC).status_code == 200
        r = client.post("/v1/repos", json=SPEC)
        assert r.status_code == 409
        assert "exists" in r.json()["message"]
        for method, path in [
            ("get", "/v1/repos/nope"),
            ("post", "/v1/repos/nope/switch"),
            ("post", "/v1/repos/nope/redeploy"),
            ("delete", "/v1/repos/nope"),
            ("get", "/v1/repos/nope/logs"),
        ]:
            r = getattr(client, method)(path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["reason"] == "not_found"


def test_a_build_failure_and_a_missing_ref_end_failed_with_their_reason(
    fake_client_factory: Any,
) -> None:
    with fake_client_factory(port_range_start=47080, port_range_end=47090) as client:
        r = client.post("/v1/repos?wait=true", json={**SPEC, "build_args": {"BUILD": "fail"}})
        blue = _slots(r.json())["blue"]
        assert (blue["state"], blue["reason"]) == ("FAILED", "build_failed")
        assert r.json()["operation"]["error"]["reason"] == "build_failed"
        r = client.post(
            "/v1/repos/app/redeploy?wait=true", json={"ref": "missing", "build_args": {}}
        )
        states = {s["reason"] for s in r.json()["slots"]}
        assert "ref_not_found" in states
        assert _call(client, client.app.state.services.store.list_leases) == {}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**SPEC, "id": "Bad_Id"}, "id"),
        ({**SPEC, "container_port": 0}, "container_port"),
        ({**SPEC, "health": {"deadline_s": -1}}, "deadline_s"),
        ({**SPEC, "env": {"BAD NAME": "x"}}, "env"),
        ({**SPEC, "surprise": 1}, "surprise"),
        ({**SPEC, "subdir": "../etc"}, "subdir"),
        ({"repo": "https://github.com/a/b"}, "id"),
        ({**SPEC, "repo": "https://github.com/a/b/c/d"}, "repo"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(
    fake_client_factory: Any, body: dict[str, Any], field: str
) -> None:
    with fake_client_factory() as client:
        r = client.post("/v1/repos", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert field in r.json()["message"], r.json()


def test_bad_query_values_and_bodies(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47100, port_range_end=47110) as client:
        client.post("/v1/repos?wait=true", json=SPEC)
        r = client.get("/v1/repos/app/logs?tail=0")
        assert r.status_code == 400 and "tail" in r.json()["message"]
        r = client.get("/v1/repos/app/logs?slot=purple")
        assert r.status_code == 400 and "slot" in r.json()["message"]
        r = client.post("/v1/repos?timeout=99999", json=SPEC)
        assert r.status_code == 400 and "timeout" in r.json()["message"]
        r = client.post("/v1/repos/app/redeploy", json={"ref": "v2", "nope": True})
        assert r.status_code == 400 and "nope" in r.json()["message"]
        r = client.post(
            "/v1/repos", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        r = client.post(
            "/v1/repos",
            content=b"x" * (2 * 1024 * 1024),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        r = client.get("/v1/repos/" + "x" * 100)
        assert r.status_code == 400 and "id" in r.json()["message"]


# ----------------------------------------------------------------------------------------
# A hypothesis state machine over random deploys, failures, switches and drains.
# ----------------------------------------------------------------------------------------


class BlueGreenMachine(RuleBasedStateMachine):
    """Random operations on one deployment; invariants hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="dockyard-sm-"))
        self.loop = asyncio.new_event_loop()
        cfg = Settings(
            data_dir=str(self.tmp),
            monitor_interval_s=0,
            port_range_start=47200,
            port_range_end=47205,
        )
        self.runtime = FakeRuntime()
        self.services = Services.build(
            cfg,
            build_plugin_manager(load_entry_points=False),
            runtime=self.runtime,
            sources={"fake": FakeSource(self.tmp / "src")},
        )
        self.run(self.services.start())
        self.controller = Controller.from_services(self.services)
        self.run(self.controller.start())
        self.version = 0
        self.run(
            self.controller.create(
                DeploymentSpec(
                    id="sm",
                    repo="https://github.com/acme/agent",
                    ref="v0",
                    grace_period_s=0.05,
                    health=_health(0.4),
                )
            )
        )
        self.run(self.controller.wait("sm", 10))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(healthy=st.booleans())
    def deploy(self, healthy: bool) -> None:
        self.version += 1
        changes: dict[str, Any] = {
            "ref": f"v{self.version}",
            "build_args": {} if healthy else {"HEALTH": "fail"},
        }
        self.run(self.controller.redeploy("sm", changes))
        self.run(self.controller.wait("sm", 10))

    @rule()
    def switch(self) -> None:
        try:
            self.run(self.controller.switch("sm"))
        except Conflict:
            return
        self.run(self.controller.wait("sm", 10))

    @rule(seconds=st.sampled_from([0.0, 0.1]))
    def let_time_pass(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    @invariant()
    def at_most_one_promoted_and_ports_unique(self) -> None:
        store = self.services.store
        slots = self.run(store.list_slots("sm"))
        assert sum(s.state is SlotState.PROMOTED for s in slots) <= 1
        ports = [s.host_port for s in slots if s.host_port is not None]
        assert len(ports) == len(set(ports))
        leases = self.run(store.list_leases())
        assert sorted(leases) == sorted(ports)
        running = {c.name for c in self.runtime.containers.values() if c.running}
        timers = self.controller._timers
        for s in slots:
            timer = timers.get(("sm", s.color))
            if timer is not None and not timer[0].done():
                continue  # a drain is being retired right now
            has = s.state in (
                SlotState.STAGING,
                SlotState.HEALTHY,
                SlotState.PROMOTED,
                SlotState.DRAINING,
            )
            assert (s.container_name in running) == has, (s, running)

    @invariant()
    def only_legal_transitions(self) -> None:
        for e in self.run(self.services.store.list_events("sm")):
            if e.kind == "slot_transition":
                assert e.from_state is not None and e.to_state is not None
                assert is_legal(e.from_state, e.to_state)

    def teardown(self) -> None:
        self.run(self.controller.stop())
        self.run(self.runtime.close())
        self.run(self.services.close())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _health(deadline: float) -> Any:
    from dockyard.core.models import HealthCheck as Probe

    return Probe(interval_s=0.02, timeout_s=0.5, deadline_s=deadline)


TestBlueGreenMachine = BlueGreenMachine.TestCase
TestBlueGreenMachine.settings = settings(
    max_examples=12,
    stateful_step_count=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
