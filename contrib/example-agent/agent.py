"""An example web agent speaking Autoppia's protocols (standard library only).

Routes: GET /health; POST /step and its older name /act (one step: tool calls for the
validator's browser); POST /solve_task (the oldest one-shot protocol). It answers with a
fixed, harmless plan: navigate to the step's URL, then finish. Copy it as a template.

A step body is the validator's: ``protocol_version``, ``task_id``, ``prompt``, ``url`` (its
host is ``localhost``), ``html``, ``screenshot`` (only when there is one), ``step_index``,
``history``, ``tools`` and ``include_reasoning``; read the page from ``html`` (the validator
never sends ``snapshot_html``). The port comes from ``SANDBOX_AGENT_PORT`` (as the
validator's sandbox sets it), else ``PORT``, else 8000; ``--host`` picks the address.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AGENT_ID = os.environ.get("AGENT_ID", "dockyard-example-agent")
VERSION = os.environ.get("AGENT_VERSION", "1")


def step(task: dict) -> dict:
    """One step of the stateful protocol."""
    index = int(task.get("step_index") or 0)
    url = task.get("url") or ""
    if index == 0 and url:
        calls = [{"name": "browser.navigate", "arguments": {"url": url}}]
        return {
            "protocol_version": "1.0",
            "tool_calls": calls,
            "content": "navigating",
            "reasoning": None,
            "done": False,
            "error": None,
        }
    return {
        "protocol_version": "1.0",
        "tool_calls": [],
        "content": "done",
        "reasoning": None,
        "done": True,
        "error": None,
    }


def solve_task(task: dict) -> dict:
    """The one-shot protocol: every action at once."""
    url = task.get("url") or ""
    actions = [{"type": "NavigateAction", "url": url}] if url else []
    return {
        "actions": actions,
        "web_agent_id": task.get("web_agent_id") or AGENT_ID,
        "recording": "",
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "example-agent/" + VERSION

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.split("?")[0] in ("/health", "/"):
            self._send(200, {"status": "ok", "agent": AGENT_ID, "version": VERSION})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 10 * 1024 * 1024)
        try:
            task = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(400, {"error": "body is not JSON"})
            return
        route = self.path.split("?")[0]
        if route in ("/step", "/act"):
            self._send(200, step(task))
        elif route == "/solve_task":
            self._send(200, solve_task(task))
        else:
            self._send(404, {"error": "not found"})

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {fmt % args}\n")


if __name__ == "__main__":
    port = int(os.environ.get("SANDBOX_AGENT_PORT") or os.environ.get("PORT") or "8000")
    host = sys.argv[sys.argv.index("--host") + 1] if "--host" in sys.argv[:-1] else "0.0.0.0"
    print(f"{AGENT_ID} v{VERSION} listening on {host}:{port}", flush=True)
    ThreadingHTTPServer((host, port), Handler).serve_forever()
