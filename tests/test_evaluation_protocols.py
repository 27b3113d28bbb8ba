"""Agent protocols: the response shapes AUTOPPIA.md lists normalize to one, and a third
party registers its own protocol through ``dockyard_register_protocols``."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dockyard.core import hookimpl
from dockyard.core.plugins import build_plugin_manager
from dockyard.plugins.protocols import (
    AgentEndpoint,
    AgentError,
    AgentProtocol,
    Step,
    TaskAnswer,
    action_type,
    executed_call,
    history_item,
    legacy_tool_name,
    localhost_url,
    normalize_solution,
    normalize_step,
)
from dockyard.plugins.validator_tools import VALIDATOR_TOOLS

NAV = {"name": "browser.navigate", "arguments": {"url": "http://a.test/"}}


@pytest.mark.parametrize(
    ("raw", "calls", "done"),
    [
        ({"tool_calls": [NAV], "done": False}, [NAV], False),
        ({"actions": [NAV]}, [NAV], False),  # alias
        ({"tool_calls": [{"type": "function", "function": {**NAV, "arguments": '{"url": 1}'}}]},
         [{"name": "browser.navigate", "arguments": {"url": 1}}], False),  # OpenAI style
        ({"actions": [{"type": "ClickAction", "selector": "#go"}]},
         [{"name": "browser.click", "arguments": {"selector": "#go"}}], False),  # legacy typed
        ({"action": {"type": "TypeAction", "text": "hi"}},
         [{"name": "browser.type", "arguments": {"text": "hi"}}], False),
        ({"navigate_url": "http://a.test/"}, [NAV], False),
        ({"tool_calls": [], "content": "finished", "done": True}, [], True),
        ({"action": None, "done": True}, [], True),
    ],
)  # fmt: skip
def test_every_step_shape_normalizes(raw: dict[str, Any], calls: list[Any], done: bool) -> None:
    answer = normalize_step(raw)
    assert answer.tool_calls == calls
    assert answer.done is done


def test_step_errors_and_bad_shapes() -> None:
    assert normalize_step({"error": "no browser"}).error == "no browser"
    for raw in ([], {"tool_calls": "x"}, {"tool_calls": [1]}, {"actions": [{"nothing": 1}]}):
        with pytest.raises(AgentError) as caught:
            normalize_step(raw)
        assert caught.value.reason == "invalid_response"


def test_legacy_names() -> None:
    assert legacy_tool_name("DoubleClickAction") == "browser.double_click"
    assert legacy_tool_name("NavigateAction") == "browser.navigate"
    assert legacy_tool_name("Scroll") == "browser.scroll"


def test_solve_task_answers() -> None:
    raw = {"actions": [{"type": "ClickAction"}], "web_agent_id": 12, "recording": {"a": 1}}
    answer = normalize_solution(raw)
    assert answer.actions == raw["actions"] and answer.web_agent_id == "12"
    assert answer.recording == {"a": 1} and answer.raw == [raw]
    for bad in ({"actions": "x"}, {"actions": [1]}, "text"):
        with pytest.raises(AgentError):
            normalize_solution(bad)


#: The keys of IWA's StepRequest dump, in its order.
STEP_KEYS = ["protocol_version", "task_id", "prompt", "url", "html", "screenshot",
             "step_index", "history", "tools", "include_reasoning"]  # fmt: skip


def test_a_step_request_is_the_validators_body() -> None:
    task = {
        **{"id": "t1", "prompt": "p {x}", "url": "https://u:pw@demo.test:8001/a?b=1"},
        **{"html": "<b>", "x": 1, "tests": [], "snapshot_html": "<i>", "screenshot": None},
    }
    body = Step.request(task, 2, [{"action": "NOOP", "step": 0, "exec_ok": True}])
    keys = [k for k in STEP_KEYS if k != "screenshot"]
    assert list(body) == keys  # no task field beyond task_id and prompt, no null
    assert body["url"] == "https://localhost:8001/a?b=1" and body["html"] == "<b>"
    assert body["prompt"] == "p {x}" and body["step_index"] == 2
    assert body["tools"] == VALIDATOR_TOOLS and body["include_reasoning"] is False
    # a screenshot only when there is one; no html: ""; snapshot_html is an older input name
    body = Step.request({"id": "t", "screenshot": "iVBO", "snapshot_html": "<i>"}, 0, [], tools=[])
    assert list(body) == [k for k in STEP_KEYS if k not in ("prompt", "url")]
    assert (body["screenshot"], body["html"], body["tools"]) == ("iVBO", "<i>", [])
    assert Step.request({"id": "t"}, 0, [])["html"] == ""


@pytest.mark.parametrize(
    ("url", "rewritten"),
    [
        ("http://foo.com/page", "http://localhost/page"),
        ("https://example.com:8080/path?q=1", "https://localhost:8080/path?q=1"),
        ("http://[::1]:8013/", "http://localhost:8013/"),
        ("", ""),
    ],
)
def test_the_page_url_reaches_the_agent_on_localhost(url: str, rewritten: str) -> None:
    assert localhost_url(url) == rewritten


def test_the_validators_tools_and_history_items() -> None:
    names = [tool["name"] for tool in VALIDATOR_TOOLS]
    assert len(names) == len(set(names)) == 31
    assert {"browser.click", "browser.input", "browser.navigate", "browser.scroll",
            "browser.select_dropdown", "browser.wait", "user.request_input",
            } <= set(names)  # fmt: skip
    assert not {"browser.done", "browser.evaluate"} & set(names)
    for tool in VALIDATOR_TOOLS:
        assert set(tool) == {"name", "description", "parameters"} and tool["description"]
        assert tool["parameters"]["type"] == "object" and "type" not in tool["parameters"].get(
            "properties", {}
        )
    navigate = next(t for t in VALIDATOR_TOOLS if t["name"] == "browser.navigate")
    assert set(navigate["parameters"]["properties"]) == {"url", "go_back", "go_forward", "selector"}
    # what each name executes under the validator, and its history item
    for name, kind in [("browser.input", "TypeAction"), ("browser.type", "TypeAction"),
                       ("browser.dblclick", "DoubleClickAction"),
                       ("browser.double_click", "DoubleClickAction"),
                       ("user.request_input", "RequestUserInputAction"),
                       ("browser.nope", None), ("click", None)]:  # fmt: skip
        assert action_type({"name": name, "arguments": {}}) == kind, name
    typed = {"name": "browser.input", "arguments": {"text": "hi", "selector": None}}
    assert history_item(3, typed) == {"action": "TypeAction", "step": 3, "text": "hi",
                                      "exec_ok": True}  # fmt: skip
    assert history_item(4, None) == {"action": "NOOP", "step": 4, "exec_ok": True}
    nope = {"name": "browser.nope", "arguments": {}}
    assert executed_call([nope, typed]) is typed and executed_call([nope]) is None


async def test_the_endpoint_maps_http_failures_to_reasons(unused_tcp_port: int) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"fine": True})

    async def teapot(_: web.Request) -> web.Response:
        return web.Response(status=418)

    async def text(_: web.Request) -> web.Response:
        return web.Response(text="not json")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/teapot", teapot)
    app.router.add_post("/text", text)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        async with aiohttp.ClientSession() as session:
            agent = AgentEndpoint(session, f"http://127.0.0.1:{unused_tcp_port}", 2.0)
            assert await agent.post("/ok", {}, task_id="t") == {"fine": True}
            for path, reason in [
                ("/teapot", "agent_http_error"),
                ("/text", "invalid_response"),
                ("/missing", "agent_http_error"),
            ]:
                with pytest.raises(AgentError) as caught:
                    await agent.post(path, {}, task_id="t")
                assert caught.value.reason == reason
            gone = AgentEndpoint(session, "http://127.0.0.1:1", 2.0)
            with pytest.raises(AgentError) as caught:
                await gone.post("/ok", {}, task_id="t")
            assert caught.value.reason == "agent_unreachable"
    finally:
        await runner.cleanup()


class Echo(AgentProtocol):
    name = "echo"

    async def solve(self, agent: AgentEndpoint, task: dict[str, Any]) -> TaskAnswer:
        return TaskAnswer(actions=[task])


class EchoPlugin:
    @hookimpl
    def dockyard_register_protocols(self, register: Any) -> None:
        register("echo", Echo)


def test_protocols_register_like_any_plugin() -> None:
    pm = build_plugin_manager(load_entry_points=False, extra_plugins=[("echo", EchoPlugin())])
    protocols = pm.registries.protocols
    assert {"solve_task", "step", "act", "echo"} <= set(protocols.names())
    assert protocols.owner("step") == "protocols" and protocols.owner("echo") == "echo"
    assert protocols.get("act")(None).step_path == "/act"


def test_the_defaults_are_the_validators(tmp_path: Any) -> None:
    """step in the API and the client; 25 s a step, 180 s a task, 12 steps, 5 tasks at once."""
    from dockyard.client import ValidatorIntegration
    from dockyard.client.models import Evaluation as EvaluationView
    from dockyard.core.config import Settings
    from dockyard.plugins.evaluation.models import EvaluationOptions
    from dockyard.plugins.evaluation.options import EvaluationConfig

    assert EvaluationOptions().protocol == "step" and EvaluationOptions().path_fallback is False
    assert EvaluationOptions().tools is None and EvaluationOptions().include_reasoning is False
    assert ValidatorIntegration("http://127.0.0.1:1").protocol == "step"
    assert EvaluationView(id="ev-1", state="queued").protocol == "step"
    config = EvaluationConfig.from_settings(Settings(data_dir=str(tmp_path)))
    assert (config.request_timeout_s, config.task_timeout_s) == (25.0, 180.0)
    assert (config.max_steps, config.tasks_per_agent) == (12, 5)
