"""The evaluation flow through the HTTP API on fast fakes: agents are small aiohttp servers
(one per "container", on its leased port) whose behaviour comes from the build arg
``AGENT``; sources are FakeSource. The real-Podman proof is ``test_evaluation_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from litestar.testing import TestClient

import tests.conftest as conftest
from dockyard.core.errors import Conflict
from dockyard.core.runtime import LABEL_DEPLOYMENT, ContainerInfo, ContainerSpec
from dockyard.core.services import Services
from dockyard.plugins.evaluation import EVALUATION_LABEL, EvaluationService, records
from tests.fakes import FakeRuntime, api_over, started_services

#: The auth engineer's test token and settings, when the suite has them.
AUTH: dict[str, str] = getattr(conftest, "AUTH", {})
TEST_SETTINGS: dict[str, Any] = getattr(conftest, "TEST_SETTINGS", {"monitor_interval_s": 0})
REPO = "https://github.com/acme/agent"
FAST = {"health_s": 2, "health_interval_s": 0.05, "task_s": 5, "request_s": 5}


class AgentRuntime(FakeRuntime):
    """FakeRuntime whose containers speak Autoppia's protocols, by build arg ``AGENT``:
    ``good`` (solve_task and step), ``legacy`` (only ``/act``, legacy shapes), ``slow``
    (answers after ``DELAY`` seconds), ``broken`` (HTTP 500). It records every container
    spec, the requests in flight per container and the most containers alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[ContainerSpec] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.max_alive = 0
        self.requests: list[tuple[str, str, dict[str, Any], str | None]] = []

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        if any(c.name == spec.name for c in self.containers.values()):
            raise Conflict(f"container {spec.name} exists")
        self.specs.append(spec)
        args = self.images.get(spec.image, {})
        kind = args.get("AGENT", "good")
        delay = float(args.get("DELAY", "0"))
        healthy = args.get("HEALTH") != "fail"
        name = spec.name

        async def health(_: web.Request) -> web.Response:
            return web.Response(status=200 if healthy else 503)

        async def answer(request: web.Request) -> web.Response:
            body = await request.json()
            route = request.path
            self.requests.append((name, route, body, request.headers.get("IWA-Task-ID")))
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            self.max_in_flight[name] = max(self.max_in_flight.get(name, 0), self.in_flight[name])
            task_id = str(body.get("id", body.get("task_id", "")))  # solve_task / step
            try:
                if kind == "slow" or "slow" in task_id:
                    await asyncio.sleep(delay or 30)
                elif delay:
                    await asyncio.sleep(delay)
                if kind == "broken" or "broken" in task_id:
                    return web.json_response({"error": "boom"}, status=500)
                if kind == "legacy":
                    if route != "/act":
                        return web.json_response({"error": "not found"}, status=404)
                    if body["step_index"] == 0:
                        return web.json_response({"actions": [{"type": "ClickAction", "x": 1}]})
                    if body["step_index"] == 1:
                        return web.json_response({"navigate_url": "http://site.test/next"})
                    return web.json_response({"action": None, "done": True})
                if route == "/solve_task":
                    return web.json_response(
                        {
                            "actions": [{"type": "NavigateAction", "url": body.get("url")}],
                            "web_agent_id": "agent-says",
                            "recording": f"rec-{body.get('id')}",
                            "echo": body,
                        }
                    )
                index = body["step_index"]
                if index == 0:
                    calls = [{"name": "browser.navigate", "arguments": {"url": body["url"]}}]
                    return web.json_response({"tool_calls": calls, "done": False})
                return web.json_response({"tool_calls": [], "content": "done", "done": True})
            finally:
                self.in_flight[name] -= 1

        app = web.Application()
        app.router.add_get("/health", health)
        for route in ("/solve_task", "/step", "/act"):
            app.router.add_post(route, answer)
        # A stopped container drops its requests at once, like a killed process.
        info = await self.serve_app(spec, app, shutdown_timeout=0.2, handler_cancellation=True)
        self.max_alive = max(self.max_alive, sum(c.running for c in self.containers.values()))
        return info


@pytest.fixture
def make_client(tmp_path: Path) -> Any:
    @contextlib.contextmanager
    def make(sources: dict[str, Any] | None = None, **settings: Any) -> Iterator[TestClient[Any]]:
        ports = {"port_range_start": 48400, "port_range_end": 48440}
        with api_over(tmp_path, AgentRuntime(), sources=sources, **{**ports, **settings}) as client:
            yield client

    return make


