"""The CLI's side of the event stream: ``dockyard events [ID] [--follow]`` and the ``--wait``
of ``deploy``, ``redeploy`` and ``switch``, which print events as the stream brings them
(``dockyard.client.events``) instead of polling.

An event kind a plugin emits prints as the plugin says (``dockyard_register_event_formats``:
kind -> ``format(event) -> str``); the others by their kind's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from dockyard.client.events import follow_events, last_event_id
from dockyard.client.rest import DockyardClient
from dockyard.core.errors import ValidationError
from dockyard.core.plugins import DockyardPluginManager

#: How often ``--wait`` asks whether the operation has ended.
POLL_S = 0.5
#: After the operation ended, how long to wait for its last events to come through.
SETTLE_S = 5.0
#: ``--tag NAME=ID``.
TAG_RE = re.compile(r"^([a-z][a-z0-9_]{0,39})=([A-Za-z0-9._-]{1,80})$")

#: How an event kind prints: the event's JSON object -> the line's text.
EventFormat = Callable[[dict[str, Any]], str]
#: The formats the loaded plugins registered (set by :func:`use_event_formats`).
_formats: dict[str, EventFormat] = {}


def use_event_formats(pm: DockyardPluginManager) -> None:
    """Print events with the formats ``pm``'s plugins register."""
    _formats.clear()
    _formats.update(pm.registries.event_formats.items())


def event_text(event: dict[str, Any], formats: Mapping[str, EventFormat] | None = None) -> str:
    """The text of an event's line: a slot transition's states, a plugin's format for its
    kinds (a format that fails falls back to the kind), else the kind."""
    kind = str(event.get("kind", ""))
    if kind == "slot_transition":
        return f"{event.get('from_state')} -> {event.get('to_state')}"
    fmt = (_formats if formats is None else formats).get(kind)
    if fmt is not None:
        try:
            return str(fmt(event))
        except Exception:  # a plugin's format cannot break the command
            pass
    return kind.replace("_", " ")


def parse_tags(values: list[str]) -> dict[str, str]:
    """``--tag NAME=ID`` options as filters (a one-line error naming a bad one)."""
    tags: dict[str, str] = {}
    for value in values:
        match = TAG_RE.match(value)
        if match is None:
            raise ValidationError(f"--tag: {value[:80]!r} is not NAME=ID")
        tags[match.group(1)] = match.group(2)
    return tags


def show_event(event: dict[str, Any], *, as_json: bool = False) -> None:
    """One line per event."""
    if as_json:
        print(json.dumps(event, separators=(",", ":")), flush=True)
        return
    at = time.strftime("%H:%M:%S", time.localtime(event.get("at", 0)))
    color = event.get("color") or "-"
    text = event_text(event)
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
    client: DockyardClient,
    target: str | None,
    *,
    follow: bool,
    as_json: bool,
    tags: Mapping[str, str] | None = None,
) -> int:
    """``dockyard events``: the journal of one deployment (or of everything), only the
    events carrying ``tags`` (a plugin's event tags); with ``follow``, then every new event
    until interrupted."""
    if not follow:
        after = 0
        while True:
            params: dict[str, Any] = {"after": after, "limit": 1000, **(tags or {})}
            if target:
                params["deployment"] = target
            page = await client.request("GET", "/v1/events", params=params)
            for event in page:
                show_event(event, as_json=as_json)
            if len(page) < 1000:
                return 0
            after = int(page[-1]["id"])
    async for event in follow_events(client, deployment=target, tags=tags):
        show_event(event, as_json=as_json)
    return 0
