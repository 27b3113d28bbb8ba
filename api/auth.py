"""Who may call the API: bearer tokens with scopes, the real client address behind trusted
proxies, an IP allowlist, per-token and per-IP rate limits, and an append-only audit log.

Tokens look like ``dy_<id>_<secret>``; only their SHA-256 is kept (in the operator's
configuration, or in ``<data_dir>/tokens.json`` for tokens made through the API or CLI), and
comparisons are constant-time. ``GET /v1/healthz`` and the docs are the only open routes;
every other handler declares the scope it needs in ``opt={"scope": ...}`` and the guard
fails closed on a handler that declares none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from dockyard.core.config import Settings
from dockyard.core.errors import Conflict, NotFound, PluginError, ValidationError
from dockyard.core.models import Model, now
from dockyard.core.plugins import DockyardPluginManager


@dataclass(frozen=True)
class TokenScope:
    """A token scope: what it is for, and the other scopes holding it also grants.

    The core's are ``read``, ``deploy`` (grants ``read``) and ``admin`` (grants every
    scope); plugins register theirs through ``dockyard_register_token_scopes``."""

    description: str
    implies: frozenset[str] = frozenset()


#: The core's scopes.
CORE_SCOPES: dict[str, TokenScope] = {
    "read": TokenScope("read deployments, logs, events and metrics"),
    "deploy": TokenScope("create, redeploy, switch and delete deployments", frozenset({"read"})),
    "admin": TokenScope("everything: every scope, tokens included"),
}
#: The scope that grants every other one.
ADMIN = "admin"
#: A scope's name (in ``opt={"scope": ...}``, token files and ``--scope``).
SCOPE_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


class ScopeTable:
    """The scopes a dockyard knows: the core's and the loaded plugins'; what each grants."""

    def __init__(self, scopes: Mapping[str, TokenScope]) -> None:
        self.scopes = dict(scopes)
        for name, scope in self.scopes.items():
            unknown = sorted(scope.implies - set(self.scopes))
            if unknown:
                raise ValidationError(f"scope {name!r} implies unknown scopes {unknown}")

    @classmethod
    def from_plugins(cls, pm: DockyardPluginManager) -> ScopeTable:
        """The core's scopes and every ``dockyard_register_token_scopes`` one; a plugin's
        scope that is a core one, badly named, or implies an unknown scope is a
        PluginError naming the plugin."""
        registry = pm.registries.token_scopes
        scopes = dict(CORE_SCOPES)
        for name, scope in registry.items():
            plugin = registry.owner(name)
            if name in CORE_SCOPES or not SCOPE_NAME_RE.match(name):
                raise PluginError(
                    f"plugin {plugin!r} registered the token scope {name!r}: a core scope"
                    f" or not a name ({SCOPE_NAME_RE.pattern})"
                )
            if not isinstance(scope, TokenScope):
                raise PluginError(f"plugin {plugin!r}: token scope {name!r} is not a TokenScope")
            scopes[name] = scope
        for name in registry.names():
            unknown = sorted(scopes[name].implies - set(scopes))
            if unknown:
                raise PluginError(
                    f"plugin {registry.owner(name)!r}: token scope {name!r} implies"
                    f" unknown scopes {unknown}"
                )
        return cls(scopes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.scopes))

    def __contains__(self, name: object) -> bool:
        return name in self.scopes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def implied(self, held: str) -> frozenset[str]:
        """What holding ``held`` grants: itself, what it implies (transitively); ``admin``
        every scope. A scope no loaded plugin registers grants only itself (and so no
        route: none declares it)."""
        if held == ADMIN:
            return frozenset(self.scopes)
        granted, todo = {held}, [held]
        while todo:
            scope = self.scopes.get(todo.pop())
            for name in scope.implies if scope else ():
                if name not in granted:
                    granted.add(name)
                    todo.append(name)
        return frozenset(granted)

    def grants(self, held: Iterable[str], required: str) -> bool:
        return any(required in self.implied(scope) for scope in held)

    def check(self, wanted: Iterable[str]) -> list[str]:
        """``wanted`` sorted, or a 400 naming ``scopes`` and the unknown ones."""
        names = sorted(set(wanted))
        bad = [s for s in names if s not in self.scopes]
        if bad:
            raise ValidationError(
                f"scopes: unknown scope {', '.join(map(repr, bad))}"
                f" (known: {', '.join(self.names)})",
                field="scopes",
            )
        if not names:
            raise ValidationError(f"scopes: give one or more of {', '.join(self.names)}")
        return names


#: The core's scopes only (no plugin loaded).
CORE_TABLE = ScopeTable(CORE_SCOPES)
#: Where the app keeps its :class:`ScopeTable` (``app.state``).
APP_SCOPES = "scopes"
OPEN_PATHS = ("/v1/healthz",)
DOCS_PREFIX = "/docs"
UI_PREFIX = "/ui"
TOKEN_RE = re.compile(r"^dy_([0-9a-f]{8})_([A-Za-z0-9_-]{40,64})$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SCOPE_KEY_TOKEN = "dockyard.token"
SCOPE_KEY_CLIENT = "dockyard.client"
SCOPE_KEY_REQUEST_ID = "dockyard.request_id"


class TokenRecord(Model):
    """A token as stored: never the token itself, only its hash."""

    id: str
    name: str
    scopes: list[str]
    sha256: str
    created_at: float = msgspec.field(default_factory=now)
    revoked_at: float | None = None
    source: Literal["config", "file"] = "file"

    def grants(self, scope: str, table: ScopeTable = CORE_TABLE) -> bool:
        """Whether this token may use ``scope`` (what each scope grants: ``table``, the
        app's scopes; the core's by default)."""
        return table.grants(self.scopes, scope)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh ``(id, token)``: 8 hex chars of id, 32 random bytes of secret."""
    token_id = secrets.token_hex(4)
    return token_id, f"dy_{token_id}_{secrets.token_urlsafe(32)}"


#: At most this long between two reads of ``tokens.json`` whose stat did not change.
TOKENS_REREAD_S = 1.0


class TokenBook:
    """Configured tokens plus the ones in ``<data_dir>/tokens.json`` (mode 0600, written
    atomically under a lock, so the CLI and a running server can share it)."""

    def __init__(
        self,
        path: Path,
        configured: Iterable[dict[str, Any]] = (),
        scopes: ScopeTable = CORE_TABLE,
    ) -> None:
        self.path = path
        #: The scopes a new token may have (the app's: the core's and its plugins').
        self.scopes = scopes
        self.configured: dict[str, TokenRecord] = {}
        #: The file as last read: its (inode, mtime, size), when, and its records.
        self._seen: tuple[tuple[int, int, int], float, dict[str, TokenRecord]] | None = None
        for raw in configured:
            try:
                record = msgspec.convert({**raw, "source": "config"}, TokenRecord)
            except msgspec.ValidationError as exc:
                raise ValidationError(f"api_tokens: {exc}") from None
            self.configured[record.id] = record

    @classmethod
    def from_settings(cls, settings: Settings, scopes: ScopeTable = CORE_TABLE) -> TokenBook:
        return cls(settings.data_path / "tokens.json", settings.api_tokens, scopes)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, TokenRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            before = dict(records)
            yield records
            if records != before:
                tmp = self.path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(msgspec.json.encode(list(records.values())))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)

    def _read(self) -> dict[str, TokenRecord]:
        """The file's records (a copy). Every request verifies a token, so the file is
        decoded again only when its inode, mtime or size changed (every write replaces it:
        a new inode), or ``TOKENS_REREAD_S`` passed (a reused inode in the same mtime tick
        with the same size cannot hide a revoke for longer); the CLI's writes from another
        process are seen at the next request."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen = self._seen
        if seen is not None and seen[0] == key and time.monotonic() - seen[1] < TOKENS_REREAD_S:
            return dict(seen[2])
        read_at = time.monotonic()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        records = {r.id: r for r in msgspec.json.decode(data, type=list[TokenRecord])}
        self._seen = (key, read_at, records)
        return dict(records)

    def records(self) -> list[TokenRecord]:
        """Every token, configured ones first."""
        return [*self.configured.values(), *self._read().values()]

    def active(self) -> list[TokenRecord]:
        return [r for r in self.records() if r.revoked_at is None]

    def create(self, name: str, scopes: Iterable[str]) -> tuple[TokenRecord, str]:
        """Make a token; the secret is returned once and never stored."""
        wanted = self.scopes.check(scopes)
        token_id, token = new_token()
        record = TokenRecord(id=token_id, name=name, scopes=wanted, sha256=hash_token(token))
        with self._locked() as records:
            records[token_id] = record
        return record, token

    def revoke(self, token_id: str) -> TokenRecord:
        if token_id in self.configured:
            raise Conflict(
                f"id: token {token_id} is configured by the operator; "
                "remove it from the configuration instead"
            )
        with self._locked() as records:
            record = records.get(token_id)
            if record is None:
                raise NotFound(f"token {token_id!r} does not exist")
            if record.revoked_at is None:
                record = msgspec.structs.replace(record, revoked_at=now())
                records[token_id] = record
        return record

    def verify(self, token: str) -> TokenRecord | None:
        """The active record this token belongs to, compared in constant time on hashes."""
        match = TOKEN_RE.match(token)
        digest = hash_token(token)
        found = None
        for record in self.active():
            # Compare every candidate, so timing says nothing about which ids exist.
            same = hmac.compare_digest(record.sha256, digest)
            if same and match and record.id == match.group(1):
                found = record
        return found

    def ensure_admin(self) -> str | None:
        """On a first start with no token at all, create an admin token and return it
        (to be shown once); otherwise None."""
        if self.records():
            return None
        _, token = self.create("first-admin", ["admin"])
        return token


# -------------------------------------------------------------------- client address
def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError(f"{value!r} is not an IP address or CIDR network") from None


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def client_address(scope: Scope, trusted_proxies: list[Any]) -> str:
    """The real client address: the peer, unless the peer is a trusted proxy, in which case
    the right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    peer_ip = _ip(peer)
    if peer_ip is None or not any(peer_ip in net for net in trusted_proxies):
        return peer
    forwarded = [
        v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"
    ]
    hops = [h.strip() for line in forwarded for h in line.split(",") if h.strip()]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            return peer  # garbage in the header: trust nothing of it
        if not any(ip in net for net in trusted_proxies):
            return str(ip)
    return peer


class ClientGate(ASGIMiddleware):
    """Works out the real client address and applies the IP allowlist (403)."""

    def __init__(self, settings: Settings) -> None:
        self.trusted = [_network(v) for v in settings.trusted_proxies]
        self.allowed = [_network(v) for v in settings.allowed_clients]

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        address = client_address(scope, self.trusted)
        cast(dict[str, Any], scope)[SCOPE_KEY_CLIENT] = address
        if self.allowed:
            ip = _ip(address)
            if ip is None or not any(ip in net for net in self.allowed):
                raise PermissionDeniedException(f"client {address} is not allowed")
        await next_app(scope, receive, send)


def real_client(request: Any) -> str:
    """Rate-limit identifier: the real client address."""
    return "ip:" + str(request.scope.get(SCOPE_KEY_CLIENT, "unknown"))


def token_identity(request: Any) -> str:
    """Rate-limit identifier: the authenticated token (falls back to the address)."""
    record = request.scope.get(SCOPE_KEY_TOKEN)
    return f"token:{record.id}" if record is not None else real_client(request)


# -------------------------------------------------------------------- authentication
def _is_open(path: str) -> bool:
    """Routes without a bearer token: health, docs, and the status page (``/ui``, which
    checks its own session cookie in ``dockyard.api.ui``)."""
    return any(path == p or path.startswith(p + "/") for p in (DOCS_PREFIX, UI_PREFIX)) or (
        path in OPEN_PATHS
    )


class BearerAuth(ASGIMiddleware):
    """401 unless the request carries a valid, unrevoked bearer token (open paths aside)."""

    def __init__(self, book: TokenBook) -> None:
        self.book = book

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if not _is_open(scope["path"]):
            header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
            kind, _, token = header.decode("latin-1").partition(" ")
            if kind.lower() != "bearer" or not token.strip():
                raise NotAuthorizedException(
                    "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
                )
            record = self.book.verify(token.strip())
            if record is None:
                raise NotAuthorizedException(
                    "the bearer token is not valid or was revoked",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            cast(dict[str, Any], scope)[SCOPE_KEY_TOKEN] = record
        await next_app(scope, receive, send)


def scope_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Every handler declares ``opt={"scope": ...}`` or ``opt={"public": True}``."""
    if handler.opt.get("public") or _is_open(connection.scope["path"]):
        return
    required = handler.opt.get("scope")
    record: TokenRecord | None = connection.scope.get(SCOPE_KEY_TOKEN)  # type: ignore[assignment]
    table: ScopeTable = getattr(connection.app.state, APP_SCOPES, CORE_TABLE)
    if required not in table:
        raise PermissionDeniedException("this route declares no scope; refusing")
    if record is None:
        raise NotAuthorizedException("a bearer token is required")
    if not record.grants(required, table):
        raise PermissionDeniedException(f"this token lacks the {required!r} scope")


def declared_scopes(handler: Any, inherited: str | None = None) -> dict[str, str]:
    """The scope each route of ``handler`` (a route handler, a ``Controller`` class or a
    ``Router``) declares in ``opt``: path -> scope (routes declaring none are left out: the
    guard refuses them)."""
    found: dict[str, str] = {}
    if isinstance(handler, BaseRouteHandler):
        scope = handler.opt.get("scope", inherited)
        if scope is not None:
            found.update((path, scope) for path in sorted(handler.paths))
        return found
    opt = getattr(handler, "opt", None)
    inherited = opt.get("scope", inherited) if isinstance(opt, dict) else inherited
    if isinstance(handler, type):  # a Controller class: its handlers are class attributes
        for member in vars(handler).values():
            if isinstance(member, BaseRouteHandler):
                for path, scope in declared_scopes(member, inherited).items():
                    found[f"{getattr(handler, 'path', '')}{path}"] = scope
        return found
    for route in getattr(handler, "routes", []):  # a Router
        for member in route.route_handlers:
            if member.opt.get("scope", inherited) is not None:
                found[route.path] = member.opt.get("scope", inherited)
    return found


def check_route_scopes(table: ScopeTable, routes: Iterable[tuple[str, Any]]) -> None:
    """Every ``(plugin, handler)``'s routes declare scopes ``table`` knows; the first that
    does not is a PluginError naming the plugin, the route and the scope."""
    for plugin, handler in routes:
        for path, scope in declared_scopes(handler).items():
            if scope not in table:
                raise PluginError(
                    f"plugin {plugin!r}: route {path} declares the token scope {scope!r},"
                    f" which no loaded plugin registers (known: {', '.join(table.names)})"
                )


def rate_limits(settings: Settings) -> list[Any]:
    """Litestar's sliding-window limiter per client address, over ``rate_limit_window``
    (the per-token one is :func:`token_rate_limits`)."""
    out = []
    if settings.rate_limit_per_ip > 0:
        out.append(
            RateLimitConfig(
                rate_limit=(settings.rate_limit_window, settings.rate_limit_per_ip),
                identifier_for_request=real_client,
                store="rate_limit_ip",
            ).middleware
        )
    return out


def token_rate_limits(settings: Settings) -> list[Any]:
    if settings.rate_limit_per_token <= 0:
        return []
    return [
        RateLimitConfig(
            rate_limit=(settings.rate_limit_window, settings.rate_limit_per_token),
            identifier_for_request=token_identity,
            store="rate_limit_token",
        ).middleware
    ]


# -------------------------------------------------------------------- audit
class AuditLog(ASGIMiddleware):
    """Appends one JSON line per request: time, token id, client, route, target, outcome,
    request id. The request id (``X-Request-ID`` if sane, else a new one) is echoed back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # the directory first (once, not per request)
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, flags, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        given = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), ""
        )
        request_id = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        cast(dict[str, Any], scope)[SCOPE_KEY_REQUEST_ID] = request_id
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers  # type: ignore[typeddict-item]
            await send(message)

        try:
            await next_app(scope, receive, send_wrapper)
        except Exception as exc:
            status = int(getattr(exc, "status_code", 500))
            raise
        finally:
            record = scope.get(SCOPE_KEY_TOKEN)
            params = scope.get("path_params") or {}
            self.write(
                {
                    "time": round(time.time(), 3),
                    "token_id": getattr(record, "id", None),
                    "client": scope.get(SCOPE_KEY_CLIENT)
                    or (scope.get("client") or ("unknown",))[0],
                    "method": scope.get("method"),
                    "route": scope.get("path_template") or scope["path"],
                    "target": next(iter(params.values()), None),
                    "outcome": status,
                    "request_id": request_id,
                }
            )
