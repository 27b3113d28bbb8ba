"""``dockyard.client`` against a live dockyard (uvicorn on loopback) on the fast fakes:
the typed client, ``ValidatorIntegration.evaluate_miner_from_github`` and its batch call,
and its one import name."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from litestar import Litestar

from dockyard.api.app import create_app
from dockyard.core.config import Settings
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from tests.conftest import free_port
from tests.fakes import FakeSource
from tests.test_evaluation import AUTH, FAST, REPO, TEST_SETTINGS, AgentRuntime, commit_of


@contextlib.contextmanager
def live_dockyard(
    settings: Settings, services: Services | None = None
) -> Iterator[tuple[str, Litestar]]:
    """Serve dockyard with uvicorn in a thread; its base URL and app."""
    port = free_port()
    app = create_app(settings, services=services)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "dockyard did not start"
        time.sleep(0.02)
    try:
        app.state.loop = server.servers[0].get_loop()  # to reach the app's objects
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture
def dockyard_url(tmp_path: Path) -> Iterator[str]:
    values = {**TEST_SETTINGS, "port_range_start": 48470, "port_range_end": 48490}
    cfg = Settings(data_dir=str(tmp_path / "data"), **values)
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=AgentRuntime(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    with live_dockyard(cfg, services) as (url, _):
        yield url


def token() -> str | None:
    return AUTH.get("Authorization", "").removeprefix("Bearer ") or None


def test_the_client_has_one_name() -> None:
    import importlib.util

    import dockyard.client as client

    assert importlib.util.find_spec("dockyard.api.client") is None
    assert client.DockyardClient.__module__ == "dockyard.client.rest"
    assert client.ValidatorIntegration.evaluate_miner_from_github


def test_the_client_loads_no_server_code() -> None:
    """The evaluation views the server writes have their one home in the client's models
    (the plugin's models use them), so importing the client loads neither the server's
    packages nor its frameworks."""
    probe = (
        "import sys, dockyard.client\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('dockyard.')"
        " or m.split('.')[0] in ('litestar', 'pluggy', 'podman', 'pygit2', 'jinja2'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "dockyard.client.models" in out
    assert [m for m in out if not m.startswith("dockyard.client")] == []
    from dockyard.client import models as client_models
    from dockyard.plugins.evaluation import models as server_models

    assert server_models.TaskResult is client_models.TaskResult
    assert server_models.Session is client_models.Session


async def test_evaluate_miner_from_github_as_the_seed_calls_it(dockyard_url: str) -> None:
    from dockyard.client import ApiError, Evaluation, TaskSolution, ValidatorIntegration

    async with ValidatorIntegration(
        dockyard_url, token=token(), timeouts=FAST, poll_s=0.05
    ) as validator:
        result = await validator.evaluate_miner_from_github(
            miner_github_url=REPO,
            miner_branch="main",
            task_prompt="Navigate to homepage",
            task_url="https://example.com",
            task_id="task-1",
            uid=12,
        )
        assert isinstance(result, Evaluation)
        assert result.finished and result.ok and result.reason is None
        assert result.commit == commit_of(REPO, "main")
        # The validator's protocol by default: /step, the page's host as localhost.
        assert result.protocol == "step" and result.results[0].steps == 2
        assert result.solutions() == [
            TaskSolution(
                task_id="task-1",
                actions=[{"name": "browser.navigate", "arguments": {"url": "https://localhost"}}],
                web_agent_id="12",
            )
        ]
        legacy = await validator.evaluate_miner_from_github(
            REPO,
            "main",
            "Navigate to homepage",
            "https://example.com",
            task_id="task-1",
            uid=12,
            protocol="solve_task",
        )
        assert legacy.protocol == "solve_task"
        assert legacy.solutions() == [
            TaskSolution(
                task_id="task-1",
                actions=[{"type": "NavigateAction", "url": "https://example.com"}],
                web_agent_id="12",
                recording="rec-task-1",
            )
        ]
        assert legacy.results[0].raw[0]["echo"]["prompt"] == "Navigate to homepage"

        bad = await validator.evaluate_miner_from_github(
            "https://github.com/acme/agent", "missing", "p", "https://example.com"
        )
        assert (bad.state, bad.reason) == ("failed", "ref_not_found")

        batch = await validator.evaluate_miners_from_github(
            [validator.miner(f"https://github.com/acme/b{i}", "main", uid=i) for i in range(3)],
            [{"id": "t", "prompt": "p", "url": "https://example.com"}],
            concurrency=2,
        )
        assert batch.finished and batch.progress.ok == 3
        assert sorted(e.results[0].web_agent_id for e in batch.evaluations) == ["0", "1", "2"]

        listed = await validator.client.evaluations()
        assert {e.id for e in listed} >= {result.id, bad.id}
        with pytest.raises(ApiError) as caught:
            await validator.client.evaluation("ev-000000000000")
        assert caught.value.status == 404 and caught.value.reason == "not_found"


async def test_a_session_and_a_cancel_through_the_client(dockyard_url: str) -> None:
    import aiohttp

    from dockyard.client import DockyardClient, Evaluation

    async with DockyardClient(dockyard_url, token=token()) as client:
        evaluation = await client.evaluate_miner(
            {
                "miner": {"github_url": REPO, "ref": "main"},
                "protocol": "step",
                "mode": "session",
                "timeouts": FAST,
            }
        )
        view = await client.wait_for_evaluation(
            evaluation.id, poll_s=0.05, timeout_s=10, until=lambda v: v.state == "session"
        )
        assert isinstance(view, Evaluation) and view.session is not None
        async with aiohttp.ClientSession() as http:
            for index in range(3):
                async with http.post(
                    view.session.step_url, json={"url": "http://s.test/", "step_index": index}
                ) as answer:
                    assert answer.status == 200
        done = await client.finish_session(evaluation.id, [{"steps": 3}])
        assert done.state == "finished" and done.session and done.session.report == [{"steps": 3}]

        slow = await client.evaluate_miner(
            {
                "miner": {"github_url": REPO, "ref": "main"},
                "tasks": [{"id": "slow-1", "prompt": "p", "url": "u"}],
                "timeouts": {**FAST, "task_s": 30},
            }
        )
        await client.wait_for_evaluation(
            slow.id, poll_s=0.05, timeout_s=10, until=lambda v: v.state == "running"
        )
        await asyncio.sleep(0.1)
        cancelled = await client.cancel_evaluation(slow.id)
        assert isinstance(cancelled, Evaluation)
        assert (cancelled.state, cancelled.cleaned_up) == ("cancelled", True)
