"""Chaos: dockyard is SIGKILLed right after each event of each flow, restarted on the same
data directory, and must come back whole.

Real Podman, the Caddy router, ``dockyard serve`` as a child process (``tests/serve.py``)
with a test plugin (loaded through a ``dockyard`` entry point) whose ``dockyard_event`` hook
kills the process when the armed event arrives. The points are not hand-picked: a dry run of
every flow (deploy, redeploy, switch, delete, evaluation) records the events each emits, and
every one of them becomes a kill point. After each restart the invariants are checked:

- at most one PROMOTED slot per deployment;
- a deployment that was served before the kill is served again through the proxy;
- no container, port lease, route or process without an owner;
- every evaluation final and cleaned up;
- every recorded intent resumed or closed with a reason: no slot left mid-operation, no
  HEALTHY slot of an ``auto_promote`` deploy left unpromoted, no stored generation that no
  slot built, no requested delete left undone, every FAILED slot with its reason.

The table of points and results is printed (``pytest -s``) and the test fails on any miss.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gitserver import GitDaemon, RepoBuilder
from tests.serve import Served, alive, install_plugin
from tests.serve import start_time as process_start_time
from tests.test_evaluation_e2e import agent as eval_agent
from tests.test_stop import HEALTH, agent, engine_containers, podman_required

pytestmark = [pytest.mark.podman, pytest.mark.slow]

PLUGIN = '''\
"""Test plugin: SIGKILL dockyard right after the armed event (the chaos test)."""
import json
import os
import signal
from pathlib import Path

from dockyard.core.hookspecs import hookimpl

DIR = Path(os.environ["DOCKYARD_CHAOS_DIR"])


def point(event):
    if event.kind == "slot_transition":
        return f"{event.from_state}>{event.to_state}"
    return event.kind


@hookimpl
def dockyard_event(event):
    key = point(event)
    with open(DIR / "seen.jsonl", "a") as f:
        f.write(json.dumps({"point": key, "deployment": event.deployment_id}) + "\\n")
    try:
        armed = json.loads((DIR / "armed.json").read_text())
    except (OSError, ValueError):
        return
    if armed["point"] == key and event.deployment_id.startswith(armed["deployment"]):
        (DIR / "armed.json").unlink()
        (DIR / "killed.json").write_text(
            json.dumps({"point": key, "deployment": event.deployment_id, "seq": event.seq})
        )
        os.kill(os.getpid(), signal.SIGKILL)
'''
FLOWS = ["deploy", "redeploy", "switch", "delete", "evaluation"]
WORKING = {"BUILDING", "STAGING"}
RUNNING = {"HEALTHY", "PROMOTED", "DRAINING"}
FINAL = {"finished", "failed", "cancelled", "expired"}
TIMEOUTS = {"health_s": 15, "health_interval_s": 0.2, "task_s": 10, "request_s": 8}


class Chaos:
    """One dockyard under test, its repositories and the kill switch."""

    def __init__(self, served: Served, control: Path, repo_url: str, eval_url: str) -> None:
        self.served = served
        self.control = control
        self.repo_url = repo_url
        self.eval_url = eval_url
        self.commits: dict[str, str] = {}
        self.ids_used: set[str] = set()
        self.timings: list[list[tuple[str, float]]] = []

    # -- flows ---------------------------------------------------------------------------
    def deploy(self, deployment_id: str, *, wait: bool) -> None:
        self.ids_used.add(deployment_id)
        query = "?wait=true&timeout=120" if wait else ""
        status, body = self.served.request(
            "POST",
            f"/v1/repos{query}",
            {
                "id": deployment_id,
                "repo": self.repo_url,
                "ref": self.commits["v1"],
                "health": HEALTH,
                "grace_period_s": 0,
            },
            timeout=150,
        )
        assert status in (200, 202), body
        if wait:
            assert body["promoted"] is not None, (body["operation"], body["slots"])

    def redeploy(self, deployment_id: str, *, wait: bool) -> None:
        query = "?wait=true&timeout=120" if wait else ""
        status, body = self.served.request(
            "POST",
            f"/v1/repos/{deployment_id}/redeploy{query}",
            {"ref": self.commits["v2"]},
            timeout=150,
        )
        assert status in (200, 202), body

    def setup(self, flow: str, deployment_id: str) -> None:
        """Bring ``deployment_id`` to where ``flow`` starts."""
        if flow in ("redeploy", "switch", "delete"):
            self.deploy(deployment_id, wait=True)
        if flow == "switch":
            self.redeploy(deployment_id, wait=True)
        self.settle()

    def trigger(self, flow: str, deployment_id: str) -> None:
        """Start ``flow``; the request itself may be cut short by the kill."""
        try:
            if flow == "deploy":
                self.deploy(deployment_id, wait=False)
            elif flow == "redeploy":
                self.redeploy(deployment_id, wait=False)
            elif flow == "switch":
                status, body = self.served.request("POST", f"/v1/repos/{deployment_id}/switch", {})
                assert status == 202, body
            elif flow == "delete":
                status, body = self.served.request("DELETE", f"/v1/repos/{deployment_id}")
                assert status == 200, body
            else:
                status, body = self.served.request(
                    "POST",
                    "/v1/integration/evaluate-miner",
                    {
                        "miner": {"github_url": self.eval_url, "ref": self.commits["eval"]},
                        "tasks": [{"id": "t1", "prompt": "open", "url": "http://site.test/"}],
                        "timeouts": TIMEOUTS,
                    },
                )
                assert status == 202, body
        except Exception as exc:  # the kill may cut the request short
            process = self.served.process
            assert process is not None
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{flow} request failed: {exc!r}") from exc

    def prefix(self, flow: str, deployment_id: str) -> str:
        return "ev-" if flow == "evaluation" else deployment_id

    # -- observing -----------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        body = self.served.get("/v1/status")
        assert body is not None, self.served.log_tail()
        return list(body["deployments"])

    def evaluations(self) -> list[dict[str, Any]]:
        body = self.served.get("/v1/integration/evaluations?limit=1000")
        assert body is not None
        return list(body["evaluations"])

    def settled(self) -> bool:
        for view in self.status():
            op = view.get("operation")
            if op and op["running"]:
                return False
            if any(s["state"] in WORKING | {"DRAINING"} for s in view["slots"]):
                return False
        return all(e["state"] in FINAL for e in self.evaluations())

    def settle(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.settled():
            assert time.monotonic() < deadline, f"not settled: {self.status()}"
            time.sleep(0.2)

    def served_ids(self) -> set[str]:
        return {
            v["id"]
            for v in self.status()
            if v["promoted"] and self.served.through_proxy(f"/apps/{v['id']}/health") == 200
        }

    def seen(self) -> list[dict[str, Any]]:
        try:
            lines = (self.control / "seen.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def pid_records(self) -> dict[int, tuple[int | None, str]]:
        """The children the data directory's pid files name, with their start times."""
        found: dict[int, tuple[int | None, str]] = {}
        for path in self.served.data_dir.rglob("*.pid"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found[int(record["pid"])] = (record.get("start_time"), path.name)
        return found

    def delete_all(self) -> None:
        for view in self.status():
            status, body = self.served.request("DELETE", f"/v1/repos/{view['id']}", timeout=90)
            assert status in (200, 404), body
        self.settle()

    # -- invariants ----------------------------------------------------------------------
    def problems(
        self,
        flow: str,
        deployment_id: str,
        served_before: set[str],
        killed_children: dict[int, tuple[int | None, str]],
    ) -> list[str]:
        found: list[str] = []
        views = {v["id"]: v for v in self.status()}
        rows = self.served.query("SELECT deployment_id, body FROM slots")
        slots: dict[str, list[dict[str, Any]]] = {}
        for owner, body in rows:
            slots.setdefault(owner, []).append(json.loads(body))
        for view in views.values():
            promoted = [s for s in view["slots"] if s["state"] == "PROMOTED"]
            if len(promoted) > 1:
                found.append(f"{view['id']}: {len(promoted)} PROMOTED slots")
        # served before -> served again (a finished delete is the one exception)
        for served_id in served_before:
            if served_id not in views:
                if not (flow == "delete" and served_id == deployment_id):
                    found.append(f"{served_id} was served and is gone")
                continue
            deadline = time.monotonic() + 15
            while self.served.through_proxy(f"/apps/{served_id}/health") != 200:
                if time.monotonic() > deadline:
                    found.append(f"{served_id} was served before the kill and is not now")
                    break
                time.sleep(0.2)
        if flow == "delete" and deployment_id in views:
            found.append(f"{deployment_id}: the requested delete was not finished")
        # containers, leases and routes have owners
        owned = {
            s["container_name"]
            for group in slots.values()
            for s in group
            if s["state"] in RUNNING and s.get("container_name")
        }
        containers = set(engine_containers(self.served.data_dir))
        if containers - owned:
            found.append(f"containers without an owner: {sorted(containers - owned)}")
        if owned - containers:
            found.append(f"running slots without a container: {sorted(owned - containers)}")
        lease_owners = {
            s["host_port"]: f"{s['deployment_id']}:{s['color']}"
            for group in slots.values()
            for s in group
            if s["state"] in RUNNING and s.get("host_port")
        }
        for port, owner in self.served.query("SELECT port, owner FROM port_leases"):
            if lease_owners.get(port) != owner:
                found.append(f"lease {port} ({owner}) has no slot")
        killed = self.killed()
        ids = self.ids_used | ({killed["deployment"]} if killed else set())
        for other in ids:
            view = views.get(other)
            if view is None or not view["promoted"]:
                status = self.served.through_proxy(f"/apps/{other}/health")
                if status == 200:
                    found.append(f"{other}: a route answers but nothing is promoted")
        # processes: the killed dockyard's children are gone, the new ones are ours
        if alive(killed_children):
            found.append(f"the killed dockyard's children still run: {alive(killed_children)}")
        ours = self.served.descendants()
        for pid, (started, name) in self.pid_records().items():
            if pid not in ours or process_start_time(pid) != started:
                found.append(f"{name} names pid {pid}, not a child of this dockyard")
        # evaluations final and cleaned up
        for evaluation in self.evaluations():
            if evaluation["state"] not in FINAL or not evaluation.get("cleaned_up"):
                found.append(
                    f"evaluation {evaluation['id']}: {evaluation['state']}, "
                    f"cleaned_up={evaluation.get('cleaned_up')}"
                )
        # intents resumed or closed
        generations = dict(self.served.query("SELECT id, generation FROM deployments"))
        for owner, generation in generations.items():
            built = 0
            events = self.served.query(
                "SELECT kind, body FROM events WHERE deployment_id = ?", owner
            )
            for kind, body in events:
                event = json.loads(body)
                if kind == "delete_requested":
                    found.append(f"{owner}: delete requested, not done")
                if event.get("to_state") == "BUILDING":
                    built = max(built, int(event.get("data", {}).get("generation") or 0))
            if generation > built:
                found.append(f"{owner}: generation {generation} stored, never built")
            for slot in slots.get(owner, []):
                if slot["state"] in WORKING:
                    found.append(f"{owner}/{slot['color']}: left {slot['state']}")
                if slot["state"] == "HEALTHY":
                    found.append(f"{owner}/{slot['color']}: HEALTHY, never promoted")
                if slot["state"] == "FAILED" and not slot.get("reason"):
                    found.append(f"{owner}/{slot['color']}: FAILED without a reason")
        return found

    def killed(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.control / "killed.json").read_text()))
        except (OSError, ValueError):
            return None

    # -- one point -----------------------------------------------------------------------
    def dry_run(self, flow: str, deployment_id: str) -> list[str]:
        """The points ``flow`` emits, in order (no kill)."""
        self.setup(flow, deployment_id)
        before = len(self.seen())
        self.trigger(flow, deployment_id)
        time.sleep(0.5)
        self.settle()
        prefix = self.prefix(flow, deployment_id)
        points: list[str] = []
        for record in self.seen()[before:]:
            if record["deployment"].startswith(prefix) and record["point"] not in points:
                points.append(record["point"])
        self.delete_all()
        return points

    def kill_at(self, flow: str, point: str, deployment_id: str) -> tuple[str, list[str]]:
        """Kill dockyard right after ``point`` of ``flow``, restart it, check; the outcome
        and the problems found."""
        begun = time.monotonic()
        self.setup(flow, deployment_id)
        served_before = self.served_ids()
        set_up = time.monotonic()
        (self.control / "killed.json").unlink(missing_ok=True)
        (self.control / "armed.json").write_text(
            json.dumps({"point": point, "deployment": self.prefix(flow, deployment_id)})
        )
        self.trigger(flow, deployment_id)
        process = self.served.process
        assert process is not None
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if not (self.control / "armed.json").exists():
                break
            time.sleep(0.05)
        try:
            process.wait(10)
        except Exception:
            (self.control / "armed.json").unlink(missing_ok=True)
            self.settle()
            self.delete_all()
            return "not reached", [f"{point} did not happen in {flow}"]
        if process.returncode != -9:
            return "exited", [f"dockyard exited with {process.returncode}"]
        children = self.pid_records()
        marks = [("killed", time.monotonic())]
        self.served.start()
        marks.append(("started", time.monotonic()))
        self.settle()
        marks.append(("settled", time.monotonic()))
        # Leftovers are removed as the restarted dockyard resumes (a drain that ended
        # retires its slot right after): the invariants must hold within a few seconds.
        deadline = time.monotonic() + 15
        while True:
            problems = self.problems(flow, deployment_id, served_before, children)
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        marks.append(("checked", time.monotonic()))
        self.delete_all()
        marks.append(("cleaned", time.monotonic()))
        self.timings.append(
            [("setup", set_up - begun), ("to_kill", marks[0][1] - set_up)]
            + [(name, at - marks[0][1]) for name, at in marks[1:]]
        )
        return "killed+restarted", problems


