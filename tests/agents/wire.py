"""What the fixture agents share: a strict step request model and a one-route HTTP server.

Real agents declare their request as a pydantic model with ``extra="forbid"``; this is the
same in the standard library (the fixture agents run on ``localhost/dockyard/base-python``,
which has no pydantic): a key the validator does not send, a missing one or a value of
another JSON type answers 422 with pydantic's error shape. Every answer carries what the
agent received as ``received`` (keys in order, JSON types, history, tool names, url), an
extra field the validator and dockyard ignore, so a test reads it back from the raw answers.

An agent module calls :func:`serve` with its one route and its answer function. Like a real
agent it reads its port from ``SANDBOX_AGENT_PORT`` (8000); ``--host`` is the address
(``0.0.0.0`` in a container, as uvicorn's ``--host``; the loopback tests pass 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: key: (JSON type, required) -- the validator's StepRequest as it reaches an agent.
STEP_FIELDS = {
    "protocol_version": ("string", True),
    "task_id": ("string", True),
    "prompt": ("string", True),
    "url": ("string", True),
    "html": ("string", True),
    "screenshot": ("string", False),
    "step_index": ("integer", True),
    "history": ("array", True),
    "tools": ("array", True),
    "include_reasoning": ("boolean", True),
}
#: One history item as the validator's agent receives it (nulls are never sent).
HISTORY_FIELDS = {
    "action": ("string", True),
    "error": ("string", False),
    "step": ("integer", True),
    "text": ("string", False),
    "exec_ok": ("boolean", True),
}
TOOL_FIELDS = {
    "name": ("string", True),
    "description": ("string", True),
    "parameters": ("object", True),
}
Answer = Callable[[dict[str, Any]], dict[str, Any]]


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def check(value: Any, fields: dict[str, tuple[str, bool]], loc: list[Any]) -> list[dict]:
    """pydantic-style errors of ``value`` against ``fields`` (empty when it fits)."""
    if not isinstance(value, dict):
        return [{"type": "model_type", "loc": loc, "msg": "Input should be an object"}]
    errors = [
        {"type": "extra_forbidden", "loc": [*loc, key], "msg": "Extra inputs are not permitted"}
        for key in value
        if key not in fields
    ]
    for key, (kind, required) in fields.items():
        if key not in value:
            if required:
                errors.append({"type": "missing", "loc": [*loc, key], "msg": "Field required"})
        elif json_type(value[key]) != kind:
            errors.append(
                {"type": f"{kind}_type", "loc": [*loc, key], "msg": f"Input should be a {kind}"}
            )
    return errors


def strict_errors(body: Any) -> list[dict]:
    """Every way ``body`` differs from the validator's step request."""
    errors = check(body, STEP_FIELDS, ["body"])
    if errors:
        return errors
    for index, item in enumerate(body["history"]):
        errors += check(item, HISTORY_FIELDS, ["body", "history", index])
    for index, tool in enumerate(body["tools"]):
        errors += check(tool, TOOL_FIELDS, ["body", "tools", index])
    return errors


def received(body: dict[str, Any], task_header: str | None) -> dict[str, Any]:
    """What the agent got, for the test to compare."""
    tools = body.get("tools")
    return {
        "keys": list(body),
        "types": {key: json_type(value) for key, value in body.items()},
        "history": body.get("history"),
        "tools": [t.get("name") for t in tools] if isinstance(tools, list) else tools,
        "url": body.get("url"),
        "html": body.get("html"),
        "headers": {"IWA-Task-ID": task_header},
    }


def serve(route: str, answer: Answer, *, strict: bool = True) -> None:
    """Serve ``GET /health`` and ``POST route`` (every other path: 404) until killed."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path != route:
                self._send(404, {"detail": "Not Found"})
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._send(422, {"detail": [{"type": "json_invalid", "loc": ["body"]}]})
                return
            errors = strict_errors(body) if strict else []
            if errors:
                self._send(422, {"detail": errors})
                return
            reply = answer(body)
            reply["received"] = received(body, self.headers.get("IWA-Task-ID"))
            self._send(200, reply)

        def log_message(self, fmt: str, *args: Any) -> None:
            sys.stdout.write(f"{self.command} {self.path} {fmt % args}\n")
            sys.stdout.flush()

    port = int(os.environ.get("SANDBOX_AGENT_PORT") or 8000)
    host = sys.argv[sys.argv.index("--host") + 1] if "--host" in sys.argv[:-1] else "0.0.0.0"
    server = ThreadingHTTPServer((host, port), Handler)
    print(f"serving POST {route} on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def three_steps(body: dict[str, Any]) -> dict[str, Any]:
    """Type into the search box, click, then finish: what a small real agent does."""
    index = body.get("step_index", 0)
    if index == 0:
        selector = {"type": "attributeValueSelector", "attribute": "id", "value": "q"}
        call = {"name": "browser.input", "arguments": {"selector": selector, "text": "hello"}}
        return {"protocol_version": "1.0", "tool_calls": [call], "done": False}
    if index == 1:
        call = {"name": "browser.click", "arguments": {"x": 5, "y": 6}}
        return {"protocol_version": "1.0", "tool_calls": [call], "done": False}
    return {"protocol_version": "1.0", "tool_calls": [], "content": "finished", "done": True}
