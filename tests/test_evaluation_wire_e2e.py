"""The step wire format end to end: the fixture agents of ``tests/agents/`` (modelled on real
miners: a strict ``/act``-only one, a strict ``/step``-only one, one that reads
``snapshot_html``) are pushed to a loopback git daemon and evaluated by a live dockyard on
real Podman, in image mode as the validator runs agents (``localhost/dockyard/base-python``,
the clone mounted read-only at ``/app``, ``python3 /app/main.py``), through the Caddy router,
driven with ``dockyard.client`` as a validator would. Each agent echoes what it received;
the tests compare exact key sets, order, JSON types and history items.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.client import Evaluation, ValidatorIntegration
from dockyard.plugins.validator_tools import VALIDATOR_TOOLS
from tests.gitserver import GitDaemon, RepoBuilder
from tests.test_evaluation import AUTH, TEST_SETTINGS
from tests.test_evaluation_client import live_dockyard
from tests.test_evaluation_e2e import _podman, _required
from tests.test_evaluation_wire import AGENTS, CLICKED, HISTORIES, STEP_TYPES, TASK, TYPED

pytestmark = [pytest.mark.podman, pytest.mark.slow]

IMAGE = "localhost/dockyard/base-python:bookworm"
TIMEOUTS = {"health_s": 20, "health_interval_s": 0.2, "task_s": 30, "request_s": 10}


class Wire:
    """The live dockyard and the served agents' repository URLs."""

    def __init__(self, url: str, git: GitDaemon, repos: RepoBuilder) -> None:
        self.url = url
        self.git = git
        self.repos = repos
        self.urls: dict[str, str] = {}

    def agent(self, name: str) -> str:
        """A repository whose ``main.py`` is the fixture agent ``name``; its URL."""
        if name not in self.urls:
            repo = self.repos.new(name)
            repo.write("main.py", (AGENTS / f"{name}.py").read_text())
            repo.write("wire.py", (AGENTS / "wire.py").read_text())
            repo.commit(f"fixture agent {name}")
            self.urls[name] = f"{self.git.url}/{name}.git"
        return self.urls[name]

    async def evaluate(self, vi: ValidatorIntegration, name: str, **options: Any) -> Evaluation:
        """Evaluate agent ``name`` as the validator runs it: the base image, the clone
        mounted at /app, ``python3 /app/main.py``; one task."""
        return await vi.evaluate_miner_from_github(
            self.agent(name),
            "main",
            tasks=[TASK],
            uid=36,
            miner_fields={
                "build_mode": "image",
                "image": IMAGE,
                "command": ["python3", "-u", "/app/main.py"],
            },
            **options,
        )

    def validator(self) -> ValidatorIntegration:
        token = AUTH.get("Authorization", "").removeprefix("Bearer ") or None
        return ValidatorIntegration(self.url, token=token, timeouts=TIMEOUTS, poll_s=0.2)


def nothing_left(*evaluations: Evaluation) -> None:
    for evaluation in evaluations:
        assert evaluation.cleaned_up, evaluation
        names = _podman(
            "ps", "-a", "--filter", f"label=dockyard_evaluation={evaluation.id}",
            "--format", "{{.Names}}",
        )  # fmt: skip
        assert names.strip() == "", f"containers left: {names}"


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    _required()
    from dockyard.core.config import Settings
    from tests.conftest import ROOT, free_port

    # The offline base image (idempotent: a no-op when it exists).
    build = ["bash", str(ROOT / "contrib" / "base-image" / "build.sh")]
    subprocess.run(build, check=True, capture_output=True, timeout=900)
    data = tmp_path_factory.mktemp("wire-data")
    settings = Settings(
        data_dir=str(data),
        **{
            **TEST_SETTINGS,
            "insecure_sources": True,
            "port_range_start": 46900,
            "port_range_end": 46940,
            "eval_max_agents": 3,
            "router": "caddy",
            "plugins": {"caddy": {"listen": f"127.0.0.1:{free_port()}"}},
        },
    )
    root: Path = tmp_path_factory.mktemp("wire-repos") / "served"
    repos = RepoBuilder(root)  # makes ``root``, which the daemon serves
    with GitDaemon(root) as git, live_dockyard(settings) as (url, _):
        yield Wire(url, git, repos)


def assert_validators_body(raw: list[Any]) -> None:
    """Every step's body as the validator sends it, and the history in its shape."""
    assert len(raw) == 3
    for index, answer in enumerate(raw):
        got = answer["received"]
        assert got["keys"] == list(STEP_TYPES) and got["types"] == STEP_TYPES
        assert got["history"] == HISTORIES[index]
        assert got["tools"] == [tool["name"] for tool in VALIDATOR_TOOLS]
        assert got["url"] == "http://localhost:8001/?seed=3"
        assert got["headers"] == {"IWA-Task-ID": TASK["id"]}


async def test_strict_act_and_step_agents_answer_through_dockyard(wire: Wire) -> None:
    async with wire.validator() as vi:
        step = await wire.evaluate(vi, "step_only")
        assert (step.state, step.ok, step.reason, step.protocol) == (
            "finished",
            True,
            None,
            "step",  # the default, as the validator speaks
        ), step
        assert step.agent_url and f"/apps/{step.id}" in step.agent_url  # through Caddy
        result = step.results[0]
        assert (result.outcome, result.steps, result.actions) == ("ok", 3, [TYPED, CLICKED])
        assert result.web_agent_id == "36"
        assert_validators_body(result.raw)

        act = await wire.evaluate(vi, "act_only", protocol="act")
        assert (act.ok, act.reason) == (True, None), act
        assert act.results[0].actions == [TYPED, CLICKED]
        assert_validators_body(act.results[0].raw)

        # The validator posts to /step only: an /act-only agent fails there, as it would.
        missed = await wire.evaluate(vi, "act_only")
        assert (missed.ok, missed.reason) == (False, "all_tasks_failed"), missed
        assert (missed.results[0].reason, missed.results[0].message) == (
            "agent_http_error",
            "/step answered HTTP 404",
        )
        nothing_left(step, act, missed)


async def test_an_agent_reading_snapshot_html_sees_nothing_through_dockyard(wire: Wire) -> None:
    async with wire.validator() as vi:
        evaluation = await wire.evaluate(vi, "snapshot_reader")
        assert evaluation.ok, evaluation
        raw = evaluation.results[0].raw
        assert raw[0]["content"] == "snapshot_html: absent"
        assert raw[0]["received"]["html"] == TASK["html"]
        assert "snapshot_html" not in raw[0]["received"]["keys"]
        nothing_left(evaluation)
