"""Metrics, correlated logs and the live event stream after real deploys and evaluations:
real Podman, a loopback git daemon, dockyard served by uvicorn.

The agent is the busybox one of ``test_evaluation_e2e`` (offline, tiny). Metrics are read
from ``/metrics`` before and after and compared as deltas, so other tests in the same
process cannot make these pass or fail.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dockyard.client import DockyardClient
from dockyard.core.logs import ContextFilter, JsonFormatter
from tests.gitserver import GitDaemon, RepoBuilder, daemon_with_repos
from tests.test_evaluation import AUTH, TEST_SETTINGS
from tests.test_evaluation_client import live_dockyard
from tests.test_evaluation_e2e import _required, agent

pytestmark = [pytest.mark.podman, pytest.mark.slow]

TASKS = [
    {"id": f"task-{i}", "prompt": f"open {i}", "url": f"http://site.test/{i}"} for i in range(3)
]
TIMEOUTS = {"health_s": 20, "health_interval_s": 0.2, "task_s": 10, "request_s": 8}
FINAL = {"finished", "failed", "cancelled", "expired"}
HEALTH = {"interval_s": 0.2, "timeout_s": 2, "deadline_s": 30}


class Live:
    def __init__(self, url: str, app: Any, git: GitDaemon, repos: RepoBuilder, logs: Any) -> None:
        self.url = url
        self.app = app
        self.git = git
        self.repos = repos
        self.logs = logs
        self.made: set[str] = set()

    def repo(self, name: str) -> str:
        if name not in self.made:
            agent(self.repos.new(name))
            self.made.add(name)
        return f"{self.git.url}/{name}.git"

    def client(self) -> DockyardClient:
        return DockyardClient(self.url, token=AUTH["Authorization"].removeprefix("Bearer "))

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    _required()
    from dockyard.core.config import Settings

    data = tmp_path_factory.mktemp("observability-data")
    settings = Settings(
        data_dir=str(data),
        **{
            **TEST_SETTINGS,
            "insecure_sources": True,
            "port_range_start": 46700,
            "port_range_end": 46740,
            "build_timeout_s": 60,
        },
    )
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    old_level = root.level
    repos_dir = tmp_path_factory.mktemp("observability-repos") / "served"
    try:
        with daemon_with_repos(repos_dir) as (git, repos), live_dockyard(settings) as (url, app):
            # After uvicorn configured its logging (dictConfig drops earlier handlers).
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            yield Live(url, app, git, repos, buffer)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def scrape(live: Live) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{live.url}/metrics", headers=AUTH) as response,
    ):
        assert response.status == 200, await response.text()
        text = await response.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def test_metrics_and_request_ids_after_a_real_deploy_and_evaluation(live: Live) -> None:
    before = await scrape(live)
    request_id = "obs-deploy-0001"
    spec = {"id": "obs-app", "repo": live.repo("obs-agent"), "ref": "main", "health": HEALTH}
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.post(
            f"{live.url}/v1/repos?wait=true&timeout=120",
            json=spec,
            headers={"X-Request-ID": request_id},
        ) as response,
    ):
        body = await response.json()
        assert response.status == 200, body
        assert response.headers["X-Request-ID"] == request_id
    assert body["promoted"] == "blue", body

    async with live.client() as client:
        evaluation = await client.evaluate_miner(
            {
                "miner": {"github_url": live.repo("obs-agent"), "ref": "main"},
                "tasks": TASKS,
                "timeouts": TIMEOUTS,
            }
        )
        for _ in range(600):
            evaluation = await client.evaluation(evaluation.id)
            if evaluation.state in FINAL:
                break
            await asyncio.sleep(0.2)
    assert (evaluation.state, evaluation.ok) == ("finished", True), evaluation

    after = await scrape(live)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # A deploy and an evaluation's deploy: two builds (the second reuses the image).
    assert moved("dockyard_builds_total", outcome="ok") >= 2
    assert moved("dockyard_build_duration_seconds_count", outcome="ok") >= 2
    assert moved("dockyard_fetch_duration_seconds_count") >= 2
    assert moved("dockyard_fetch_bytes_total") > 0
    assert moved("dockyard_deploys_total", outcome="promoted", reason="none") == 2
    assert moved("dockyard_deploy_duration_seconds_count", outcome="promoted") == 2
    assert moved("dockyard_deploy_duration_seconds_sum", outcome="promoted") > 0
    assert moved("dockyard_health_probe_duration_seconds_count", result="ok") >= 2
    assert moved("dockyard_switch_duration_seconds_count", router="none") == 2
    assert moved("dockyard_evaluations_total", state="finished", reason="none") == 1
    assert moved("dockyard_evaluation_tasks_total", outcome="ok") == len(TASKS)
    assert moved("dockyard_evaluation_task_duration_seconds_count", outcome="ok") == len(TASKS)
    assert moved("dockyard_evaluation_duration_seconds_count", phase="total") == 1
    assert moved("dockyard_slot_transitions_total", to_state="PROMOTED") == 2
    route = (("method", "POST"), ("route", "/v1/repos"), ("status", "200"))
    assert (
        after[("dockyard_http_requests_total", route)]
        - before.get(("dockyard_http_requests_total", route), 0)
        == 1
    )
    assert moved("dockyard_http_request_duration_seconds_count", route="/v1/repos") == 1
    # Gauges read at scrape time: the deployment's promoted slot and its lease.
    assert total(after, "dockyard_slots", state="PROMOTED") >= 1
    assert total(after, "dockyard_port_leases") >= 1
    assert total(after, "dockyard_evaluation_queue_depth") == 0
    assert total(after, "dockyard_evaluation_running_agents") == 0

    # One grep of the request id follows the deploy: every line about the deployment
    # carries it, and they cover fetch, build, start, probe and switch.
    lines = [line for line in live.log_lines() if line.get("deployment_id") == "obs-app"]
    assert lines, live.logs.getvalue()[-2000:]
    assert {line.get("request_id") for line in lines} == {request_id}, lines
    text = "\n".join(line["message"] for line in lines)
    for step in ("IDLE -> BUILDING", "source_fetched", "image_ready", "BUILDING -> STAGING",
                 "STAGING -> HEALTHY", "HEALTHY -> PROMOTED"):  # fmt: skip
        assert step in text, text
    # The evaluation's lines carry its id (and its deployment's).
    eval_lines = [line for line in live.log_lines() if line.get("evaluation_id") == evaluation.id]
    assert any("HEALTHY -> PROMOTED" in line["message"] for line in eval_lines), [
        x for x in live.log_lines() if "ev-" in x["message"]
    ]
    assert any(line["message"].endswith(": finished") for line in eval_lines), eval_lines

    # The cleanup of the deploy's request is in the log with the delete's request id.
    async with (
        aiohttp.ClientSession(headers=AUTH) as http,
        http.delete(
            f"{live.url}/v1/repos/obs-app", headers={"X-Request-ID": "obs-delete-0001"}
        ) as response,
    ):
        assert response.status == 200


async def read_events(
    response: aiohttp.ClientResponse, until: Any, seen: list[dict[str, Any]]
) -> None:
    """Parse server-sent events into ``seen`` until ``until(event)`` holds."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n").rstrip("\r")
        if line == "":
            if "data" in fields:
                event = json.loads(fields["data"])
                assert str(event["id"]) == fields.get("id"), fields
                assert event["kind"] == fields.get("event"), fields
                seen.append(event)
                if until(event):
                    return
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    raise AssertionError(f"the stream ended early after {len(seen)} events")


