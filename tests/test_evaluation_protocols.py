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
    legacy_tool_name,
    normalize_solution,
    normalize_step,
)

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


def test_step_requests_carry_the_new_and_the_old_field_names() -> None:
    body = Step.request({"id": "t1", "prompt": "p", "url": "u", "html": "<b>", "x": 1}, 2, [])
    assert body["protocol_version"] == "1.0" and body["task_id"] == "t1"
    assert body["html"] == body["snapshot_html"] == "<b>"
    assert body["step_index"] == 2 and body["history"] == [] and body["x"] == 1


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
