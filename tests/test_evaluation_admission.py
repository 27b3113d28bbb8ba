"""Evaluation admission: image-mode agents need no build, so they start in parallel up to
``eval_max_agents``; builds (``build_mode: dockerfile``) stay capped at ``eval_max_builds``.

On the fast fakes of ``test_evaluation.py``, with containers that take a moment to start so
that deploys running at once overlap visibly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from dockyard.core.runtime import BuildRequest, BuiltImage, ContainerInfo, ContainerSpec
from tests.fakes import api_over
from tests.test_evaluation import REPO, AgentRuntime, tasks, wait_final

OPERATOR_IMAGE = "localhost/operator/agent-base:1"


class SlowStartRuntime(AgentRuntime):
    """Containers (and builds) take ``START_S`` to come up; records the most deploy steps
    (build or start) in progress at once."""

    START_S = 0.4

    def __init__(self) -> None:
        super().__init__()
        self.images[OPERATOR_IMAGE] = {}
        self.busy = 0
        self.most_busy = 0

    @contextlib.asynccontextmanager
    async def _step(self) -> Any:
        self.busy += 1
        self.most_busy = max(self.most_busy, self.busy)
        try:
            await asyncio.sleep(self.START_S)
            yield
        finally:
            self.busy -= 1

    async def build(self, request: BuildRequest, on_log: Any = None) -> BuiltImage:
        async with self._step():
            return await super().build(request, on_log)

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        async with self._step():
            return await super().run(spec)


@pytest.fixture
def slow_client(tmp_path: Path) -> Any:
    @contextlib.contextmanager
    def make(**settings: Any) -> Iterator[TestClient[Any]]:
        ports = {"port_range_start": 48600, "port_range_end": 48640}
        with api_over(tmp_path, SlowStartRuntime(), **{**ports, **settings}) as client:
            yield client

    return make


def batch(client: TestClient[Any], miners: list[dict[str, Any]]) -> dict[str, Any]:
    body = {
        "miners": miners,
        "tasks": tasks("t1"),
        "timeouts": {"health_s": 5, "health_interval_s": 0.05, "task_s": 5, "request_s": 5},
    }
    r = client.post("/v1/integration/evaluate-miners-batch", json=body)
    assert r.status_code == 202, r.text
    return dict(r.json())


@pytest.mark.parametrize(
    ("mode", "most"),
    [
        ("image", 4),  # no build: as many deploy at once as eval_max_agents allows
        ("dockerfile", 1),  # builds stay capped at eval_max_builds
    ],
)
def test_image_mode_deploys_in_parallel_builds_stay_capped(
    slow_client: Any, mode: str, most: int
) -> None:
    with slow_client(eval_max_builds=1, eval_max_agents=4) as client:
        runtime: SlowStartRuntime = client.app.state.services.runtime
        miner: dict[str, Any] = {"github_url": REPO, "ref": "v1"}
        if mode == "image":
            miner |= {"build_mode": "image", "image": OPERATOR_IMAGE, "command": ["agent"]}
        miners = [{**miner, "ref": f"v{i}", "uid": i} for i in range(6)]
        started = batch(client, miners)
        final = wait_final(client, started["id"], timeout=60)
        assert final["state"] == "finished", final
        assert all(e["ok"] for e in final["evaluations"]), final
        assert runtime.most_busy == most
        assert runtime.max_alive <= 4  # eval_max_agents holds either way
