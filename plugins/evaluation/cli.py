"""The evaluation plugin's commands, added to the ``dockyard`` command line through
``dockyard_cli_commands`` (:func:`add_commands`):

- ``dockyard evaluate URL``: evaluate one repository the way the validator will (by default
  in the agent sandbox image, ``build_mode: "image"``), with live progress and a results
  table (``--wait``), or open a step session (``--session``);
- ``dockyard sandbox-image build --requirements FILE``: make the agent sandbox image on this
  host's engine (``dockyard.plugins.evaluation.sandbox_image``).

Errors the user can cause are one line, ``dockyard: error: ...``, like every command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dockyard.client import DockyardClient
from dockyard.client.models import Evaluation, TaskResult
from dockyard.core.config import Settings
from dockyard.core.errors import DockyardError
from dockyard.plugins.evaluation.options import SANDBOX_IMAGE

if TYPE_CHECKING:
    from dockyard.api.cli_plugins import CliRegistrar


def add_commands(register: CliRegistrar) -> None:
    """Add ``evaluate`` (a client of the routes) and ``sandbox-image`` (the engine's)."""
    evaluate = register.api_command(
        "evaluate",
        run_evaluate,
        help="evaluate a miner's repository as the validator does",
        description="Deploy a repository as an ephemeral agent, relay tasks to it (or open a "
        "step session), show its answers, and clean up.",
    )
    evaluate.add_argument(
        "repo", metavar="URL", help="e.g. https://github.com/miner/agent/tree/main"
    )
    evaluate.add_argument("--ref", help="branch, tag or full commit (default: from the URL)")
    evaluate.add_argument("--subdir", help="subdirectory holding the agent")
    evaluate.add_argument(
        "--tasks", metavar="FILE", help="JSON file: a list of IWA tasks (id, prompt, url, ...)"
    )
    evaluate.add_argument("--prompt", help="one task's prompt (instead of --tasks)")
    evaluate.add_argument("--task-url", dest="task_url", help="one task's start URL")
    evaluate.add_argument(
        "--protocol", help="agent protocol: step, act or solve_task (default: the server's)"
    )
    evaluate.add_argument(
        "--session",
        action="store_true",
        help="open a step session and print its step URL instead of relaying tasks",
    )
    evaluate.add_argument(
        "--build",
        dest="build_mode",
        choices=["image", "dockerfile"],
        default="image",
        help="image: run the source in the sandbox image, as the validator does (default); "
        "dockerfile: build the repository's Dockerfile",
    )
    evaluate.add_argument("--image", help="the image for --build image (default: the server's)")
    evaluate.add_argument("--uid", type=int, help="the miner's uid (SANDBOX_AGENT_UID)")
    evaluate.add_argument("--port", dest="container_port", type=int, help="the agent's port")
    evaluate.add_argument(
        "--wait",
        action="store_true",
        help="follow the evaluation, showing progress, then print the results table",
    )
    evaluate.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow at most")
    evaluate.add_argument(
        "--poll", type=float, default=1.0, help="seconds between progress checks (default 1)"
    )

    image = register.local_command(
        "sandbox-image", run_sandbox_image, help="the agent sandbox image"
    )
    actions = image.add_subparsers(dest="sandbox_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="build the image agents run in, offline, from a requirements file",
        description="Download wheels for the base image's Python with this host's pip, "
        "then build the sandbox image with no network.",
    )
    build.add_argument("--requirements", required=True, metavar="FILE", help="pip requirements")
    build.add_argument("--tag", default=SANDBOX_IMAGE, help=f"image tag (default {SANDBOX_IMAGE})")
    build.add_argument(
        "--base", help="base image (default: python:3.11-slim, else dockyard's offline base)"
    )
    build.add_argument(
        "--if-missing", action="store_true", help="do nothing when the tag already exists"
    )
    build.add_argument("--runtime", help="container runtime plugin (default podman)")
    build.add_argument("--podman-socket", dest="podman_socket", help="Podman API socket")
    build.add_argument(
        "--verbose", "-v", action="store_true", help="show pip's and the build's log"
    )


# ---------------------------------------------------------------------------- evaluate
def _tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.tasks and args.prompt:
        raise DockyardError("give --tasks FILE or --prompt, not both")
    if args.tasks:
        try:
            data = json.loads(Path(args.tasks).read_text())
        except OSError as exc:
            raise DockyardError(f"--tasks: cannot read {args.tasks}: {exc.strerror}") from None
        except ValueError as exc:
            raise DockyardError(f"--tasks: {args.tasks} is not JSON: {exc}") from None
        if isinstance(data, dict) and "tasks" in data:
            data = data["tasks"]
        if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
            raise DockyardError(f"--tasks: {args.tasks} must hold a list of task objects")
        return data
    if args.prompt:
        return [{"id": "task-1", "prompt": args.prompt, "url": args.task_url or ""}]
    if not args.session:
        raise DockyardError("give tasks (--tasks FILE, or --prompt and --task-url) or --session")
    return []


def evaluation_request(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /v1/integration/evaluate-miner`` body the flags describe."""
    miner: dict[str, Any] = {"github_url": args.repo, "build_mode": args.build_mode}
    for name in ("ref", "subdir", "image", "uid", "container_port"):
        value = getattr(args, name, None)
        if value is not None:
            miner[name] = value
    body: dict[str, Any] = {"miner": miner, "tasks": _tasks(args)}
    if args.session:
        body["mode"] = "session"
        body["protocol"] = args.protocol or "step"
    elif args.protocol:
        body["protocol"] = args.protocol
    return body


def _clock(at: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at or time.time()))


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_action(result: TaskResult) -> str:
    if not result.actions:
        return "-"
    action = result.actions[0]
    name = action.get("name") or action.get("type") or "?"
    detail = action.get("arguments") or {k: v for k, v in action.items() if k != "type"}
    return f"{name} {json.dumps(detail, separators=(',', ':'))}" if detail else str(name)


def results_table(evaluation: Evaluation) -> list[str]:
    """The evaluation's summary line and one row per task."""
    verdict = "ok" if evaluation.ok else (evaluation.reason or evaluation.state)
    commit = (evaluation.commit or "")[:12] or "-"
    image = evaluation.image or "-"
    if evaluation.image_reused:
        image += " (reused)"
    timing = []
    if evaluation.deploy_s is not None:
        timing.append(f"deploy {evaluation.deploy_s:.1f} s")
    if evaluation.total_s is not None:
        timing.append(f"total {evaluation.total_s:.1f} s")
    lines = [
        f"{evaluation.id}: {evaluation.state} {verdict}  commit={commit} image={image}"
        + (f"  {', '.join(timing)}" if timing else "")
    ]
    if evaluation.reason and evaluation.message:
        detail = f" [{evaluation.detail_reason}]" if evaluation.detail_reason else ""
        lines.append(f"  {evaluation.reason}{detail}: {_short(evaluation.message, 200)}")
    if evaluation.results:
        width = max(4, *(len(r.task_id) for r in evaluation.results))
        lines.append(f"  {'task':<{width}}  {'outcome':<9} {'steps':>5} {'time':>7}  answer")
        for r in evaluation.results:
            took = f"{r.duration_s:.1f} s" if r.duration_s is not None else "-"
            answer = _first_action(r) if r.outcome == "ok" else f"{r.reason}: {r.message or ''}"
            lines.append(
                f"  {r.task_id:<{width}}  {r.outcome:<9} {r.steps:>5} {took:>7}  "
                f"{_short(answer, 80)}"
            )
    session = evaluation.session
    if session is not None:
        closed = f", closed by {session.closed_by}" if session.closed_by else ""
        lines.append(f"  session {session.step_url}{closed}")
    return lines


class Progress:
    """Prints what changed between two views of an evaluation, one line per change."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.queue: int | None = None
        self.done: set[str] = set()

    def show(self, view: Evaluation) -> None:
        if view.finished:  # the tasks' lines, then the end
            self._tasks(view)
            self._state(view)
        else:
            self._state(view)
            self._tasks(view)

    def _state(self, view: Evaluation) -> None:
        if view.state != self.state:
            extra = ""
            if view.state == "running" and view.agent_url:
                extra = f"  agent {view.agent_url}"
            if view.state == "session" and view.session is not None:
                expires = _clock(view.session.expires_at)
                extra = f"  POST steps to {view.session.step_url} (until {expires})"
            if view.state in ("running", "session") and view.commit:
                extra = f"  commit {view.commit[:12]}{extra}"
            print(f"  {_clock()} {view.state}{extra}", flush=True)
            self.state = view.state
        if view.state == "queued" and view.queue_position != self.queue:
            print(f"  {_clock()} queued at position {view.queue_position}", flush=True)
        self.queue = view.queue_position

    def _tasks(self, view: Evaluation) -> None:
        for result in view.results:
            if result.outcome in ("pending", "running") or result.task_id in self.done:
                continue
            self.done.add(result.task_id)
            took = f" in {result.duration_s:.1f} s" if result.duration_s is not None else ""
            why = f" ({result.reason})" if result.reason and result.outcome != "ok" else ""
            count = f"{len(self.done)}/{view.progress.tasks_total}"
            print(
                f"  {_clock()} task {result.task_id} {result.outcome}{why}{took} [{count}]",
                flush=True,
            )


async def run_evaluate(args: argparse.Namespace) -> int:
    """``dockyard evaluate``: 0 when the agent passed (or the session opened), 1 otherwise."""
    body = evaluation_request(args)
    async with DockyardClient(args.url, token=args.token) as client:
        evaluation = await client.evaluate_miner(body)
        print(f"{evaluation.id}: evaluating {args.repo} ({evaluation.state})", flush=True)
        if not args.wait:
            if args.session:
                evaluation = await _until_session(client, evaluation, args)
            for line in results_table(evaluation) if evaluation.finished else []:
                print(line)
            if evaluation.session is not None and not evaluation.finished:
                print(f"  POST steps to {evaluation.session.step_url}")
                print(f"  end it: POST {args.url}/v1/integration/evaluation/{evaluation.id}/finish")
            return 0 if (not evaluation.finished or evaluation.ok) else 1
        progress = Progress()
        progress.show(evaluation)
        deadline = time.monotonic() + args.timeout
        try:
            while not evaluation.finished and time.monotonic() < deadline:
                await asyncio.sleep(args.poll)
                evaluation = await client.evaluation(evaluation.id)
                progress.show(evaluation)
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(f"  {_clock()} interrupted: cancelling {evaluation.id}", flush=True)
            cancelled = await client.cancel_evaluation(evaluation.id)
            assert isinstance(cancelled, Evaluation)
            evaluation = cancelled
        if not evaluation.finished:
            print(f"{evaluation.id}: still {evaluation.state} after {args.timeout:g} s", flush=True)
            return 1
        for line in results_table(evaluation):
            print(line)
        return 0 if evaluation.ok else 1


async def _until_session(
    client: DockyardClient, evaluation: Evaluation, args: argparse.Namespace
) -> Evaluation:
    """Wait (bounded by ``--timeout``) until a session opens or the evaluation ends."""
    deadline = time.monotonic() + args.timeout
    while not evaluation.finished and evaluation.state != "session":
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(args.poll)
        evaluation = await client.evaluation(evaluation.id)
    return evaluation


# ---------------------------------------------------------------------------- sandbox-image
async def run_sandbox_image(args: argparse.Namespace, settings: Settings) -> int:
    """``dockyard sandbox-image build``: talks to the engine of the configured runtime."""
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.plugins.evaluation.sandbox_image import build_sandbox_image

    if not Path(args.requirements).is_file():
        raise DockyardError(f"--requirements: {args.requirements} is not a file")
    pm = build_plugin_manager(settings.disable_plugins)
    runtime = pm.registries.runtimes.get(settings.runtime)(settings)
    await runtime.open()
    try:
        if args.if_missing and await runtime.image_exists(args.tag):
            print(f"{args.tag} exists")
            return 0

        def log(line: str) -> None:
            ours = line.startswith(("base image:", "base Python:", "building "))
            if ours or args.verbose:
                print(line if ours else f"    {line}", flush=True)

        started = time.monotonic()
        image = await build_sandbox_image(
            runtime,
            Path(args.requirements),
            args.tag,
            base=args.base,
            on_log=log,
            memory_mb=settings.build_memory_mb,
            cpus=settings.build_cpus,
        )
        took = time.monotonic() - started
        print(
            f"{image.tag} ready: Python {image.python.version} on {image.base}, "
            f"{len(image.wheels)} wheels, {took:.0f} s"
        )
        return 0
    finally:
        await runtime.close()


__all__ = [
    "add_commands",
    "evaluation_request",
    "results_table",
    "run_evaluate",
    "run_sandbox_image",
]
