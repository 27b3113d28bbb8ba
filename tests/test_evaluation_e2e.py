"""Evaluations end to end: real Podman, a loopback git daemon, the Caddy router, and
dockyard served by uvicorn, driven through ``dockyard.client`` as a validator would.

The agents are tiny and offline: busybox images whose ``nc -ll -e`` runs a shell handler
per connection that answers Autoppia's routes with JSON (busybox's httpd can only run CGI
programs under ``/cgi-bin/``, and agents answer ``/solve_task`` and ``/step`` at the root).
Afterwards no container, port lease or route may be left: checked with ``podman``, the
state database and the router (its ``url_for`` and a request through the proxy).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.client import Batch, DockyardClient, Evaluation, ValidatorIntegration
from tests.gitserver import GitDaemon, Repo, RepoBuilder, daemon_with_repos
from tests.nc_agent import handler
from tests.test_evaluation import AUTH, TEST_SETTINGS
from tests.test_evaluation_client import live_dockyard

pytestmark = [pytest.mark.podman, pytest.mark.slow]

TIMEOUTS = {"health_s": 15, "health_interval_s": 0.2, "task_s": 10, "request_s": 8}
AGENT_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY agent.sh /agent.sh
CMD ["nc", "-ll", "-p", "8000", "-e", "/agent.sh"]
"""
CRASH_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["sh", "-c", "echo starting; exit 3"]
"""
#: One HTTP exchange per connection: /health, /solve_task (echoes the task), /step and
#: /act (navigate at step 0, done after). ``SLEEP`` delays every task answer.
AGENT_SH = handler(
    r"""  /solve_task)
    sleep "$SLEEP"
    url=$(printf '%s' "$body" | sed -n 's/.*"url": *"\([^"]*\)".*/\1/p')
    actions="[{\"type\":\"NavigateAction\",\"url\":\"$url\"}]"
    reply "200 OK" "{\"actions\":$actions,\"web_agent_id\":\"busybox\",\"echo\":$body}" ;;
  /step|/act)
    sleep "$SLEEP"
    i=$(printf '%s' "$body" | sed -n 's/.*"step_index": *\([0-9]*\).*/\1/p')
    if [ "${i:-0}" = "0" ]; then
      call='{"name":"browser.navigate","arguments":{"url":"http://site.test/"}}'
      reply "200 OK" "{\"tool_calls\":[$call],\"done\":false}"
    else
      reply "200 OK" "{\"tool_calls\":[],\"content\":\"step $i\",\"done\":true}"
    fi ;;
