"""A real FastAPI agent from git, evaluated exactly as the validator runs it: real Podman,
the Caddy router, a loopback git daemon, dockyard served by uvicorn, the agent sandbox
image built by ``dockyard sandbox-image build`` (``sandbox_image``, once per session), an
LLM gateway on the host's loopback that answers 400 without ``IWA-Task-ID``.

The agent (``main.py`` only, ``build_mode: "image"``, the miner names no image) reads its
gateway from ``SANDBOX_GATEWAY_URL`` and shows what its sandbox looks like from inside:
working directory, uid, HOME, environment, the ``/app/logs`` tmpfs. It is evaluated in
session mode (driven step by step by the step protocol as a client) and in relay mode;
afterwards no container, port lease or route is left, and the cached checkout is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.client import Evaluation, ValidatorIntegration
from dockyard.plugins.protocols import AgentEndpoint, Step
from tests.gitserver import GitDaemon, RepoBuilder
from tests.test_evaluation import AUTH, TEST_SETTINGS
from tests.test_evaluation_client import live_dockyard
from tests.test_evaluation_e2e import Dockyard

pytestmark = [pytest.mark.podman, pytest.mark.slow]

TIMEOUTS = {"health_s": 30, "health_interval_s": 0.2, "task_s": 30, "request_s": 10}
#: The fixture agent: FastAPI, stdlib HTTP to the gateway, any step body accepted.
AGENT = '''\
import json
import os
import urllib.error
import urllib.request

from fastapi import FastAPI, Request

app = FastAPI()
NAMES = ["SANDBOX_GATEWAY_URL", "OPENAI_BASE_URL", "CHUTES_BASE_URL", "SANDBOX_AGENT_PORT",
         "SANDBOX_AGENT_UID", "PYTHONUNBUFFERED", "HOME"]


def ask_gateway(task_id):
    """One chat completion through the gateway, as agents do, with IWA-Task-ID."""
    url = os.environ["SANDBOX_GATEWAY_URL"] + "/openai/v1/chat/completions"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    headers = {"IWA-Task-ID": task_id, "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body.encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["choices"][0]["message"]["content"]
    except (OSError, urllib.error.URLError) as exc:
        return "gateway-error: %s" % exc


@app.get("/health")
def health():
    return {"status": "ok"}


@app.get("/sandbox")
def sandbox():
    with open("logs/probe.txt", "w") as handle:  # relative: the working directory is /app
        handle.write("written")
    with open("/proc/mounts") as handle:
        mounts = [line for line in handle if " /app" in line]
    try:
        open("/app/escape.txt", "w").close()
        app_writable = True
    except OSError:
        app_writable = False
    return {
        "cwd": os.getcwd(),
        "uid": os.getuid(),
        "env": {name: os.environ.get(name) for name in NAMES},
        "logs": open("logs/probe.txt").read(),
        "mounts": mounts,
        "app_writable": app_writable,
    }


@app.post("/step")
async def step(request: Request):
    body = await request.json()
    index = int(body.get("step_index", 0))
    content = ask_gateway(str(body.get("task_id", "")))
    if index < 2:
        call = {"name": "browser.navigate", "arguments": {"url": "http://site.test/%d" % index}}
        return {"tool_calls": [call], "content": content, "done": False}
    return {"tool_calls": [], "content": content, "done": True}
'''


class Gateway(ThreadingHTTPServer):
    """The operator's LLM gateway on the host's loopback: 400 without ``IWA-Task-ID``,
    else a chat completion naming the task; every request recorded."""

    daemon_threads = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), GatewayHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class GatewayHandler(BaseHTTPRequestHandler):
    server: Gateway

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        task_id = self.headers.get("IWA-Task-ID")
        self.server.calls.append((self.path, task_id))
        if not task_id:
            status, body = 400, {"detail": "IWA-Task-ID header is required"}
        else:
            status, body = 200, {"choices": [{"message": {"content": f"gw:{task_id}"}}]}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class Sandbox(Dockyard):
    gateway: Gateway
    image: str


@pytest.fixture(scope="module")
def sandbox(sandbox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    from dockyard.core.config import Settings
    from tests.conftest import free_port
    from tests.test_evaluation_e2e import _required

    _required()
    gateway = Gateway()
    thread = threading.Thread(target=gateway.serve_forever, daemon=True)
    thread.start()
    data = tmp_path_factory.mktemp("sandbox-data")
    settings = Settings(
        data_dir=str(data),
        **{
            **TEST_SETTINGS,
            "insecure_sources": True,
            "port_range_start": 46300,
            "port_range_end": 46340,
            "router": "caddy",
            "plugins": {"caddy": {"listen": f"127.0.0.1:{free_port()}"}},
            "agent_gateway": f"127.0.0.1:{gateway.port}",
            "eval_sandbox_image": sandbox_image,
        },
    )
    root = tmp_path_factory.mktemp("sandbox-repos") / "served"
    repos = RepoBuilder(root)
    try:
        with GitDaemon(root) as git, live_dockyard(settings) as (url, app):
            info = app.state.services.runtime_info
            if info is None or not info.egress_enforced:
                note = info.egress_note if info else "no runtime"
                pytest.skip(f"the gateway is unreachable without the network policy: {note}")
            box = Sandbox(url, app, data, git, repos)
            box.gateway, box.image = gateway, sandbox_image
            repo = repos.new("fastapi-agent")
            repo.write("main.py", AGENT)
            repo.write("requirements.txt", "fastapi\nuvicorn\n")  # the sandbox ignores it
            box.commits["fastapi-agent"] = repo.commit("a FastAPI agent")
            yield box
    finally:
        gateway.shutdown()
        gateway.server_close()


def validator(box: Sandbox) -> ValidatorIntegration:
    token = AUTH["Authorization"].removeprefix("Bearer ")
    return ValidatorIntegration(box.url, token=token, timeouts=TIMEOUTS, poll_s=0.2)


def image_miner(box: Sandbox) -> dict[str, Any]:
    """The miner as the validator sends it: image mode, no image (the sandbox's)."""
    return {"build_mode": "image"}


def cached_checkout(box: Sandbox, commit: str) -> Path:
    [checkout] = (box.data_dir / "sources").glob(f"*/{commit}")
    return checkout


async def test_a_fastapi_agent_in_a_session_sees_the_validators_sandbox(box: Sandbox) -> None:
    url = f"{box.git.url}/fastapi-agent.git"
    async with validator(box) as vi:
        opened = await vi.evaluate_miner_from_github(
            url, "main", protocol="step", mode="session", uid=36, miner_fields=image_miner(box)
        )
        assert opened.state == "session" and opened.session is not None, opened
        try:
            await drive_the_session(box, vi, opened)
        finally:  # a failed check must not leave the agent to the next test
            await vi.client.cancel_evaluation(opened.id)
    checkout = cached_checkout(box, box.commits["fastapi-agent"])
    assert sorted(p.name for p in checkout.iterdir()) == [".git", "main.py", "requirements.txt"]


async def drive_the_session(box: Sandbox, vi: ValidatorIntegration, opened: Evaluation) -> None:
    """Look at the sandbox from inside, drive several steps, finish."""
    assert opened.image == box.image and opened.commit == box.commits["fastapi-agent"]
    assert opened.session is not None
    session = opened.session
    async with aiohttp.ClientSession() as http:
        async with http.get(session.url.rstrip("/") + "/sandbox") as response:
            if response.status != 200:
                await asyncio.sleep(1)  # the traceback follows the access line
                async with box.client() as client:
                    logs = await client.logs(opened.id, tail=60)
                pytest.fail("\n".join(logs["lines"]))
            inside = await response.json()
        # The step protocol as a client, several steps through the router.
        agent = AgentEndpoint(http, session.url, request_timeout_s=10, max_steps=6)
        task = {"id": "session-task", "prompt": "open the page", "url": "http://site.test/"}
        answer = await Step().solve(agent, task)
    assert inside["cwd"] == "/app" and inside["uid"] == 10001, inside
    env = inside["env"]
    gateway = env["SANDBOX_GATEWAY_URL"]
    assert re.fullmatch(rf"http://\d+\.\d+\.\d+\.\d+:{box.gateway.port}", gateway), env
    assert not gateway.startswith("http://127."), env  # the address the container reaches
    assert env["OPENAI_BASE_URL"] == gateway + "/openai/v1"
    assert env["CHUTES_BASE_URL"] == gateway + "/chutes/v1"
    assert (env["SANDBOX_AGENT_PORT"], env["SANDBOX_AGENT_UID"]) == ("8000", "36")
    assert (env["HOME"], env["PYTHONUNBUFFERED"]) == ("/tmp", "1")
    assert inside["logs"] == "written" and inside["app_writable"] is False
    logs = next(line for line in inside["mounts"] if " /app/logs " in line)
    assert logs.split()[2] == "tmpfs" and "noexec" in logs.split()[3].split(","), logs
    app = next(line for line in inside["mounts"] if " /app " in line)
    assert "ro" in app.split()[3].split(","), app

    assert answer.steps == 3 and answer.done and not answer.error, answer
    assert [a["name"] for a in answer.actions] == ["browser.navigate"] * 2
    assert answer.content == "gw:session-task"  # the agent reached its gateway
    assert box.gateway.calls.count(("/openai/v1/chat/completions", "session-task")) == 3

    done = await vi.client.finish_session(opened.id, [{"task_id": "session-task"}])
    assert (done.state, done.ok) == ("finished", True), done
    await box.assert_nothing_left(done)


async def test_a_fastapi_agent_relayed_step_by_step(box: Sandbox) -> None:
    url = f"{box.git.url}/fastapi-agent.git"
    tasks = [
        {"id": f"relay-{i}", "prompt": f"task {i}", "url": f"http://site.test/{i}"}
        for i in range(2)
    ]
    async with validator(box) as vi:
        result: Evaluation = await vi.evaluate_miner_from_github(
            url, "main", tasks=tasks, protocol="step", uid=36, miner_fields=image_miner(box)
        )
    assert (result.state, result.ok, result.reason) == ("finished", True, None), result
    assert result.image == box.image and result.commit == box.commits["fastapi-agent"]
    for item in result.results:
        assert item.outcome == "ok" and item.steps == 3, item
        assert [a["name"] for a in item.actions] == ["browser.navigate"] * 2
        assert {raw["content"] for raw in item.raw} == {f"gw:{item.task_id}"}
        assert item.web_agent_id == "36"
    for task in tasks:
        calls = box.gateway.calls.count(("/openai/v1/chat/completions", task["id"]))
        assert calls == 3, box.gateway.calls
    assert all(task_id for _, task_id in box.gateway.calls)  # never without the header
    await box.assert_nothing_left(result)


@pytest.fixture
def box(sandbox: Sandbox) -> Sandbox:
    return sandbox
