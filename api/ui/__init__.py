"""The status page (``/ui``): deployments with both slots, a live timeline of events,
evaluations with queue position, progress and per-task outcomes, and a chart of deploy and
evaluation durations.

Server-rendered Jinja2 templates (autoescaped: every id, commit message, reason or log line
a repository controls is shown as text) and one small script, ``static/ui.js``, that follows
``/ui/events/stream`` and re-fetches the server-rendered fragments when something changes;
no build step. A Content-Security-Policy allows scripts from dockyard only, so even markup
that escaped escaping could not run.

Access: a login form takes an API token that grants ``read``; the page keeps only a random
session id in a cookie marked ``HttpOnly``, ``SameSite=Strict`` and ``Path=/ui`` (the token
stays on the server, in memory, and is checked again on each request, so revoking it ends
the session). ``/ui`` is outside the bearer-token middleware; :func:`ui_guard` fails closed
on every route that is not marked ``ui_public``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jinja2
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, State
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Body, FromPath, QueryParameter
from litestar.response import Redirect, ServerSentEvent
from litestar.status_codes import HTTP_303_SEE_OTHER

from dockyard.api.auth import TokenBook, TokenRecord
from dockyard.api.deployments import render
from dockyard.api.events import EventHub, StreamEvent, last_event_id, sse_messages, tag_filters
from dockyard.core.errors import DockyardError
from dockyard.core.models import Model, SlotState, now

HERE = Path(__file__).parent
COOKIE = "dockyard_ui"
SESSION_TTL_S = 12 * 3600
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HTML = "text/html; charset=utf-8"
#: Journal entries the timeline and the chart look at.
TIMELINE = 60
CHART_WINDOW = 3000

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # always, whatever the file name
    undefined=jinja2.StrictUndefined,
)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


templates.filters["age"] = lambda at: _age(now() - at) if at else "-"
templates.filters["clock"] = _clock


@dataclass
class UISession:
    token_id: str
    expires_at: float


class Sessions:
    """Server-side sessions: random id -> the token it was opened with."""

    def __init__(self) -> None:
        self._by_id: dict[str, UISession] = {}

    def open(self, record: TokenRecord) -> str:
        self._by_id = {k: v for k, v in self._by_id.items() if v.expires_at > time.time()}
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = UISession(record.id, time.time() + SESSION_TTL_S)
        return session_id

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)

    def token_id(self, session_id: str | None) -> str | None:
        session = self._by_id.get(session_id or "")
        if session is None or session.expires_at < time.time():
            return None
        return session.token_id


def _sessions(state: State) -> Sessions:
    sessions = getattr(state, "ui_sessions", None)
    if sessions is None:
        sessions = state.ui_sessions = Sessions()
    return sessions


def _book(state: State) -> TokenBook:
    return TokenBook.from_settings(state.services.settings)


def current_record(connection: ASGIConnection[Any, Any, Any, Any]) -> TokenRecord | None:
    """The still-active token behind this request's session cookie, if it grants read."""
    state = connection.app.state
    token_id = _sessions(state).token_id(connection.cookies.get(COOKIE))
    if token_id is None:
        return None
    record = next((r for r in _book(state).active() if r.id == token_id), None)
    return record if record is not None and record.grants("read") else None