async def test_the_event_stream_follows_a_deploy_across_a_reconnect(live: Live) -> None:
    spec = {"id": "obs-stream", "repo": live.repo("obs-stream"), "ref": "main", "health": HEALTH}
    stream = f"{live.url}/v1/events/stream?deployment=obs-stream"
    seen: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=180, sock_read=60)
    async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as http:
        async with http.get(stream) as first:
            assert first.status == 200
            assert first.headers["Content-Type"].startswith("text/event-stream")
            async with http.post(f"{live.url}/v1/repos", json=spec) as response:
                assert response.status == 202, await response.text()
            # Up to the build, then the client goes away mid-deploy.
            await asyncio.wait_for(
                read_events(first, lambda e: e.get("to_state") == "BUILDING", seen), 60
            )
        cut = seen[-1]["id"]
        await asyncio.sleep(0.5)  # events keep coming while nobody listens
        async with http.get(stream, headers={"Last-Event-ID": str(cut)}) as second:
            assert second.status == 200
            await asyncio.wait_for(
                read_events(second, lambda e: e.get("to_state") == "PROMOTED", seen), 120
            )
        async with http.get(f"{live.url}/v1/events", params={"deployment": "obs-stream"}) as r:
            journal = await r.json()
    ids = [e["id"] for e in seen]
    assert ids == sorted(set(ids)), ids  # never repeated, in order
    assert ids == [e["id"] for e in journal][: len(ids)], (ids, journal)  # none missed
    kinds = [(e["kind"], e.get("to_state")) for e in seen]
    assert kinds[0] == ("created", None) and ("source_fetched", None) in kinds
    assert kinds[-1] == ("slot_transition", "PROMOTED")
    # The store's own history has the same deployment events, in the same order.
    store_seqs = [e["seq"] for e in seen]
    assert store_seqs == sorted(store_seqs) and None not in store_seqs

    # A bad Last-Event-ID is a 400 naming the header.
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(stream, headers={"Last-Event-ID": "yesterday"}) as bad:
            assert bad.status == 400
            assert "Last-Event-ID" in (await bad.json())["message"]
        async with http.delete(f"{live.url}/v1/repos/obs-stream") as response:
            assert response.status == 200
