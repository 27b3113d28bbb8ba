"""An out-of-tree dockyard plugin, built the way the evaluation plugin is.

The test suite pip-installs it (``tests/test_plugin_parts.py``) and finds it through its
entry point in the group ``dockyard``. It brings, through ``dockyard_api_plugins``:

- routes: ``POST /v1/testplugin/notes`` keeps a note as a plugin record (namespace
  ``testplugin``), ``GET /v1/testplugin/notes`` lists them, ``GET /v1/testplugin/greet``
  calls its own hook, ``GET /v1/testplugin/ticks`` reads its lifespan task's count;
- a lifespan task that counts ticks while the app serves and, when it stops, stores a
  ``lifespan`` record saying how many ticks it saw;
- its own hookspec, ``testplugin_greetings`` (added by ``dockyard_add_hookspecs``), which
  it implements itself and other plugins may too. Its option ``tick_s`` is read from
  ``[plugins.testplugin]``.

Through the same registrar it adds to the status page (``/ui``): its templates
(``templates/``, package data, as ``testplugin/*.html``), a ``notes`` panel listing the notes,
a page per note ``/ui/testplugin/notes/{key}`` (needs a session) and a public page
``/ui/testplugin/about``, a ``notes`` chart series (each note's ``seconds``) and the
timeline's text for its ``testplugin_note`` events (``note KEY``), which ``POST`` emits.

Through the registrar hooks it adds, like the evaluation plugin: an event tag ``note``
(each note added is a ``testplugin_note`` event of the deployment ``testplugin-notes``,
tagged with the note's key: ``GET /v1/events?note=KEY``), a status filter ``noted``
(deployments labelled ``testplugin_noted``), a token scope ``notes`` (grants ``read`` too;
``GET /v1/testplugin/secret`` needs it) and how ``dockyard events`` prints its events.

Through ``dockyard_cli_commands`` it adds ``dockyard testplugin-greet NAME``, a local
command that prints every ``testplugin_greetings`` answer and its ``tick_s`` option, and
refuses an empty name with a one-line error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from dockyard.api.auth import TokenScope
from dockyard.api.cli_plugins import CliRegistrar
from dockyard.api.events import StreamEvent
from dockyard.api.plugins import ApiRegistrar, PluginContext
from dockyard.api.ui import Bar, page
from dockyard.core.config import Settings
from dockyard.core.errors import DockyardError
from dockyard.core.hookspecs import hookimpl
from dockyard.core.models import Event
from dockyard.core.plugins import Registrar, build_plugin_manager, emit_event
from dockyard.core.services import Services
from dockyard.core.store import PluginRecord
from dockyard_testplugin import hookspecs

NAMESPACE = "testplugin"
TEMPLATES = Path(__file__).parent / "templates"
NOTE_EVENT = "testplugin_note"
#: The deployment id its note events name (no such deployment exists).
NOTES_DEPLOYMENT = "testplugin-notes"
NOTED_LABEL = "testplugin_noted"


class NoteTagger:
    """The ``note`` event tag: a note event's key; it remembers how many it tagged."""

    def __init__(self) -> None:
        self.tagged = 0

    def __call__(self, event: Event, context: Any) -> str | None:
        if event.kind != NOTE_EVENT:
            return None
        self.tagged += 1
        return str(event.data.get("key"))


@hookimpl
def dockyard_register_event_tags(register: Registrar[Any]) -> None:
    register("note", NoteTagger)


@hookimpl
def dockyard_register_status_filters(register: Registrar[str]) -> None:
    register("noted", NOTED_LABEL)


@hookimpl
def dockyard_register_token_scopes(register: Registrar[TokenScope]) -> None:
    register("notes", TokenScope("read the test plugin's secret", implies=frozenset({"read"})))


def _format_note(event: dict[str, Any]) -> str:
    return f"note {event['data']['key']} added"


@hookimpl
def dockyard_register_event_formats(register: Registrar[Any]) -> None:
    register(NOTE_EVENT, _format_note)


