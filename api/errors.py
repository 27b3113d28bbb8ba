"""Maps dockyard's exception hierarchy and Litestar's HTTP errors to one JSON error shape:
``{"reason": <stable code>, "message": <human text naming the field>, "detail": {...}}``,
and documents that shape, and the statuses each operation can answer, in the OpenAPI schema.

One status per kind of error, on every route:

* 400 ``invalid_input``: the request does not match the schema (a field's type, range or
  pattern, an unknown field, a path parameter, malformed JSON);
* 401, 403, 429: no or a bad token, a missing scope or a refused client, a rate limit;
* 404 the named thing does not exist; 409 it is busy or exists already; 413 body too large;
* 422: well-formed but refused on its meaning (an operator's cap or policy, a repository
  URL no source accepts, fields that contradict each other);
* 5xx: dockyard or what it drives failed (500 a bug, 502 the engine refused, 503 a part
  is unavailable).
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from dockyard.core.errors import DockyardError
from dockyard.core.models import REFUSED, Model

log = logging.getLogger(__name__)

_REASONS = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ErrorBody(Model):
    """The body of every error answer."""

    reason: str
    message: str
    detail: dict[str, Any] | None = None


#: What each error status means, as the schema says it.
ERROR_STATUSES: dict[int, str] = {
    400: "Invalid input: the request does not match the schema; `message` names the field",
    401: "No token, or a token that is unknown, malformed or revoked",
    403: "The token lacks the scope, or the client address is not allowed",
    404: "The named deployment, token or plugin resource does not exist",
    409: "Busy (an operation is in progress) or exists already",
    413: "The request body is larger than 1 MiB",
    422: "Well-formed but refused: an operator's cap or policy, a repository URL no source "
    "accepts, or fields that contradict each other",
    429: "Rate limited; `Retry-After` says when to try again",
    500: "A bug in dockyard; the server log has the details",
    502: "The container engine refused or failed the operation",
    503: "A part dockyard needs (store, runtime, port pool) is unavailable",
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for ``statuses``, each with the real error body."""
    return {
        status: ResponseSpec(
            data_container=ErrorBody,
            description=ERROR_STATUSES[status],
            generate_examples=False,
        )
        for status in statuses
    }


def document_errors(app: Litestar) -> None:
    """Give every operation the error statuses it can answer, in addition to those its
    handler declares (``responses=errors(...)``): 400 and 500 everywhere, 401/403/429 on
    routes that need a token, 413 where a body is read, 404 where a path names something.
    Replaces Litestar's default 400 body, which is not the one dockyard answers."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if not isinstance(handler, HTTPRouteHandler):
                continue
            statuses = [400, 500]
            if not handler.opt.get("public") and not route.path.startswith("/docs"):
                statuses += [401, 403, 429]
            if "data" in handler.parsed_fn_signature.parameters:
                statuses.append(413)
            if "{" in route.path:
                statuses.append(404)
            handler.responses = {**errors(*sorted(statuses)), **(handler.responses or {})}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, headers=headers)


def dockyard_error_handler(_: Request[Any, Any, Any], exc: DockyardError) -> Response:
    if exc.status_code >= 500:
        log.warning("%s: %s", exc.reason, exc.message)
    return _json(exc.status_code, exc.to_dict())


def _client_name(request: Request[Any, Any, Any], key: Any) -> Any:
    """The name a client uses for a handler parameter (a header's or a query's alias, e.g.
    ``Last-Event-ID`` for ``last_id``), else ``key``."""
    try:
        parameter = request.route_handler.parsed_fn_signature.parameters[key]
        definition = parameter.kwarg_definition
    except (AttributeError, KeyError, TypeError):
        return key
    for alias in ("header", "query", "cookie", "name"):
        name = getattr(definition, alias, None)
        if isinstance(name, str) and name:
            return name
    return key


def validation_error_handler(request: Request[Any, Any, Any], exc: ValidationException) -> Response:
    problems = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    contradictions = bool(problems)
    for item in problems:
        if isinstance(item, dict):
            key = _client_name(request, item.get("key"))
            msg = str(item.get("message", ""))
            parts.append(f"{key}: {msg}" if key else msg)
            # A model's own check (REFUSED): the request matches the schema (422).
            contradictions = contradictions and msg.startswith(REFUSED)
        else:
            contradictions = False
    message = "; ".join(parts) or str(exc.detail)
    status, reason = (422, "unprocessable") if contradictions else (400, "invalid_input")
    return _json(status, {"reason": reason, "message": message, "detail": {"errors": problems}})


def http_error_handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response:
    status = exc.status_code
    body = {"reason": _REASONS.get(status, "http_error"), "message": str(exc.detail)}
    headers = dict(exc.headers or {})
    if status == 429:
        reset = headers.get("RateLimit-Reset", "1")
        headers["Retry-After"] = str(max(1, int(reset) if reset.lstrip("-").isdigit() else 1))
        body["message"] = f"rate limit exceeded; retry after {headers['Retry-After']} s"
    return _json(status, body, headers=headers or None)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json(
        HTTP_500_INTERNAL_SERVER_ERROR,
        {"reason": "internal_error", "message": "internal error; see the server log"},
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    DockyardError: dockyard_error_handler,
    ValidationException: validation_error_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}
