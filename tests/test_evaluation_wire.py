"""The step wire format against fixture agents modelled on real miners (``tests/agents/``),
each served on loopback as its own process: dockyard's ``step`` and ``act`` send exactly the
validator's body (key set, order and JSON types), strict agents accept it and refuse the
body dockyard used to send, an agent reading ``snapshot_html`` sees nothing, and history
items arrive in the validator's shape. ``test_evaluation_wire_e2e.py`` runs the same agents
deployed by dockyard on real Podman.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.plugins.protocols import Act, AgentEndpoint, AgentError, Step
from dockyard.plugins.validator_tools import VALIDATOR_TOOLS
from tests.conftest import ROOT, free_port

AGENTS = ROOT / "tests" / "agents"
#: What the validator's step request holds, in order, with each value's JSON type (no
#: screenshot: the relay has none unless the task carries one).
STEP_TYPES = {
    "protocol_version": "string",
    "task_id": "string",
    "prompt": "string",
    "url": "string",
    "html": "string",
    "step_index": "integer",
    "history": "array",
    "tools": "array",
    "include_reasoning": "boolean",
}
#: An IWA task as the validator holds it: fields no agent ever receives.
TASK = {
    "id": "task-7",
    "prompt": "Search for <query> and open the first result",
    "url": "http://demo.test:8001/?seed=3",
    "html": "<main><input id=q></main>",
    "tests": [{"type": "CheckEventTest", "event_name": "SEARCH"}],
    "use_case": {"name": "SEARCH"},
    "web_project_id": "autocinema",
    "is_web_real": False,
    "specifications": {"viewport_width": 1280},
    "relevant_data": {},
}
TYPED = {
    "name": "browser.input",
    "arguments": {
        "selector": {"type": "attributeValueSelector", "attribute": "id", "value": "q"},
        "text": "hello",
    },
}
CLICKED = {"name": "browser.click", "arguments": {"x": 5, "y": 6}}
#: The history the validator's agent gets at steps 0, 1 and 2 of the three-step plan.
HISTORIES = [
    [],
    [{"action": "TypeAction", "step": 0, "text": "hello", "exec_ok": True}],
    [
        {"action": "TypeAction", "step": 0, "text": "hello", "exec_ok": True},
        {"action": "ClickAction", "step": 1, "exec_ok": True},
    ],
]


@contextlib.contextmanager
def served(script: Path) -> Iterator[str]:
    """Run an agent script on a free loopback port until the block ends; its base URL. The
    port is passed as real agents read it (``SANDBOX_AGENT_PORT``)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(script), "--host", "127.0.0.1"],
        env={**os.environ, "SANDBOX_AGENT_PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    out = process.stdout.read().decode() if process.stdout else ""
                    pytest.fail(f"{script.name} did not become healthy: {out}")
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


async def solve(protocol: Step, url: str, task: dict[str, Any], **options: Any) -> Any:
    async with aiohttp.ClientSession() as session:
        return await protocol.solve(AgentEndpoint(session, url, 10.0, 12, **options), task)


def post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.parametrize(("protocol", "script"), [(Step(), "step_only"), (Act(), "act_only")])
async def test_strict_agents_get_exactly_the_validators_keys(protocol: Step, script: str) -> None:
    with served(AGENTS / f"{script}.py") as url:
        answer = await solve(protocol, url, TASK)
    assert answer.error is None and answer.done and answer.steps == 3
    assert answer.actions == [TYPED, CLICKED]  # what the validator executes, one per step
    for index, raw in enumerate(answer.raw):
        got = raw["received"]
        assert got["keys"] == list(STEP_TYPES)  # exact keys, in the validator's order
        assert got["types"] == STEP_TYPES
        assert got["history"] == HISTORIES[index]
        assert got["tools"] == [tool["name"] for tool in VALIDATOR_TOOLS]
        assert got["url"] == "http://localhost:8001/?seed=3"  # the host as the validator sends it
        assert got["html"] == TASK["html"]
        assert got["headers"] == {"IWA-Task-ID": "task-7"}


async def test_a_screenshot_and_the_requests_tools_reach_the_agent_as_given() -> None:
    tools = [{"name": "browser.click", "description": "Click.", "parameters": {"type": "object"}}]
    task = {"id": "t", "prompt": "p", "url": "https://site.test/", "screenshot": "iVBORw0KGgo="}
    with served(AGENTS / "step_only.py") as url:
        answer = await solve(Step(), url, task, tools=tools, include_reasoning=True)
    got = answer.raw[0]["received"]
    assert got["keys"] == [*list(STEP_TYPES)[:5], "screenshot", *list(STEP_TYPES)[5:]]
    assert got["types"]["screenshot"] == "string" and got["html"] == ""
    assert got["tools"] == ["browser.click"] and got["url"] == "https://localhost/"


async def test_each_protocol_posts_to_its_path_only_unless_told_to_fall_back() -> None:
    with served(AGENTS / "act_only.py") as act_url, served(AGENTS / "step_only.py") as step_url:
        for protocol, url, path in [(Step(), act_url, "/step"), (Act(), step_url, "/act")]:
            with pytest.raises(AgentError) as caught:
                await solve(protocol, url, TASK)
            assert caught.value.reason == "agent_http_error"
            assert caught.value.message == f"{path} answered HTTP 404"
            answer = await solve(protocol, url, TASK, path_fallback=True)
            assert answer.steps == 3 and answer.actions == [TYPED, CLICKED]


def test_strict_agents_refuse_the_body_dockyard_used_to_send() -> None:
    """The fixtures are as strict as real agents: the old body (the task spread in,
    ``snapshot_html``, ``allowed_tools``, ``tools: null``) is a 422 naming each field."""
    old = {
        **TASK,
        "protocol_version": "1.0",
        "task_id": TASK["id"],
        "snapshot_html": TASK["html"],
        "screenshot": None,
        "step_index": 0,
        "history": [],
        "tools": None,
        "allowed_tools": None,
        "include_reasoning": False,
    }
    with served(AGENTS / "step_only.py") as url:
        status, body = post(f"{url}/step", old)
        assert status == 422
        problems = {(e["type"], e["loc"][-1]) for e in body["detail"]}
        assert {
            ("extra_forbidden", "snapshot_html"),
            ("extra_forbidden", "allowed_tools"),
            ("extra_forbidden", "tests"),
            ("string_type", "screenshot"),
            ("array_type", "tools"),
        } <= problems, problems
        # and an old-style history item is refused too
        exact = Step.request(TASK, 1, [{"step_index": 0, "tool_calls": [], "done": False}])
        status, body = post(f"{url}/step", exact)
        assert status == 422
        assert {e["loc"][-1] for e in body["detail"]} >= {"step_index", "action", "step"}


async def test_an_agent_reading_snapshot_html_sees_nothing() -> None:
    with served(AGENTS / "snapshot_reader.py") as url:
        answer = await solve(Step(), url, TASK)
    assert answer.content == "snapshot_html: absent"  # as under the validator
    assert answer.raw[0]["received"]["html"] == TASK["html"]  # the page comes as ``html``


async def test_the_example_agent_accepts_the_validators_body() -> None:
    with served(ROOT / "contrib" / "example-agent" / "agent.py") as url:
        for protocol in (Step(), Act()):
            answer = await solve(protocol, url, TASK)
            assert answer.error is None and answer.steps == 2
            assert answer.actions == [
                {"name": "browser.navigate", "arguments": {"url": "http://localhost:8001/?seed=3"}}
            ]
