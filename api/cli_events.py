"""The CLI's side of the event stream: ``dockyard events [ID] [--follow]`` and the ``--wait``
of ``deploy``, ``redeploy`` and ``switch``, which print events as the stream brings them
(``dockyard.client.events``) instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from dockyard.client.events import follow_events, last_event_id
from dockyard.client.rest import DockyardClient

#: How often ``--wait`` asks whether the operation has ended.
POLL_S = 0.5
#: After the operation ended, how long to wait for its last events to come through.
SETTLE_S = 5.0


def show_event(event: dict[str, Any], *, as_json: bool = False) -> None:
    """One line per event."""
    if as_json:
        print(json.dumps(event, separators=(",", ":")), flush=True)
        return
    at = time.strftime("%H:%M:%S", time.localtime(event.get("at", 0)))
    color = event.get("color") or "-"
    kind = event["kind"]
    if kind == "slot_transition":
        text = f"{event.get('from_state')} -> {event.get('to_state')}"
    elif kind == "evaluation":
        data = event.get("data") or {}
        progress = data.get("progress") or {}
        text = f"evaluation {data.get('state')}"
        if progress.get("tasks_total"):
            text += f" ({progress.get('tasks_done')}/{progress.get('tasks_total')} tasks)"
        if data.get("queue_position"):
            text += f" queue position {data['queue_position']}"
    else:
        text = kind.replace("_", " ")
    extra = event.get("message") or event.get("reason") or ""
    print(
        f"  {at} {event.get('deployment_id', '')} {color:<5} {text}{'  ' + extra if extra else ''}",
        flush=True,
    )


async def follow_operation(
    client: DockyardClient, deployment_id: str, *, after: int, timeout_s: float
) -> dict[str, Any]:
    """Print the deployment's events live until its operation ends; the final view."""
    shown = after

    async def watch() -> None:
        nonlocal shown
        async for event in follow_events(client, deployment=deployment_id, after=after):
            shown = max(shown, int(event["id"]))
            show_event(event)

    watcher = asyncio.create_task(watch())
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if watcher.done():
                watcher.result()  # the stream failed for good: say why
            view = await client.get(deployment_id)
            op = view.get("operation")
            if not op or not op["running"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        # Every event of the operation is journaled before it ends: wait until shown.
        last = await last_event_id(client, deployment_id)
        settle = time.monotonic() + SETTLE_S
        while shown < last and time.monotonic() < settle and not watcher.done():
            await asyncio.sleep(0.05)
        return view
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def print_events(
    client: DockyardClient, target: str | None, *, follow: bool, as_json: bool
) -> int:
    """``dockyard events``: the journal of one deployment (or evaluation: they share their
    id) or of everything; with ``follow``, then every new event until interrupted."""
    if not follow:
        after = 0
        while True:
            params: dict[str, Any] = {"after": after, "limit": 1000}
            if target:
                params["deployment"] = target
            page = await client.request("GET", "/v1/events", params=params)
            for event in page:
                show_event(event, as_json=as_json)
            if len(page) < 1000:
                return 0
            after = int(page[-1]["id"])
    async for event in follow_events(client, deployment=target):
        show_event(event, as_json=as_json)
    return 0