def commit_of(repo: str, ref: str) -> str:
    """The commit FakeSource resolves ``ref`` to."""
    return hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()


def tasks(*ids: str) -> list[dict[str, Any]]:
    return [
        {"id": i, "prompt": f"do {i}", "url": f"http://site.test/{i}", "extra": [i]} for i in ids
    ]


def evaluate(client: TestClient[Any], miner: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {"miner": {"github_url": REPO, "ref": "v1", **miner}, "timeouts": FAST, **fields}
    body.setdefault("tasks", tasks("t1"))
    r = client.post("/v1/integration/evaluate-miner", json=body)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_final(client: TestClient[Any], evaluation_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/integration/evaluation/{evaluation_id}").json()
        done = body.get("state") in ("finished", "failed", "cancelled", "expired")
        if body.get("evaluations") is not None:
            done = body["state"] == "finished"
        if done or time.monotonic() > deadline:
            return body  # type: ignore[no-any-return]
        time.sleep(0.03)


def with_build_args(client: TestClient[Any], build_args: dict[str, str]) -> None:
    """Deploy every following evaluation with ``build_args`` (the fake agent's behaviour)."""
    service: EvaluationService = client.app.state.evaluations
    original = service._spec
    service._spec = lambda run: msgspec.structs.replace(  # type: ignore[method-assign]
        original(run), build_args=build_args
    )


def call(client: TestClient[Any], fn: Any, *args: Any) -> Any:
    with client.portal() as portal:
        return portal.call(fn, *args)


def assert_nothing_left(client: TestClient[Any], *evaluation_ids: str) -> None:
    services: Services = client.app.state.services
    runtime: AgentRuntime = services.runtime  # type: ignore[assignment]
    assert [c.name for c in runtime.containers.values()] == []
    assert call(client, services.store.list_leases) == {}
    served = call(client, services.router.served) or {}
    for evaluation_id in evaluation_ids:
        assert evaluation_id not in served
        assert call(client, services.store.get_deployment, evaluation_id) is None


# ---------------------------------------------------------------- one miner
def test_a_good_agent_answers_in_the_validator_format(make_client: Any) -> None:
    with make_client() as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        created = evaluate(
            client,
            {"uid": 7, "hotkey": "5Fabc"},
            tasks=tasks("t1", "t2", "t3"),
            protocol="solve_task",
        )
        assert created["id"].startswith("ev-") and created["state"] in ("queued", "deploying")
        body = wait_final(client, created["id"])
        assert (body["state"], body["ok"], body["reason"]) == ("finished", True, None), body
        assert body["commit"] == commit_of(REPO, "v1")
        assert body["cleaned_up"] is True and body["image_kept"] is True
        assert body["progress"] == {"tasks_total": 3, "tasks_done": 3, "tasks_ok": 3}
        assert body["deploy_s"] >= 0 and body["total_s"] >= body["deploy_s"]
        for result, task_id in zip(body["results"], ["t1", "t2", "t3"], strict=True):
            assert result["task_id"] == task_id
            assert result["outcome"] == "ok"
            assert result["actions"] == [
                {"type": "NavigateAction", "url": f"http://site.test/{task_id}"}
            ]
            assert result["web_agent_id"] == "7"  # the miner the validator named
            assert result["recording"] == f"rec-{task_id}"
            # the raw answer, and the task went to the agent untouched
            assert result["raw"][0]["web_agent_id"] == "agent-says"
            assert result["raw"][0]["echo"]["extra"] == [task_id]
            assert result["duration_s"] >= 0 and result["finished_at"] >= result["started_at"]
        assert {h for _, _, _, h in runtime.requests} == {"t1", "t2", "t3"}  # IWA-Task-ID
        assert_nothing_left(client, created["id"])

        # The same repo and commit again: the kept image is reused, nothing is rebuilt.
        builds = runtime.builds
        again = wait_final(client, evaluate(client, {}, protocol="solve_task")["id"])
        assert again["ok"] and again["image_reused"] is True and runtime.builds == builds
        assert again["results"][0]["web_agent_id"] == "agent-says"  # no identity given

        listed = client.get("/v1/integration/evaluations").json()["evaluations"]
        assert {e["id"] for e in listed} == {created["id"], again["id"]}
        finished = client.get("/v1/integration/evaluations?state=finished&limit=1").json()
        assert [e["id"] for e in finished["evaluations"]] == [again["id"]]  # newest first
        assert client.get("/v1/integration/evaluations?state=queued").json()["evaluations"] == []
        schema = client.get("/docs/openapi.json").json()
        assert "/v1/integration/evaluate-miner" in schema["paths"]


def test_tasks_in_parallel_per_agent_are_bounded(make_client: Any) -> None:
    with make_client() as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        with_build_args(client, {"DELAY": "0.15"})
        body = evaluate(client, {}, tasks=tasks(*(f"t{i}" for i in range(8))), max_parallel_tasks=3)
        body = wait_final(client, body["id"])
        assert body["ok"], body
        assert runtime.max_in_flight[f"dockyard-{body['id']}-blue"] == 3


def test_a_slow_agent_gets_task_timeout(make_client: Any) -> None:
    with make_client() as client:
        body = evaluate(
            client,
            {},
            tasks=tasks("slow-1", "slow-2"),
            timeouts={**FAST, "task_s": 0.3},
        )
        body = wait_final(client, body["id"])
        assert (body["state"], body["ok"], body["reason"]) == ("finished", False, "task_timeout")
        for result in body["results"]:
            assert (result["outcome"], result["reason"]) == ("timeout", "task_timeout")
            assert 0.25 <= result["duration_s"] < 3
        assert_nothing_left(client, body["id"])


def test_a_request_timeout_is_a_task_timeout_too(make_client: Any) -> None:
    with make_client() as client:
        body = evaluate(client, {}, tasks=tasks("slow-1"), timeouts={**FAST, "request_s": 0.2})
        body = wait_final(client, body["id"])
        assert body["reason"] == "task_timeout"
        assert "within 0.2 s" in body["results"][0]["message"]


def test_some_tasks_failing_is_not_a_zero_score_but_all_failing_is(make_client: Any) -> None:
    with make_client() as client:
        body = wait_final(client, evaluate(client, {}, tasks=tasks("ok-1", "broken-1"))["id"])
        assert (body["state"], body["ok"], body["reason"]) == ("finished", True, None)
        outcomes = {r["task_id"]: (r["outcome"], r["reason"]) for r in body["results"]}
        assert outcomes == {"ok-1": ("ok", None), "broken-1": ("failed", "agent_http_error")}
        body = wait_final(client, evaluate(client, {}, tasks=tasks("broken-1", "broken-2"))["id"])
        assert (body["ok"], body["reason"]) == (False, "all_tasks_failed")


@pytest.mark.parametrize(
    ("miner", "reason", "detail"),
    [
        ({"github_url": "https://gitlab.com/acme/agent"}, "invalid_github_url", None),
        ({"github_url": "https://github.com/acme"}, "invalid_github_url", None),
        ({"ref": "missing"}, "ref_not_found", "ref_not_found"),
    ],
)
def test_refused_sources_get_their_zero_score_reason(
    make_client: Any, miner: dict[str, Any], reason: str, detail: str | None
) -> None:
    with make_client() as client:
        body = wait_final(client, evaluate(client, miner)["id"])
        assert (body["state"], body["reason"]) == ("failed", reason), body
        assert body["ok"] is False and body["cleaned_up"] is True
        assert body["results"][0]["outcome"] == "cancelled"
        if detail:
            assert body["detail_reason"] == detail
        assert_nothing_left(client, body["id"])


def test_a_short_sha_ends_at_admission_without_a_fetch(make_client: Any, tmp_path: Path) -> None:
    """The git source refuses an abbreviated commit before the evaluation is queued: the
    202 already carries the final state (its repository does not even answer)."""
    from dockyard.plugins.git_source import GitSource
    from tests.gitserver import StallServer

    with StallServer() as closed:
        port = closed.port
    git = GitSource(tmp_path / "git", insecure=True)
    with make_client(sources={"git": git}) as client:
        url = f"git://127.0.0.1:{port}/acme/agent.git"
        body = evaluate(client, {"github_url": url, "ref": "3f9c2a1"})
        assert (body["state"], body["reason"]) == ("failed", "invalid_github_url"), body
        assert body["detail_reason"] == "invalid_repo_url"
        assert "abbreviated commit" in body["message"]
        assert body["queue_position"] is None and body["cleaned_up"] is True
        assert body["commit"] is None
        assert_nothing_left(client, body["id"])
    assert not (tmp_path / "git").exists() or not any((tmp_path / "git").rglob("*"))


def test_a_missing_ref_is_refused_when_required(make_client: Any) -> None:
    with make_client() as client:
        body = evaluate(client, {"ref": None}, require_ref=True)
        assert (body["state"], body["reason"]) == ("failed", "missing_ref")


@pytest.mark.parametrize(
    ("build_args", "detail"),
    [({"BUILD": "fail"}, "build_failed"), ({"HEALTH": "fail"}, "health_check_failed")],
)
def test_deploy_failures_are_deploy_failed_with_the_dockyard_reason(
    make_client: Any, build_args: dict[str, str], detail: str
) -> None:
    with make_client() as client:
        with_build_args(client, build_args)
        body = wait_final(client, evaluate(client, {}, timeouts={**FAST, "health_s": 0.5})["id"])
        assert (body["state"], body["reason"], body["detail_reason"]) == (
            "failed",
            "deploy_failed",
            detail,
        ), body
        assert body["commit"] == commit_of(REPO, "v1")  # what was tried is still recorded
        if detail == "build_failed":  # the cause outlives the build log cleanup removes
            assert body["build_log_tail"] == [
                "boom",
                "dockyard: build_failed: build failed on request",
            ]
        else:
            assert body["build_log_tail"] == []
        assert_nothing_left(client, body["id"])
        assert body["build_refused"] == []


def test_a_failed_build_names_the_hosts_its_proxy_refused(make_client: Any) -> None:
    """The refused hosts travel as data from the build failure (the engines fill it from
    the proxy's summary) through the FAILED slot's event into the result."""
    with make_client() as client:
        with_build_args(client, {"BUILD": "refused"})
        body = wait_final(client, evaluate(client, {}, timeouts=FAST)["id"])
        assert (body["state"], body["detail_reason"]) == ("failed", "build_failed"), body
        assert body["build_refused"] == ["pypi.example:443", "10.0.0.5:80"], body
        assert_nothing_left(client, body["id"])


def test_the_build_log_tail_is_bounded_and_masks_secrets() -> None:
    from dockyard.plugins.evaluation.service import (
        BUILD_LOG_LINE_CHARS,
        BUILD_LOG_TAIL_BYTES,
        BUILD_LOG_TAIL_LINES,
        build_log_tail,
    )

    lines = [f"step {i}" for i in range(5000)]
    tail = build_log_tail(lines, [])
    assert tail == lines[-BUILD_LOG_TAIL_LINES:]
    long = build_log_tail(["x" * 10_000] * 100, [])
    assert all(len(line) <= BUILD_LOG_LINE_CHARS for line in long)
    assert sum(len(line) + 1 for line in long) <= BUILD_LOG_TAIL_BYTES
    assert long[-1].endswith("...")
    secret = build_log_tail(
        [
            "RUN curl -H 'Authorization: Bearer abc.def' http://x",
            "OPENAI_API_KEY=sk-live-123 pip install",
            'password: "hunter2 two"',
            "token dy_ab12cd_SeCrEt-value in use",
            "the env value s3cr3t-from-env leaked",
            "ordinary line",
        ],
        ["s3cr3t-from-env"],
    )
    joined = "\n".join(secret)
    for leaked in ("abc.def", "sk-live-123", "hunter2", "SeCrEt-value", "s3cr3t-from-env"):
        assert leaked not in joined, secret
    assert secret[-1] == "ordinary line" and "OPENAI_API_KEY=***" in secret[1]


def test_bad_requests_are_400_or_422(make_client: Any) -> None:
    with make_client() as client:
        miner = {"github_url": REPO}
        # Well-formed (they match the schema) but impossible as asked: 422.
        refused = [
            {"miner": miner, "tasks": tasks("t"), "protocol": "nope"},
            # solve_task is one-shot
            {"miner": miner, "tasks": tasks("t"), "mode": "session", "protocol": "solve_task"},
            {"miner": miner, "tasks": []},
            {"miner": miner, "tasks": [{"prompt": "no id"}]},
            {"miner": miner, "tasks": tasks("t"), "env": {"OPENAI_API_KEY": "sk-x"}},
        ]
        for body in refused:
            r = client.post("/v1/integration/evaluate-miner", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["reason"] == "unprocessable"
        # Not matching the schema: 400.
        body = {"miner": miner, "tasks": tasks("t"), "timeouts": {"task_s": -1}}
        r = client.post("/v1/integration/evaluate-miner", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["reason"] == "invalid_input"
        assert client.get("/v1/integration/evaluation/ev-000000000000").status_code == 404
        r = client.post("/v1/integration/evaluation/ev-000000000000/cancel")
        assert r.status_code == 404
        assert client.get("/v1/integration/evaluation/bad!id").status_code == 400


def test_the_gateway_is_passed_as_env_and_never_a_key(make_client: Any) -> None:
    """The validator's sandbox environment: the gateway in SANDBOX_GATEWAY_URL,
    OPENAI_BASE_URL (+ /openai/v1) and CHUTES_BASE_URL (+ /chutes/v1), named to the runtime
    as ``gateway_env`` so it puts the address the container reaches there; the agent's port
    and the miner's uid; never a key; the request cannot override them."""
    with make_client(agent_gateway="10.0.0.1:4000") as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        env_in = {"AGENT_MODE": "fast", "SANDBOX_AGENT_PORT": "1"}
        body = wait_final(client, evaluate(client, {"uid": 36}, env=env_in)["id"])
        assert body["ok"] and body["env_names"] == ["AGENT_MODE", "SANDBOX_AGENT_PORT"]
        spec = runtime.specs[-1]
        env = spec.env
        assert env["SANDBOX_GATEWAY_URL"] == "http://10.0.0.1:4000"
        assert env["OPENAI_BASE_URL"] == "http://10.0.0.1:4000/openai/v1"
        assert env["CHUTES_BASE_URL"] == "http://10.0.0.1:4000/chutes/v1"
        assert spec.gateway_env == {
            "SANDBOX_GATEWAY_URL": "",
            "OPENAI_BASE_URL": "/openai/v1",
            "CHUTES_BASE_URL": "/chutes/v1",
        }
        assert (env["SANDBOX_AGENT_PORT"], env["SANDBOX_AGENT_UID"]) == ("8000", "36")
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["AGENT_MODE"] == "fast"
        assert not [k for k in env if "KEY" in k]
        assert spec.labels[EVALUATION_LABEL] == body["id"]


def test_gateway_variables_are_the_operators(make_client: Any) -> None:
    """``eval_gateway_vars`` names the variables and suffixes; ``eval_gateway_env`` still
    adds its one name (suffix "")."""
    custom = {"LLM_URL": "/v1"}
    with make_client(
        agent_gateway="http://10.0.0.1:4000/gw", eval_gateway_vars=custom, eval_gateway_env="GW"
    ) as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        body = wait_final(client, evaluate(client, {})["id"])
        assert body["ok"], body
        spec = runtime.specs[-1]
        assert spec.gateway_env == {"GW": "", "LLM_URL": "/v1"}
        assert spec.env["LLM_URL"] == "http://10.0.0.1:4000/gw/v1"
        assert spec.env["GW"] == "http://10.0.0.1:4000/gw"
        assert "OPENAI_BASE_URL" not in spec.env and "SANDBOX_AGENT_UID" not in spec.env


def test_images_are_removed_when_the_policy_says_so(make_client: Any) -> None:
    with make_client(eval_keep_images=False) as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        body = wait_final(client, evaluate(client, {})["id"])
        assert body["ok"] and body["image"] and body["image_kept"] is False
        assert body["image"] not in runtime.images
        kept = wait_final(client, evaluate(client, {}, keep_image=True)["id"])
        assert kept["image_kept"] is True and kept["image"] in runtime.images


# ---------------------------------------------------------------- protocols
def test_step_protocol_relays_steps_until_done(make_client: Any) -> None:
    with make_client() as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        body = wait_final(client, evaluate(client, {})["id"])  # step: the default
        assert body["ok"], body
        result = body["results"][0]
        assert result["steps"] == 2
        assert result["actions"] == [
            {"name": "browser.navigate", "arguments": {"url": "http://localhost/t1"}}
        ]
        first, second = [b for _, route, b, _ in runtime.requests if route == "/step"]
        assert (first["step_index"], second["step_index"]) == (0, 1)
        assert first["protocol_version"] == "1.0" and first["task_id"] == "t1"
        assert first["url"] == "http://localhost/t1" and "extra" not in first
        assert first["history"] == []
        assert second["history"] == [{"action": "NavigateAction", "step": 0, "exec_ok": True}]
        assert body["protocol"] == "step"  # the default


def test_tools_and_reasoning_come_from_the_request(make_client: Any) -> None:
    with make_client() as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        tools = [{"name": "browser.click", "description": "click", "parameters": {}}]
        body = evaluate(client, {}, tools=tools, include_reasoning=True)
        assert body["tools"] == tools
        assert wait_final(client, body["id"])["ok"]
        sent = [b for _, route, b, _ in runtime.requests if route == "/step"]
        assert sent and all(b["tools"] == tools and b["include_reasoning"] for b in sent)
        r = client.post(
            "/v1/integration/evaluate-miner",
            json={"miner": {"github_url": REPO}, "tasks": tasks("t"), "tools": [{"name": ""}]},
        )
        assert r.status_code == 400 and "tools" in r.text, r.text


def test_step_posts_to_step_only_unless_told_to_fall_back(make_client: Any) -> None:
    """The validator posts to /step only: an /act-only agent fails ``step`` (404) but
    answers ``act``, or ``step`` with ``path_fallback``; legacy answer shapes normalize."""
    with make_client() as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        with_build_args(client, {"AGENT": "legacy"})
        body = wait_final(client, evaluate(client, {}, protocol="step")["id"])
        assert (body["ok"], body["reason"]) == (False, "all_tasks_failed"), body
        result = body["results"][0]
        assert (result["reason"], result["message"]) == (
            "agent_http_error",
            "/step answered HTTP 404",
        )
        assert [route for _, route, _, _ in runtime.requests] == ["/step"]
        for fields in ({"protocol": "act"}, {"protocol": "step", "path_fallback": True}):
            runtime.requests.clear()
            body = wait_final(client, evaluate(client, {}, **fields)["id"])
            assert body["ok"], body
            assert body["results"][0]["actions"] == [
                {"name": "browser.click", "arguments": {"x": 1}},
                {"name": "browser.navigate", "arguments": {"url": "http://site.test/next"}},
            ]
            assert body["results"][0]["steps"] == 3
            acts = [b for _, route, b, _ in runtime.requests if route == "/act"]
            assert [b["history"] for b in acts][-1] == [
                {"action": "ClickAction", "step": 0, "exec_ok": True},
                {"action": "NavigateAction", "step": 1, "exec_ok": True},
            ]


# ---------------------------------------------------------------- admission and batches
def test_a_batch_respects_its_concurrency_shows_positions_and_finishes(
    make_client: Any,
) -> None:
    with make_client(eval_max_agents=3) as client:
        runtime: AgentRuntime = client.app.state.services.runtime
        miners = [{"github_url": f"https://github.com/acme/m{i}", "ref": "main"} for i in range(5)]
        miners[3]["ref"] = "missing"
        r = client.post(
            "/v1/integration/evaluate-miners-batch",
            json={
                "miners": miners,
                "tasks": tasks("t1", "t2"),
                "concurrency": 2,
                "timeouts": FAST,
                "max_parallel_tasks": 1,
            },
        )
        assert r.status_code == 202, r.text
        batch = r.json()
        assert batch["id"].startswith("batch-") and batch["concurrency"] == 2
        positions = sorted(
            e["queue_position"] for e in batch["evaluations"] if e["state"] == "queued"
        )
        assert positions == list(range(1, len(positions) + 1)) and len(positions) >= 3
        body = wait_final(client, batch["id"], timeout=30)
        assert body["state"] == "finished", body
        assert body["progress"]["total"] == 5 and body["progress"]["finished"] == 5
        by_repo = {e["miner"]["github_url"]: e for e in body["evaluations"]}
        for i, miner in enumerate(miners):
            evaluation = by_repo[miner["github_url"]]
            if i == 3:
                assert evaluation["reason"] == "ref_not_found"
                continue
            assert evaluation["ok"], evaluation
            assert evaluation["commit"] == commit_of(miner["github_url"], "main")
        assert runtime.max_alive <= 2
        assert_nothing_left(client, *by_repo)


def test_the_queue_holds_past_the_agent_limit_and_cancel_cleans_up(make_client: Any) -> None:
    with make_client(eval_max_agents=1) as client:
        slow = evaluate(client, {}, tasks=tasks("slow-1"), timeouts={**FAST, "task_s": 30})
        queued = evaluate(client, {"ref": "v2"})
        assert queued["state"] == "queued" and queued["queue_position"] == 1
        deadline = time.monotonic() + 10
        while client.get(f"/v1/integration/evaluation/{slow['id']}").json()["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.03)
        r = client.post(f"/v1/integration/evaluation/{slow['id']}/cancel")
        assert r.status_code == 200
        body = r.json()
        assert (body["state"], body["reason"], body["cleaned_up"]) == (
            "cancelled",
            "cancelled",
            True,
        )
        assert body["results"][0]["outcome"] == "cancelled"
        after = wait_final(client, queued["id"])
        assert after["ok"], after  # the queue moved on
        assert_nothing_left(client, slow["id"], queued["id"])
        # cancelling again changes nothing
        again = client.post(f"/v1/integration/evaluation/{slow['id']}/cancel").json()
        assert again["state"] == "cancelled"


def test_cancelling_a_batch_cancels_queued_and_running_members(make_client: Any) -> None:
    with make_client(eval_max_agents=2) as client:
        miners = [{"github_url": f"https://github.com/acme/c{i}", "ref": "main"} for i in range(4)]
        batch = client.post(
            "/v1/integration/evaluate-miners-batch",
            json={"miners": miners, "tasks": tasks("slow-1"), "timeouts": {**FAST, "task_s": 30}},
        ).json()
        time.sleep(0.3)
        body = client.post(f"/v1/integration/evaluation/{batch['id']}/cancel").json()
        assert body["state"] == "finished"
        assert {e["state"] for e in body["evaluations"]} == {"cancelled"}
        assert all(e["cleaned_up"] for e in body["evaluations"])
        assert_nothing_left(client, *(e["id"] for e in body["evaluations"]))


# ---------------------------------------------------------------- sessions
def test_a_step_session_is_driven_by_the_validator_then_finished(make_client: Any) -> None:
    import json
    import urllib.request

    with make_client() as client:
        body = evaluate(client, {}, protocol="step", mode="session", tasks=[])
        deadline = time.monotonic() + 10
        while body["state"] != "session":
            assert time.monotonic() < deadline, body
            time.sleep(0.03)
            body = client.get(f"/v1/integration/evaluation/{body['id']}").json()
        session = body["session"]
        assert session["step_url"] == session["url"] + "/step"
        assert session["expires_at"] > time.time()
        answers = []
        for index in range(3):
            request = urllib.request.Request(
                session["step_url"],
                data=json.dumps(
                    {"task_id": "v1", "url": "http://s.test/", "step_index": index}
                ).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=5) as answer:
                answers.append(json.load(answer))
        assert answers[0]["tool_calls"][0]["name"] == "browser.navigate"
        assert answers[2]["done"] is True
        r = client.post(
            f"/v1/integration/evaluation/{body['id']}/finish", json={"results": [{"score": 1}]}
        )
        assert r.status_code == 200, r.text
        done = r.json()
        assert (done["state"], done["ok"]) == ("finished", True)
        assert done["session"]["closed_by"] == "validator"
        assert done["session"]["report"] == [{"score": 1}]
        assert_nothing_left(client, body["id"])
        r = client.post(f"/v1/integration/evaluation/{body['id']}/finish")
        assert r.status_code == 409


def test_a_session_ends_when_its_ttl_does(make_client: Any) -> None:
    with make_client() as client:
        body = evaluate(
            client,
            {},
            protocol="step",
            mode="session",
            tasks=[],
            timeouts={**FAST, "session_ttl_s": 0.5},
        )
        body = wait_final(client, body["id"])
        assert (body["state"], body["reason"]) == ("expired", "session_expired")
        assert body["session"]["closed_by"] == "ttl"
        assert_nothing_left(client, body["id"])


# ---------------------------------------------------------------- restarts
async def test_a_restart_ends_unfinished_evaluations_and_reaps_what_they_left(
    tmp_path: Path,
) -> None:
    runtime = AgentRuntime()
    ports = {"port_range_start": 48450, "port_range_end": 48460}
    async with started_services(
        tmp_path, runtime, data_dir=str(tmp_path / "data"), **ports
    ) as services:
        from dockyard.core.controller import Controller

        # What a killed dockyard left: a running evaluation's record, deployment, a
        # container, a port lease; and a container of an evaluation nobody remembers.
        controller = Controller.from_services(services)
        first = EvaluationService(
            controller, store=services.store, pm=services.pm, settings=services.settings
        )
        await first.start()
        from dockyard.plugins.evaluation import EvaluateMinerRequest

        request = msgspec.convert(
            {
                "miner": {"github_url": REPO, "ref": "v1"},
                "tasks": tasks("slow-1"),
                "timeouts": {**FAST, "task_s": 60},
            },
            EvaluateMinerRequest,
        )
        evaluation = await first.submit(request)
        for _ in range(200):
            if evaluation.state == "running":
                break
            await asyncio.sleep(0.02)
        assert evaluation.state == "running"
        run = first._runs[evaluation.id]
        assert run.task is not None
        first._stopping = True
        run.task.cancel()  # the process dies: no cleanup happens
        first._clean_up_protected = _no_cleanup  # type: ignore[method-assign]
        with contextlib.suppress(BaseException):
            await run.task
        await records.save(first.store, msgspec.structs.replace(evaluation, state="running"))
        await runtime.run(
            ContainerSpec(
                name="dockyard-ev-stranger-blue",
                image="x",
                container_port=8000,
                host_port=48459,
                labels={
                    **services.labels(),
                    LABEL_DEPLOYMENT: "ev-stranger",
                    EVALUATION_LABEL: "ev-stranger",
                },
            )
        )
        assert len(runtime.containers) == 2
        assert await services.store.list_leases()

        restarted = Controller.from_services(services)
        await restarted.start()
        second = EvaluationService(
            restarted, store=services.store, pm=services.pm, settings=services.settings
        )
        await second.start()
        try:
            got = await second.get(evaluation.id)
            assert (got.state, got.reason, got.cleaned_up) == (
                "failed",
                "controller_restarted",
                True,
            )
            assert got.results[0].outcome == "cancelled"
            assert runtime.containers == {}
            assert await services.store.list_leases() == {}
            assert await services.store.get_deployment(evaluation.id) is None
            assert evaluation.id not in (await services.router.served() or {})
        finally:
            await second.stop()
            await restarted.stop()


async def _no_cleanup(run: Any) -> None:
    return None


# ---------------------------------------------------------------- scope
def test_every_integration_route_needs_the_evaluate_scope(make_client: Any) -> None:
    import hashlib

    def token(scope: str) -> tuple[str, dict[str, Any]]:
        token_id = hashlib.sha256(scope.encode()).hexdigest()[:8]
        value = f"dy_{token_id}_" + scope[0] * 43
        record = {
            "id": token_id,
            "name": scope,
            "scopes": [scope],
            "sha256": hashlib.sha256(value.encode()).hexdigest(),
        }
        return value, record

    deployer, deployer_record = token("deploy")
    evaluator, evaluator_record = token("evaluate")
    with make_client(api_tokens=[deployer_record, evaluator_record]) as client:
        client.headers.pop("Authorization", None)
        body = {"miner": {"github_url": REPO, "ref": "v1"}, "tasks": tasks("t1")}
        routes = [
            ("POST", "/v1/integration/evaluate-miner", body),
            ("POST", "/v1/integration/evaluate-miners-batch", {"miners": [body["miner"]]}),
            ("GET", "/v1/integration/evaluation/ev-000000000000", None),
            ("GET", "/v1/integration/evaluations", None),
            ("POST", "/v1/integration/evaluation/ev-000000000000/cancel", None),
            ("POST", "/v1/integration/evaluation/ev-000000000000/finish", None),
        ]
        for method, path, payload in routes:
            denied = client.request(
                method, path, json=payload, headers={"Authorization": f"Bearer {deployer}"}
            )
            assert denied.status_code == 403, (path, denied.text)
            assert client.request(method, path, json=payload).status_code == 401
        allowed = client.post(
            "/v1/integration/evaluate-miner",
            json={**body, "timeouts": FAST},
            headers={"Authorization": f"Bearer {evaluator}"},
        )
        assert allowed.status_code == 202, allowed.text
        wait = client.get(
            f"/v1/integration/evaluation/{allowed.json()['id']}",
            headers={"Authorization": f"Bearer {evaluator}"},
        )
        assert wait.status_code == 200


def test_image_mode_without_an_image_needs_the_operators_sandbox_image(make_client: Any) -> None:
    miner = {"github_url": REPO, "ref": "v1", "build_mode": "image"}
    with make_client(eval_sandbox_image=None) as client:
        r = client.post(
            "/v1/integration/evaluate-miner", json={"miner": miner, "tasks": tasks("t")}
        )
        assert r.status_code == 422, r.text
        assert r.json()["message"] == "miner.image: required when build_mode is 'image'"
