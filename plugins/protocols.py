"""Agent protocols: how an evaluation talks to a miner's agent, as Autoppia's validator does.

Built-ins, registered through ``dockyard_register_protocols`` like a third party's:

- ``step`` (the default): the validator's protocol. ``POST /step`` once per step with
  exactly the body IWA's ``StepRequest`` dumps (``model_dump(exclude_none=True)``):
  ``protocol_version``, ``task_id``, ``prompt``, ``url`` (host rewritten to ``localhost``,
  port kept), ``html`` (``""`` when none), ``screenshot`` (only when there is one),
  ``step_index``, ``history``, ``tools`` (a list, never null) and ``include_reasoning``; no
  other task field and no ``null``. History items are the validator's, as they reach the
  agent: ``{"action": <executed action type or "NOOP">, "step": <int>, "text": <only when
  set>, "exec_ok": <bool>}`` (its ``candidate_id``, and ``text``/``error`` when null, are
  dropped by ``exclude_none``). ``tools`` is the evaluation's list when it gives one, else
  the validator's browser tools (:mod:`dockyard.plugins.validator_tools`). Like the
  validator's client it posts to ``/step`` only; trying ``/act`` after a 404 is the
  endpoint's ``path_fallback``, off by default. Steps go on until the agent says ``done``,
  returns no tool call, reports an error, or ``max_steps`` pass. Only the first action of an
  answer the validator could execute counts, as under the validator (the rest stay in
  ``raw``). Without a browser (dockyard relays, the validator drives pages) the page never
  changes: every step sees the task's own ``url`` and, when the task carries them, its
  ``html``/``screenshot``, and every action counts as executed; a validator that drives the
  browser asks the evaluation for a *session* instead and calls ``/step`` itself.
- ``act``: the same body under the protocol's older name, ``POST /act`` only (many current
  agents serve only ``/act``).
- ``solve_task``: the oldest, one-shot protocol, only when asked. ``POST /solve_task`` with
  the task object as given (``id``, ``prompt``, ``url`` and any extra field, untouched);
  the answer is ``{"actions": [...], "web_agent_id": ..., "recording": ...}``.

Step answers come in several shapes; :func:`normalize_step` turns each into one:
``tool_calls`` (``[{"name": "browser.click", "arguments": {...}}]``) or its alias
``actions``; OpenAI-style ``{"function": {"name", "arguments"}}`` entries; legacy typed
actions ``{"type": "ClickAction", ...}`` (named ``browser.click``: the type without
``Action``, in snake case, the other fields as arguments); ``{"action": {...}}``; and
``{"navigate_url": "..."}`` (``browser.navigate``).

A protocol's ``solve`` returns a :class:`TaskAnswer`; errors are :class:`AgentError` with a
stable reason (``task_timeout``, ``agent_unreachable``, ``agent_http_error``,
``invalid_response``).
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Model
from dockyard.plugins.validator_tools import ACTION_TYPES, VALIDATOR_TOOLS

#: An agent's answer above this many bytes is refused (``invalid_response``).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
PROTOCOL_VERSION = "1.0"
#: The header that tells the agent (and the LLM gateway it calls) which task this is.
TASK_HEADER = "IWA-Task-ID"


class AgentError(Exception):
    """The agent failed a request; ``reason`` is a stable code, ``raw`` what it sent."""

    def __init__(self, reason: str, message: str, *, raw: Any = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.raw = raw


class TaskAnswer(Model):
    """What a protocol got from the agent for one task, normalized."""

    actions: list[dict[str, Any]] = []
    web_agent_id: str | None = None
    recording: Any = None
    content: str | None = None
    done: bool = True
    error: str | None = None
    steps: int = 1
    raw: list[Any] = []


class StepAnswer(Model):
    """One step's answer, normalized."""

    tool_calls: list[dict[str, Any]] = []
    content: str | None = None
    reasoning: str | None = None
    done: bool = False
    error: str | None = None


@dataclass
class AgentEndpoint:
    """One agent as a protocol reaches it: its base URL (through the router when there is
    one), the bound of every request, and what a step request offers it."""

    session: aiohttp.ClientSession
    base_url: str
    request_timeout_s: float = 25.0
    max_steps: int = 12
    #: The ``tools`` of every step request; None: the validator's browser tools.
    tools: list[dict[str, Any]] | None = None
    include_reasoning: bool = False
    #: Whether ``step`` tries ``/act`` (and ``act`` tries ``/step``) after a 404; the
    #: validator never does.
    path_fallback: bool = False

    async def post(self, path: str, body: Any, *, task_id: str) -> Any:
        """POST ``body`` as JSON to ``path``; the decoded JSON answer.

        :raises AgentError: ``task_timeout`` past the request bound, ``agent_unreachable``,
            ``agent_http_error`` (with ``status`` in the message) or ``invalid_response``.
        """
        url = self.base_url.rstrip("/") + path
        try:
            async with self.session.post(
                url,
                json=body,
                headers={TASK_HEADER: task_id},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                allow_redirects=False,
            ) as response:
                data = await response.content.read(MAX_ANSWER_BYTES + 1)
                status = response.status
        except TimeoutError:
            raise AgentError(
                "task_timeout", f"no answer from {path} within {self.request_timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise AgentError("agent_unreachable", f"{path}: {exc or type(exc).__name__}") from None
        text = data[:MAX_ANSWER_BYTES].decode("utf-8", "replace")
        if len(data) > MAX_ANSWER_BYTES:
            raise AgentError("invalid_response", f"{path}: answer over {MAX_ANSWER_BYTES} bytes")
        if status >= 400:
            raise (
                AgentNotFound(path, text)
                if status == 404
                else AgentError(
                    "agent_http_error", f"{path} answered HTTP {status}", raw=text[:2000]
                )
            )
        try:
            return json.loads(text)
        except ValueError:
            raise AgentError(
                "invalid_response", f"{path} did not answer JSON", raw=text[:2000]
            ) from None


class AgentNotFound(AgentError):
    """The agent answered 404 for a protocol path (it may speak an older name)."""

    def __init__(self, path: str, text: str) -> None:
        super().__init__("agent_http_error", f"{path} answered HTTP 404", raw=text[:2000])


# ---------------------------------------------------------------- the contract
class AgentProtocol(abc.ABC):
    """How to get an agent's answer to one task. Built by ``factory(settings)`` registered
    through ``dockyard_register_protocols``; an evaluation names it in ``protocol``."""

    name: ClassVar[str]
    #: Whether a validator can drive it step by step through an evaluation's session.
    stateful: ClassVar[bool] = False
    #: The path a session's caller posts steps to (stateful protocols).
    step_path: ClassVar[str | None] = None

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def solve(self, agent: AgentEndpoint, task: dict[str, Any]) -> TaskAnswer:
        """The agent's whole answer to ``task``; raise AgentError when it fails."""


def task_id_of(task: dict[str, Any]) -> str:
    return str(task.get("id") or task.get("task_id") or "")


# ---------------------------------------------------------------- normalization
def legacy_tool_name(action_type: str) -> str:
    """``ClickAction`` -> ``browser.click``; ``DoubleClickAction`` -> ``browser.double_click``."""
    base = action_type[:-6] if action_type.endswith("Action") else action_type
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", base).lower()
    return f"browser.{snake or 'unknown'}"


def normalize_tool_call(item: Any) -> dict[str, Any]:
    """One tool call as ``{"name": str, "arguments": dict}``; AgentError when unusable."""
    if not isinstance(item, dict):
        raise AgentError("invalid_response", f"a tool call is not an object: {item!r:.100}")
    if isinstance(item.get("function"), dict):  # OpenAI style
        item = item["function"]
    if isinstance(item.get("name"), str) and item["name"]:
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise AgentError(
                    "invalid_response", f"tool call {item['name']}: arguments are not JSON"
                ) from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise AgentError("invalid_response", f"tool call {item['name']}: bad arguments")
        return {"name": item["name"], "arguments": arguments}
    if isinstance(item.get("type"), str) and item["type"]:
        rest = {k: v for k, v in item.items() if k != "type"}
        return {"name": legacy_tool_name(item["type"]), "arguments": rest}
    raise AgentError("invalid_response", f"a tool call has neither name nor type: {item!r:.100}")


def normalize_step(raw: Any) -> StepAnswer:
    """Every step answer shape AUTOPPIA.md lists, as one :class:`StepAnswer`."""
    if not isinstance(raw, dict):
        raise AgentError("invalid_response", "a step answer must be a JSON object", raw=raw)
    calls: Any = raw.get("tool_calls")
    if calls is None:
        calls = raw.get("actions")
    if calls is None and raw.get("action") is not None:
        calls = [raw["action"]]
    if calls is None and isinstance(raw.get("navigate_url"), str) and raw["navigate_url"]:
        calls = [{"name": "browser.navigate", "arguments": {"url": raw["navigate_url"]}}]
    if calls is None:
        calls = []
    if not isinstance(calls, list):
        raise AgentError("invalid_response", "tool_calls/actions must be a list", raw=raw)
    tool_calls = [normalize_tool_call(item) for item in calls]
    error = raw.get("error")
    return StepAnswer(
        tool_calls=tool_calls,
        content=_text(raw.get("content")),
        reasoning=_text(raw.get("reasoning")),
        done=bool(raw.get("done", False)),
        error=None if error in (None, "", False) else _text(error),
    )


def normalize_solution(raw: Any) -> TaskAnswer:
    """A one-shot ``solve_task`` answer: ``actions`` as sent (the validator's
    ``TaskSolution.actions``), ``web_agent_id`` and ``recording``."""
    if not isinstance(raw, dict):
        raise AgentError("invalid_response", "a solve_task answer must be a JSON object", raw=raw)
    actions = raw.get("actions")
    if actions is None:
        actions = raw.get("tool_calls", [])
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        raise AgentError("invalid_response", "actions must be a list of objects", raw=raw)
    agent_id = raw.get("web_agent_id")
    error = raw.get("error")
    return TaskAnswer(
        actions=actions,
        web_agent_id=None if agent_id is None else str(agent_id),
        recording=raw.get("recording"),
        content=_text(raw.get("content")),
        done=True,
        error=None if error in (None, "", False) else _text(error),
        steps=1,
        raw=[raw],
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------- built-ins
class SolveTask(AgentProtocol):
    """``POST /solve_task`` with the task object, once."""

    name = "solve_task"

    async def solve(self, agent: AgentEndpoint, task: dict[str, Any]) -> TaskAnswer:
        raw = await agent.post("/solve_task", task, task_id=task_id_of(task))
        return normalize_solution(raw)


# ---------------------------------------------------------------- the validator's step body
def localhost_url(url: str) -> str:
    """``url`` with its host replaced by ``localhost`` and its port kept, as the validator's
    client rewrites the page URL (user info is dropped; an empty URL stays empty)."""
    if not url:
        return url
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number: the validator's client fails there; keep the host
        port = None
    netloc = f"localhost:{port}" if port else "localhost"
    return urlunsplit(parts._replace(netloc=netloc))


def _action_key(name: str) -> str:
    """How IWA looks an action up: without ``Action``, ``_``, ``-`` or spaces, lower case."""
    key = name.strip()
    if key.endswith("Action"):
        key = key[: -len("Action")]
    return re.sub(r"[\s_\-]", "", key).lower()


def action_type(call: dict[str, Any]) -> str | None:
    """The IWA action type the validator executes for a normalized tool call
    (``browser.input`` -> ``TypeAction``), or None when it would execute none (unknown
    name or namespace)."""
    name = str(call.get("name") or "").strip().lower()
    arguments = call.get("arguments") or {}
    if name.startswith("browser."):
        key = str(arguments.get("type") or name.split(".", 1)[1].strip())
    elif name == "user.request_input":
        key = str(arguments.get("type") or "request_user_input")
    else:
        return None
    return ACTION_TYPES.get(_action_key(key)) if key.strip() else None


def history_item(step: int, call: dict[str, Any] | None) -> dict[str, Any]:
    """One step's history item as the validator's agent receives it: the executed action's
    type (``NOOP`` for none), the step, the action's ``text`` when it has one, and
    ``exec_ok``; without a browser every action counts as executed (no ``error``)."""
    item: dict[str, Any] = {"action": "NOOP", "step": step}
    if call is not None:
        item["action"] = action_type(call) or "NOOP"
        arguments = call.get("arguments") or {}
        text = arguments.get("text")
        key = str(arguments.get("type") or str(call.get("name", "")).split(".", 1)[-1]).strip()
        if key == "type" and "text" not in arguments:  # IWA reads a bare type's ``value``
            text = arguments.get("value", "")
        if text is not None:
            item["text"] = text
    item["exec_ok"] = True
    return item


def executed_call(calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tool call the validator executes for an answer: the first it knows."""
    return next((call for call in calls if action_type(call) is not None), None)


class Step(AgentProtocol):
    """``POST /step`` step by step until done, with the validator's exact body."""

    name = "step"
    stateful = True
    step_path = "/step"
    #: The path this protocol posts to, then the one ``path_fallback`` tries after a 404.
    paths: ClassVar[tuple[str, ...]] = ("/step", "/act")

    @staticmethod
    def request(
        task: dict[str, Any],
        step_index: int,
        history: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        include_reasoning: bool = False,
    ) -> dict[str, Any]:
        """One step's body, key for key what the validator sends: the task gives only
        ``task_id`` and ``prompt`` and the page (``url``, and ``html``/``screenshot`` when it
        carries them, ``snapshot_html`` taken as ``html``); absent values are left out."""
        body: dict[str, Any] = {"protocol_version": PROTOCOL_VERSION, "task_id": task_id_of(task)}
        prompt = task.get("prompt")
        if isinstance(prompt, str):
            body["prompt"] = prompt
        url = task.get("url")
        if isinstance(url, str):
            body["url"] = localhost_url(url)
        html = task.get("html", task.get("snapshot_html"))
        body["html"] = html if isinstance(html, str) else ""
        screenshot = task.get("screenshot")
        if isinstance(screenshot, str) and screenshot.strip():
            body["screenshot"] = screenshot.strip()
        body["step_index"] = step_index
        body["history"] = list(history)
        body["tools"] = list(VALIDATOR_TOOLS if tools is None else tools)
        body["include_reasoning"] = bool(include_reasoning)
        return body

    async def solve(self, agent: AgentEndpoint, task: dict[str, Any]) -> TaskAnswer:
        task_id = task_id_of(task)
        history: list[dict[str, Any]] = []
        actions: list[dict[str, Any]] = []
        raws: list[Any] = []
        paths = list(self.paths if agent.path_fallback else self.paths[:1])
        answer = StepAnswer()
        steps = 0
        for index in range(max(1, agent.max_steps)):
            body = self.request(
                task, index, history, tools=agent.tools, include_reasoning=agent.include_reasoning
            )
            raw = await self._post(agent, paths, body, task_id)
            raws.append(raw)
            steps += 1
            answer = normalize_step(raw)
            executed = executed_call(answer.tool_calls)
            if executed is not None:
                actions.append(executed)
            history.append(history_item(index, executed))
            if answer.done or answer.error or not answer.tool_calls:
                break
        return TaskAnswer(
            actions=actions,
            content=answer.content,
            done=answer.done or not answer.tool_calls,
            error=answer.error,
            steps=steps,
            raw=raws,
        )

    async def _post(
        self, agent: AgentEndpoint, paths: list[str], body: dict[str, Any], task_id: str
    ) -> Any:
        while True:
            try:
                return await agent.post(paths[0], body, task_id=task_id)
            except AgentNotFound:
                if len(paths) == 1:
                    raise
                paths.pop(0)  # path_fallback: the agent serves only the other name


class Act(Step):
    """The step protocol under its older name: ``POST /act`` only."""

    name = "act"
    step_path = "/act"
    paths = ("/act", "/step")


BUILTIN_PROTOCOLS: dict[str, Callable[..., AgentProtocol]] = {
    SolveTask.name: SolveTask,
    Step.name: Step,
    Act.name: Act,
}


@hookimpl(optionalhook=True)  # the hookspec is the evaluation plugin's: absent without it
def dockyard_register_protocols(register: Any) -> None:
    """Register ``solve_task``, ``step`` and ``act``."""
    for name, factory in BUILTIN_PROTOCOLS.items():
        register(name, factory)