def ui_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Every ``/ui`` route needs a session unless it is marked ``ui_public``."""
    if handler.opt.get("ui_public"):
        return
    if current_record(connection) is None:
        raise NotAuthorizedException("log in at /ui/login")


def page(name: str, status_code: int = 200, **context: Any) -> Response[str]:
    return Response(
        templates.get_template(name).render(**context),
        media_type=HTML,
        status_code=status_code,
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


class LoginForm(Model):
    token: str = ""


# ------------------------------------------------------------------ what the page shows
class Bar(Model):
    label: str
    seconds: float
    ok: bool
    kind: str


def durations(entries: list[StreamEvent], limit: int = 24) -> list[Bar]:
    """Recent deploy durations (BUILDING to PROMOTED or FAILED) and evaluation totals."""
    started: dict[tuple[str, str], float] = {}
    bars: list[Bar] = []
    for entry in entries:
        key = (entry.deployment_id, str(entry.color))
        if entry.kind == "slot_transition" and entry.to_state is SlotState.BUILDING:
            started[key] = entry.at
        elif entry.kind == "slot_transition" and entry.to_state in (
            SlotState.PROMOTED,
            SlotState.FAILED,
        ):
            if key in started:
                bars.append(
                    Bar(
                        label=entry.deployment_id,
                        seconds=round(entry.at - started.pop(key), 2),
                        ok=entry.to_state is SlotState.PROMOTED,
                        kind="deploy",
                    )
                )
        elif entry.kind == "evaluation" and entry.data.get("final"):
            total = entry.data.get("total_s")
            if isinstance(total, int | float):
                bars.append(
                    Bar(
                        label=str(entry.tags.get("evaluation")),
                        seconds=float(total),
                        ok=bool(entry.data.get("ok")),
                        kind="evaluation",
                    )
                )
    return bars[-limit:]


#: Build-log lines shown under a failed slot.
LOG_TAIL = 8


def _log_tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    try:
        with path.open(errors="replace") as fh:
            return [line.rstrip("\n")[:500] for line in fh.readlines()[-lines:]]
    except OSError:
        return []


async def deployments_context(state: State) -> dict[str, Any]:
    controller = state.controller
    views = [await render(controller, d) for d in await controller.deployments()]
    logs = {
        f"{view.id}/{slot.color}": _log_tail(controller.build_log(view.id, slot.color))
        for view in views
        for slot in view.slots
        if slot.state is SlotState.FAILED
    }
    return {"deployments": views, "build_logs": logs}


async def evaluations_context(state: State) -> dict[str, Any]:
    service = getattr(state, "evaluations", None)
    evaluations = await service.list(limit=50) if service is not None else []
    return {"evaluations": evaluations, "evaluations_enabled": service is not None}


def chart_context(state: State) -> dict[str, Any]:
    hub: EventHub = state.events
    bars = durations(hub.journal.read(0, limit=CHART_WINDOW, newest=True))
    top = max((b.seconds for b in bars), default=1.0) or 1.0
    return {"bars": bars, "top": top}


def timeline_context(state: State) -> dict[str, Any]:
    hub: EventHub = state.events
    entries = hub.journal.read(0, limit=TIMELINE, newest=True)
    return {"events": list(reversed(entries)), "last_id": hub.journal.last_id()}


class UIRoutes(Controller):
    """The status page and what its script fetches."""

    path = "/ui"
    guards = [ui_guard]
    include_in_schema = False

    @get("/", opt={"ui_public": True})
    async def index(self, request: Request[Any, Any, Any], state: State) -> Response[Any]:
        record = current_record(request)
        if record is None:
            return Redirect("/ui/login", status_code=HTTP_303_SEE_OTHER)
        context = {
            **await deployments_context(state),
            **await evaluations_context(state),
            **chart_context(state),
            **timeline_context(state),
            "token_name": record.name if record else "",
        }
        return page("index.html", **context)

    @get("/login", opt={"ui_public": True})
    async def login_form(self) -> Response[str]:
        return page("login.html", error=None)

    @post("/login", opt={"ui_public": True}, status_code=HTTP_303_SEE_OTHER)
    async def login(
        self,
        state: State,
        data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[Any]:
        record = _book(state).verify(data.token.strip())
        if record is None or not record.grants("read"):
            return page(
                "login.html",
                status_code=401,
                error="That token is not valid, was revoked, or lacks the read scope.",
            )
        session_id = _sessions(state).open(record)
        return Redirect(
            "/ui/",
            status_code=HTTP_303_SEE_OTHER,
            cookies=[
                Cookie(
                    key=COOKIE,
                    value=session_id,
                    path="/ui",
                    httponly=True,
                    samesite="strict",
                    secure=False,  # dockyard serves plain HTTP on loopback; a TLS proxy may add it
                    max_age=SESSION_TTL_S,
                )
            ],
        )

    @post("/logout", status_code=HTTP_303_SEE_OTHER)
    async def logout(self, request: Request[Any, Any, Any], state: State) -> Response[Any]:
        _sessions(state).close(request.cookies.get(COOKIE))
        response = Redirect("/ui/login", status_code=HTTP_303_SEE_OTHER)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @get("/fragments/deployments")
    async def deployments_fragment(self, state: State) -> Response[str]:
        return page("deployments.html", **await deployments_context(state))

    @get("/fragments/evaluations")
    async def evaluations_fragment(self, state: State) -> Response[str]:
        return page("evaluations.html", **await evaluations_context(state))

    @get("/fragments/chart")
    async def chart_fragment(self, state: State) -> Response[str]:
        return page("chart.html", **chart_context(state))

    @get("/evaluations/{evaluation_id:str}", opt={"ui_public": True})
    async def evaluation(
        self, request: Request[Any, Any, Any], state: State, evaluation_id: FromPath[str]
    ) -> Response[Any]:
        if current_record(request) is None:
            return Redirect("/ui/login", status_code=HTTP_303_SEE_OTHER)
        return page("evaluation.html", **await self._evaluation(state, evaluation_id))

    @get("/fragments/evaluation/{evaluation_id:str}")
    async def evaluation_fragment(
        self, state: State, evaluation_id: FromPath[str]
    ) -> Response[str]:
        return page("evaluation_body.html", **await self._evaluation(state, evaluation_id))

    @staticmethod
    async def _evaluation(state: State, evaluation_id: str) -> dict[str, Any]:
        service = getattr(state, "evaluations", None)
        evaluation = None
        error = None
        if service is None:
            error = "the evaluation plugin is not loaded"
        else:
            try:
                evaluation = await service.get(evaluation_id)
            except DockyardError as exc:
                error = exc.message
        hub: EventHub = state.events
        events = hub.journal.read(0, tags={"evaluation": evaluation_id}, limit=200, newest=True)
        return {
            "evaluation": evaluation,
            "evaluation_id": evaluation_id,
            "error": error,
            "events": list(reversed(events)),
        }

    @get("/events/stream")
    async def stream(
        self,
        state: State,
        request: Request[Any, Any, Any],
        after: Annotated[int, QueryParameter(ge=0, le=2**53 - 1)] = 0,
    ) -> ServerSentEvent:
        """The status page's stream; ``?<tag>=ID`` follows one tagged unit of work (a
        plugin's event tag, as on ``GET /v1/events/stream``)."""
        start = last_event_id(request.headers.get("last-event-id"), after)
        hub: EventHub = state.events
        tags = tag_filters(request, hub.tag_names, ("after",))
        return ServerSentEvent(
            sse_messages(hub, start, None, tags, named=False),
            headers={"Cache-Control": "no-store"},
        )

    @get("/static/ui.js", opt={"ui_public": True})
    async def script(self) -> Response[bytes]:
        return Response(
            (HERE / "static" / "ui.js").read_bytes(),
            media_type="text/javascript; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    @get("/static/ui.css", opt={"ui_public": True})
    async def style(self) -> Response[bytes]:
        return Response(
            (HERE / "static" / "ui.css").read_bytes(),
            media_type="text/css; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )
