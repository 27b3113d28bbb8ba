"""The status page (``/ui``): deployments with both slots, a live timeline of events, a
chart of durations, and what plugins add (panels, pages, chart series, the timeline's text
for their event kinds; :mod:`dockyard.api.ui.parts`).

Server-rendered Jinja2 templates (autoescaped: every id, commit message, reason or log line
a repository controls is shown as text) and one small script, ``static/ui.js``, that follows
``/ui/events/stream`` and, when something changes, re-fetches the server-rendered fragments
(every ``data-fragment``: the deployments, the chart, each panel) and the timeline's new
entries (``/ui/fragments/timeline?after=N``); no build step and no per-panel script. A
Content-Security-Policy allows scripts from dockyard only, so even markup that escaped
escaping could not run.

Access: a login form takes an API token that grants ``read``; the page keeps only a random
session id in a cookie marked ``HttpOnly``, ``SameSite=Strict`` and ``Path=/ui`` (the token
stays on the server, in memory, and is checked again on each request, so revoking it ends
the session). ``/ui`` is outside the bearer-token middleware; :func:`ui_guard` fails closed
on every route that is not marked ``ui_public``, plugins' routes included.

For plugins: :func:`page` renders a template of the app's status page with its headers,
:func:`current_record` says who is logged in, :func:`login_redirect` sends a visitor to the
form, and :class:`Bar` is what a chart series returns.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from litestar import Controller, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, State
from litestar.enums import RequestEncodingType
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Body, FromPath, QueryParameter
from litestar.response import Redirect, ServerSentEvent
from litestar.status_codes import HTTP_303_SEE_OTHER
from markupsafe import Markup

from dockyard.api.auth import APP_SCOPES, CORE_TABLE, TokenBook, TokenRecord
from dockyard.api.deployments import render
from dockyard.api.events import EventHub, last_event_id, sse_messages, tag_filters
from dockyard.api.ui.parts import Bar, UiPanel, UiParts, UiSite
from dockyard.core.models import Model, SlotState

__all__ = [
    "Bar",
    "UIRoutes",
    "UiSite",
    "current_record",
    "login_redirect",
    "page",
    "site_of",
    "ui_guard",
    "ui_routers",
]

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
#: The app-state attribute holding the app's :class:`UiSite`.
SITE = "ui_site"


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
    return record if record is not None and _reads(state, record) else None


def _reads(state: State, record: TokenRecord) -> bool:
    """Whether ``record`` grants ``read`` with the app's scopes (a plugin's scope may imply
    it)."""
    return record.grants("read", getattr(state, APP_SCOPES, CORE_TABLE))


def ui_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Every ``/ui`` route needs a session unless it is marked ``ui_public``."""
    if handler.opt.get("ui_public"):
        return
    if current_record(connection) is None:
        raise NotAuthorizedException("log in at /ui/login")


def site_of(state: State) -> UiSite:
    """The app's status page (built by ``create_app`` from the plugins' parts)."""
    site = getattr(state, SITE, None)
    if site is None:
        site = UiSite(UiParts())
        setattr(state, SITE, site)
    return site


def page(
    connection: ASGIConnection[Any, Any, Any, Any],
    name: str,
    status_code: int = 200,
    **context: Any,
) -> Response[str]:
    """Render the template ``name`` of this app's status page (a plugin's are
    ``{prefix}/NAME``) with the page's headers: a script-from-dockyard-only CSP, no caching,
    no sniffing, no referrer."""
    return Response(
        site_of(connection.app.state).render(name, **context),
        media_type=HTML,
        status_code=status_code,
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def login_redirect() -> Response[Any]:
    """Send a visitor without a session to the login form (for ``ui_public`` pages that
    would rather redirect than answer 401)."""
    return Redirect("/ui/login", status_code=HTTP_303_SEE_OTHER)


def ui_routers(parts: UiParts) -> list[Any]:
    """The plugins' ``/ui`` routes, mounted under ``/ui`` behind :func:`ui_guard`."""
    if not parts.routes:
        return []
    return [Router("/ui", route_handlers=parts.routes, guards=[ui_guard], include_in_schema=False)]


class LoginForm(Model):
    token: str = ""


# ------------------------------------------------------------------ what the page shows
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


def chart_context(state: State) -> dict[str, Any]:
    hub: EventHub = state.events
    site = site_of(state)
    bars = site.bars(hub.journal.read(0, limit=CHART_WINDOW, newest=True))
    top = max((b.seconds for b in bars), default=1.0) or 1.0
    return {"bars": bars, "top": top, "colours": site.colours()}


def timeline_context(state: State, after: int = 0) -> dict[str, Any]:
    """The timeline's newest entries after ``after``, newest first."""
    hub: EventHub = state.events
    entries = hub.journal.read(after, limit=TIMELINE, newest=True)
    return {"events": list(reversed(entries)), "last_id": hub.journal.last_id()}


async def panel_html(state: State, panel: UiPanel) -> Markup:
    """A panel rendered (and escaped) by the server, to be placed in the index as is."""
    context = await panel.context(state)
    return Markup(site_of(state).render(panel.template, **context))


class UIRoutes(Controller):
    """The status page and what its script fetches."""

    path = "/ui"
    guards = [ui_guard]
    include_in_schema = False

    @get("/", opt={"ui_public": True})
    async def index(self, request: Request[Any, Any, Any], state: State) -> Response[Any]:
        record = current_record(request)
        if record is None:
            return login_redirect()
        panels = [(p, await panel_html(state, p)) for p in site_of(state).panels]
        context = {
            **await deployments_context(state),
            **chart_context(state),
            **timeline_context(state),
            "panels": panels,
            "token_name": record.name,
        }
        return page(request, "index.html", **context)

    @get("/login", opt={"ui_public": True})
    async def login_form(self, request: Request[Any, Any, Any]) -> Response[str]:
        return page(request, "login.html", error=None)

    @post("/login", opt={"ui_public": True}, status_code=HTTP_303_SEE_OTHER)
    async def login(
        self,
        request: Request[Any, Any, Any],
        state: State,
        data: Annotated[LoginForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[Any]:
        record = _book(state).verify(data.token.strip())
        if record is None or not _reads(state, record):
            return page(
                request,
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
        response = login_redirect()
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @get("/fragments/deployments")
    async def deployments_fragment(
        self, request: Request[Any, Any, Any], state: State
    ) -> Response[str]:
        return page(request, "deployments.html", **await deployments_context(state))

    @get("/fragments/chart")
    async def chart_fragment(self, request: Request[Any, Any, Any], state: State) -> Response[str]:
        return page(request, "chart.html", **chart_context(state))

    @get("/fragments/timeline")
    async def timeline_fragment(
        self,
        request: Request[Any, Any, Any],
        state: State,
        after: Annotated[int, QueryParameter(ge=0, le=2**53 - 1)] = 0,
    ) -> Response[str]:
        """The timeline's entries newer than ``after`` (newest first), as ``<li>``s."""
        return page(request, "timeline.html", **timeline_context(state, after))

    @get("/fragments/{panel:str}")
    async def panel_fragment(
        self, request: Request[Any, Any, Any], state: State, panel: FromPath[str]
    ) -> Response[str]:
        """A plugin's panel alone (what the page re-fetches when events come)."""
        found = site_of(state).panel(panel)
        if found is None:
            raise NotFoundException(f"panel: no panel {panel!r}")
        return page(request, found.template, **await found.context(state))

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