@pytest.fixture
def chaos(tmp_path: Path) -> Iterator[Chaos]:
    podman_required()
    root = tmp_path / "repos" / "served"
    repos = RepoBuilder(root)
    repo = repos.new("chaos-agent")
    control = tmp_path / "control"
    plugin = install_plugin(tmp_path / "plugin", "dockyard_chaos_test", PLUGIN)
    control.mkdir()
    with GitDaemon(root) as daemon:
        served = Served(
            tmp_path / "data",
            port_range=(45200, 45260),
            plugin_path=plugin,
            env={"DOCKYARD_CHAOS_DIR": str(control)},
            eval_health_deadline_s=20,
        )
        chaos = Chaos(
            served, control, f"{daemon.url}/chaos-agent.git", f"{daemon.url}/chaos-eval.git"
        )
        chaos.commits["v1"] = agent(repo, "v1")
        chaos.commits["v2"] = agent(repo, "v2")
        chaos.commits["eval"] = eval_agent(repos.new("chaos-eval"))
        served.start()
        try:
            yield chaos
        finally:
            if served.process is not None and served.process.poll() is None:
                try:
                    chaos.delete_all()
                finally:
                    served.stop()
        assert engine_containers(served.data_dir) == []


def _table(rows: list[tuple[str, str, str, list[str]]]) -> str:
    width = max(len(point) for _, point, _, _ in rows)
    lines = [f"{'flow':<11} {'kill after':<{width}} {'outcome':<17} result"]
    for flow, point, outcome, problems in rows:
        result = "ok" if not problems else "FAIL: " + "; ".join(problems)
        lines.append(f"{flow:<11} {point:<{width}} {outcome:<17} {result}")
    return "\n".join(lines)


def test_a_kill_after_any_event_of_any_flow_leaves_dockyard_whole(chaos: Chaos) -> None:
    plan: list[tuple[str, str]] = []
    for n, flow in enumerate(FLOWS):
        points = chaos.dry_run(flow, f"dry-{n}")
        assert points, f"the {flow} flow emitted no event"
        plan += [(flow, point) for point in points]
    print(f"\nchaos: {len(plan)} kill points from the dry run of {', '.join(FLOWS)}")
    rows: list[tuple[str, str, str, list[str]]] = []
    started = time.monotonic()
    for n, (flow, point) in enumerate(plan):
        outcome, problems = chaos.kill_at(flow, point, f"k{n}")
        rows.append((flow, point, outcome, problems))
        took = " ".join(f"{name}={at:.1f}" for name, at in (chaos.timings or [[]])[-1])
        print(f"  {flow:<11} {point:<22} {outcome:<17} {problems or 'ok'}  [{took}]")
    table = _table(rows)
    print(f"\n{table}\n({time.monotonic() - started:.0f} s)")
    failed = [row for row in rows if row[3]]
    assert not failed, table