class Ticker:
    """The lifespan's task: counts ticks until the app stops."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.ticks = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(self.tick_s)


@hookimpl
def dockyard_add_hookspecs(add: Callable[[object], None]) -> None:
    add(hookspecs)


@hookimpl
def testplugin_greetings(name: str) -> str:
    return f"hello {name} from the test plugin"


@post("/v1/testplugin/notes", operation_id="testpluginAddNote", opt={"scope": "deploy"})
async def add_note(
    data: JSONBody[dict[str, Any]], services: NamedDependency[Services]
) -> dict[str, Any]:
    key = str(data["key"])
    stored = await services.store.put_record(
        PluginRecord(namespace=NAMESPACE, key=key, value=data, labels={"kind": "note"})
    )
    seconds = data.get("seconds")
    note = Event(
        deployment_id=NOTES_DEPLOYMENT, kind=NOTE_EVENT, data={"key": key, "seconds": seconds}
    )
    await emit_event(services.pm, note)
    return {"key": stored.key, "created_at": stored.created_at}


@get("/v1/testplugin/secret", operation_id="testpluginSecret", opt={"scope": "notes"})
async def secret() -> dict[str, str]:
    return {"secret": "only for the notes scope (and admin)"}


@get("/v1/testplugin/notes", operation_id="testpluginNotes", opt={"scope": "read"})
async def list_notes(services: NamedDependency[Services]) -> list[dict[str, Any]]:
    notes = await services.store.list_records(NAMESPACE, labels={"kind": "note"})
    return [note.value for note in notes]


@get("/v1/testplugin/greet", operation_id="testpluginGreet", opt={"scope": "read"})
async def greet(
    name: Annotated[str, QueryParameter()], services: NamedDependency[Services]
) -> list[str]:
    return sorted(services.pm.hook.testplugin_greetings(name=name))


@get("/v1/testplugin/ticks", operation_id="testpluginTicks", opt={"scope": "read"})
async def ticks(ticker: NamedDependency[Ticker]) -> dict[str, Any]:
    running = ticker.task is not None and not ticker.task.done()
    return {"ticks": ticker.ticks, "running": running}


def _ticker(state: State) -> Ticker:
    return state.testplugin_ticker  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def _lifespan(context: PluginContext) -> AsyncIterator[None]:
    tick_s = float(context.settings.plugin_options(NAMESPACE).get("tick_s", 0.01))
    ticker = context.app.state.testplugin_ticker = Ticker(tick_s)
    ticker.task = asyncio.create_task(ticker.run())
    try:
        yield
    finally:
        ticker.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker.task
        await context.services.store.put_record(
            PluginRecord(namespace=NAMESPACE, key="lifespan", value={"ticks": ticker.ticks})
        )


# ---------------------------------------------------------------- the status page
async def _notes_panel(state: State) -> dict[str, Any]:
    notes = await state.services.store.list_records(NAMESPACE, labels={"kind": "note"})
    return {"notes": [note.value for note in notes]}


@get("/testplugin/notes/{key:str}")
async def note_page(
    request: Request[Any, Any, Any], state: State, key: FromPath[str]
) -> Response[str]:
    record = await state.services.store.get_record(NAMESPACE, key)
    ticker = getattr(state, "testplugin_ticker", None)
    ticks = ticker.ticks if ticker is not None else 0
    note = record.value if record is not None else None
    return page(request, "testplugin/note.html", key=key, note=note, ticks=ticks)


@get("/testplugin/about", opt={"ui_public": True})
async def about_page(request: Request[Any, Any, Any]) -> Response[str]:
    return page(request, "testplugin/about.html")


def _note_bars(entries: list[StreamEvent]) -> list[Bar]:
    return [
        Bar(
            label=str(e.data["key"]),
            seconds=float(e.data["seconds"]),
            ok=True,
            kind="notes",
            at=e.at,
        )
        for e in entries
        if e.kind == NOTE_EVENT and isinstance(e.data.get("seconds"), int | float)
    ]


def _note_text(entry: StreamEvent) -> str:
    return f"note {entry.data.get('key')}"


@hookimpl
def dockyard_api_plugins(register: ApiRegistrar) -> None:
    for handler in (add_note, list_notes, greet, ticks, secret):
        register.route(handler)
    register.dependency("ticker", _ticker)
    register.lifespan(_lifespan)
    register.ui_templates(TEMPLATES)
    register.ui_panel(
        "notes", title="Notes", template="testplugin/panel.html", context=_notes_panel
    )
    for handler in (note_page, about_page):
        register.ui_route(handler)
    register.ui_chart("notes", _note_bars, colour="#2a9d8f")
    register.ui_event_text(NOTE_EVENT, _note_text)


async def _greet_command(args: argparse.Namespace, settings: Settings) -> int:
    if not args.name.strip():
        raise DockyardError("testplugin-greet: NAME must not be empty")
    pm = build_plugin_manager(settings.disable_plugins)
    for line in sorted(pm.hook.testplugin_greetings(name=args.name)):
        print(line)
    print(f"tick_s={settings.plugin_options(NAMESPACE).get('tick_s', 0.01)}")
    return 0


@hookimpl
def dockyard_cli_commands(register: CliRegistrar) -> None:
    greet_cmd = register.local_command(
        "testplugin-greet", _greet_command, help="greet NAME through the testplugin hook"
    )
    greet_cmd.add_argument("name", metavar="NAME")