""",
    setup="SLEEP=__SLEEP__\n",
)


def _podman(*args: str) -> str:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _required() -> None:
    from tests.conftest import ON_CI
    from tests.proxies import require

    if shutil.which("podman") is None:
        if ON_CI:
            pytest.fail("podman is not installed (CI=true: never skipped)")
        pytest.skip("podman is not installed")
    require("caddy")


def agent(repo: Repo, *, sleep: float = 0, crash: bool = False) -> str:
    """Commit a busybox agent to ``repo``; its commit."""
    repo.write("busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    if crash:
        repo.write("Dockerfile", CRASH_DOCKERFILE)
    else:
        repo.write("Dockerfile", AGENT_DOCKERFILE)
        repo.write("agent.sh", AGENT_SH.replace("__SLEEP__", f"{sleep:g}"), mode=0o755)
    return repo.commit(f"agent sleep={sleep} crash={crash}")


class Dockyard:
    """The live dockyard under test and how to look behind it."""

    def __init__(
        self, url: str, app: Any, data_dir: Path, git: GitDaemon, repos: RepoBuilder
    ) -> None:
        self.url = url
        self.app = app
        self.data_dir = data_dir
        self.git = git
        self.repos = repos
        self.commits: dict[str, str] = {}

    def repo(self, name: str, **kind: Any) -> str:
        """A served repository holding an agent; its URL (the commit in ``commits``)."""
        if name not in self.commits:
            self.commits[name] = agent(self.repos.new(name), **kind)
        return f"{self.git.url}/{name}.git"

    def client(self) -> DockyardClient:
        token = AUTH.get("Authorization", "").removeprefix("Bearer ") or None
        return DockyardClient(self.url, token=token)

    def leases(self) -> dict[int, str]:
        db = sqlite3.connect(f"file:{self.data_dir / 'dockyard.db'}?mode=ro", uri=True)
        try:
            return dict(db.execute("SELECT port, owner FROM port_leases").fetchall())
        finally:
            db.close()

    async def assert_nothing_left(self, *evaluations: Evaluation) -> None:
        containers = _podman(
            "ps", "-a", "--filter", "label=dockyard_evaluation", "--format", "{{.Names}}"
        )
        assert containers.strip() == "", f"containers left: {containers}"
        assert not [o for o in self.leases().values() if o.startswith("ev-")], self.leases()
        router = router_of(self)
        served = asyncio.run_coroutine_threadsafe(router.served(), self.app.state.loop)
        routes = await asyncio.wrap_future(served)
        assert routes is not None  # the proxy answered
        async with aiohttp.ClientSession() as http:
            for evaluation in evaluations:
                assert evaluation.cleaned_up, evaluation
                assert evaluation.id not in routes, routes
                # and through the proxy itself: the prefix no longer leads anywhere
                url = f"{router.public_url}/apps/{evaluation.id}/health"
                async with http.get(url) as response:
                    assert response.status >= 400, (url, response.status)


def router_of(dockyard: Dockyard) -> Any:
    return dockyard.app.state.services.router


@pytest.fixture(scope="module")
def dockyard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockyard]:
    _required()
    from dockyard.core.config import Settings
    from tests.conftest import free_port

    data = tmp_path_factory.mktemp("evaluation-data")
    settings = Settings(
        data_dir=str(data),
        **{
            **TEST_SETTINGS,
            "insecure_sources": True,
            "port_range_start": 46200,
            "port_range_end": 46260,
            "build_timeout_s": 60,
            "eval_max_agents": 3,
            "eval_max_builds": 2,
            "router": "caddy",
            "plugins": {"caddy": {"listen": f"127.0.0.1:{free_port()}"}},
        },
    )
    repos_dir = tmp_path_factory.mktemp("evaluation-repos") / "served"
    with daemon_with_repos(repos_dir) as (git, repos), live_dockyard(settings) as (url, app):
        yield Dockyard(url, app, data, git, repos)
    left = _podman("ps", "-a", "--filter", "label=dockyard_evaluation", "--format", "{{.Names}}")
    assert left.strip() == "", f"containers left behind: {left}"


def validator(dockyard: Dockyard) -> ValidatorIntegration:
    # The busybox agents prove the relay and its cleanup with the one-shot protocol (its
    # answers echo the task); the step wire format is test_evaluation_wire_e2e.py's.
    return ValidatorIntegration(
        client=dockyard.client(), timeouts=TIMEOUTS, poll_s=0.2, protocol="solve_task"
    )


TASKS = [
    {"id": f"task-{i}", "prompt": f"open page {i}", "url": f"http://site.test/{i}", "x": i}
    for i in range(3)
]


async def test_a_good_agent_answers_through_the_router_with_its_commit(
    dockyard: Dockyard,
) -> None:
    url = dockyard.repo("good")
    async with validator(dockyard) as vi:
        result = await vi.evaluate_miner_from_github(url, "main", tasks=TASKS, uid=36)
        assert (result.state, result.ok, result.reason) == ("finished", True, None), result
        assert result.commit == dockyard.commits["good"]
        assert result.agent_url and "/apps/" + result.id in result.agent_url  # via Caddy
        for solution, task in zip(result.solutions(), TASKS, strict=True):
            assert solution.task_id == task["id"]
            assert solution.actions == [{"type": "NavigateAction", "url": task["url"]}]
            assert solution.web_agent_id == "36"
        for item in result.results:
            assert item.outcome == "ok" and item.duration_s is not None
            assert item.raw[0]["web_agent_id"] == "busybox"
            assert item.raw[0]["echo"]["x"] == int(item.task_id[-1])  # untouched extras
        assert result.image_kept is True and result.image_reused is False
        await dockyard.assert_nothing_left(result)

        # The seed's call: one task from a prompt and a URL; the image is reused.
        again = await vi.evaluate_miner_from_github(
            url, "main", "Navigate to homepage", "https://example.com"
        )
        assert again.ok and again.image_reused is True and again.commit == result.commit
        assert again.solutions()[0].actions == [
            {"type": "NavigateAction", "url": "https://example.com"}
        ]
        await dockyard.assert_nothing_left(again)


async def test_slow_crashing_and_missing_agents_get_their_reasons(dockyard: Dockyard) -> None:
    async with validator(dockyard) as vi:
        slow = await vi.evaluate_miner_from_github(
            dockyard.repo("slow", sleep=30),
            "main",
            "p",
            "http://site.test/",
            timeouts={**TIMEOUTS, "task_s": 2},
        )
        assert (slow.state, slow.reason) == ("finished", "task_timeout"), slow
        assert slow.results[0].outcome == "timeout" and slow.results[0].duration_s < 10

        crash = await vi.evaluate_miner_from_github(
            dockyard.repo("crash", crash=True), "main", "p", "http://site.test/"
        )
        assert (crash.state, crash.reason, crash.detail_reason) == (
            "failed",
            "deploy_failed",
            "health_check_failed",
        ), crash
        assert crash.commit == dockyard.commits["crash"]

        missing = await vi.evaluate_miner_from_github(
            dockyard.repo("good"), "no-such-branch", "p", "http://site.test/"
        )
        assert (missing.state, missing.reason) == ("failed", "ref_not_found"), missing
        await dockyard.assert_nothing_left(slow, crash, missing)


async def test_a_failed_build_keeps_its_cause_and_a_refused_source_its_commit(
    dockyard: Dockyard,
) -> None:
    """Issue 11: the build log goes with cleanup, so the evaluation keeps its tail; a
    Dockerfile missing from the fetched commit still records that commit."""
    broken = dockyard.repos.new("broken-build")
    broken.write("busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    broken.write(
        "Dockerfile",
        "FROM scratch\nCOPY busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "sh", "-c", "echo compiler said: missing semicolon; exit 3"]\n',
    )
    broken_commit = broken.commit("a build that fails")
    bare = dockyard.repos.new("no-dockerfile")
    bare.write("README", "no Dockerfile here\n")
    bare_commit = bare.commit("nothing to build")
    async with validator(dockyard) as vi:
        failed = await vi.evaluate_miner_from_github(
            f"{dockyard.git.url}/broken-build.git", "main", "p", "http://site.test/"
        )
        assert (failed.state, failed.reason, failed.detail_reason) == (
            "failed",
            "deploy_failed",
            "build_failed",
        ), failed
        assert failed.commit == broken_commit
        assert any("compiler said: missing semicolon" in line for line in failed.build_log_tail)
        assert failed.build_log_tail[-1].startswith("dockyard: build_failed: ")
        assert len(failed.build_log_tail) <= 40

        missing = await vi.evaluate_miner_from_github(
            f"{dockyard.git.url}/no-dockerfile.git", "main", "p", "http://site.test/"
        )
        assert (missing.state, missing.detail_reason) == ("failed", "dockerfile_not_found")
        assert missing.commit == bare_commit, missing
        assert missing.build_log_tail == []
        await dockyard.assert_nothing_left(failed, missing)


async def test_a_batch_of_five_with_concurrency_two(dockyard: Dockyard) -> None:
    kinds: dict[str, dict[str, Any]] = {
        "batch-a": {},
        "batch-b": {"sleep": 0.5},
        "batch-c": {},
        "batch-slow": {"sleep": 30},
        "batch-d": {},
    }
    miners = [
        ValidatorIntegration.miner(dockyard.repo(name, **kind), "main", uid=i)
        for i, (name, kind) in enumerate(kinds.items())
    ]
    miners.append(ValidatorIntegration.miner(dockyard.repo("batch-a"), "gone", uid=9))
    async with validator(dockyard) as vi:
        batch = await vi.evaluate_miners_from_github(
            miners,
            TASKS[:2],
            concurrency=2,
            wait=False,
            timeouts={**TIMEOUTS, "task_s": 3},
        )
        assert batch.concurrency == 2 and len(batch.evaluations) == 6
        most = 0
        deadline = time.monotonic() + 240
        while not batch.finished:
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.2)
            view = await vi.client.batch(batch.id)
            assert isinstance(view, Batch)
            batch = view
            most = max(most, batch.progress.running)
            queued = sorted(e.queue_position for e in batch.evaluations if e.state == "queued")
            assert queued == list(range(1, len(queued) + 1))  # visible, gapless positions
        assert 1 <= most <= 2
        by_uid = {e.miner.uid if e.miner else None: e for e in batch.evaluations}
        for uid, name in enumerate(kinds):
            evaluation = by_uid[uid]
            assert evaluation.commit == dockyard.commits[name], evaluation
            if name == "batch-slow":
                assert evaluation.reason == "task_timeout", evaluation
            else:
                assert evaluation.ok, evaluation
                assert [s.web_agent_id for s in evaluation.solutions()] == [str(uid)] * 2
        assert by_uid[9].reason == "ref_not_found"
        assert batch.progress.finished == 6 and batch.progress.ok == 4
        await dockyard.assert_nothing_left(*batch.evaluations)


async def test_a_cancel_in_the_middle_cleans_up(dockyard: Dockyard) -> None:
    async with dockyard.client() as client:
        evaluation = await client.evaluate_miner(
            {
                "miner": {"github_url": dockyard.repo("slow", sleep=30), "ref": "main"},
                "tasks": TASKS,
                "timeouts": {**TIMEOUTS, "task_s": 60},
            }
        )
        running = await client.wait_for_evaluation(
            evaluation.id, poll_s=0.2, timeout_s=60, until=lambda v: v.state == "running"
        )
        assert running.state == "running", running
        await asyncio.sleep(0.5)  # tasks are in flight
        cancelled = await client.cancel_evaluation(evaluation.id)
        assert isinstance(cancelled, Evaluation)
        assert (cancelled.state, cancelled.reason, cancelled.cleaned_up) == (
            "cancelled",
            "cancelled",
            True,
        )
        assert {r.outcome for r in cancelled.results} == {"cancelled"}
        assert cancelled.commit == dockyard.commits["slow"]
        await dockyard.assert_nothing_left(cancelled)


async def test_a_step_session_through_the_router(dockyard: Dockyard) -> None:
    async with validator(dockyard) as vi:
        opened = await vi.evaluate_miner_from_github(
            dockyard.repo("good"), "main", protocol="step", mode="session"
        )
        assert opened.state == "session" and opened.session is not None, opened
        session = opened.session
        router = router_of(dockyard)
        assert session.step_url.startswith(f"{router.public_url}/apps/{opened.id}/")
        answers = []
        async with aiohttp.ClientSession() as http:
            for index in range(4):
                body = {"task_id": "v", "prompt": "p", "url": "http://s.test/", "step_index": index}
                async with http.post(session.step_url, json=body) as response:
                    assert response.status == 200
                    answers.append(await response.json(content_type=None))
        assert answers[0]["tool_calls"][0]["name"] == "browser.navigate"
        assert [a["done"] for a in answers] == [False, True, True, True]
        assert answers[3]["content"] == "step 3"
        done = await vi.client.finish_session(opened.id, [{"task_id": "v", "score": 1.0}])
        assert (done.state, done.ok) == ("finished", True)
        assert done.session and done.session.closed_by == "validator"
        await dockyard.assert_nothing_left(done)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(session.step_url.replace("/step", "/health"), timeout=5)
