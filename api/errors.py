"""Maps dockyard's exception hierarchy and Litestar's HTTP errors to one JSON error shape:
``{"reason": <stable code>, "message": <human text naming the field>, "detail": {...}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from dockyard.core.errors import DockyardError

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


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, headers=headers)


def dockyard_error_handler(_: Request[Any, Any, Any], exc: DockyardError) -> Response:
    if exc.status_code >= 500:
        log.warning("%s: %s", exc.reason, exc.message)
    return _json(exc.status_code, exc.to_dict())


def validation_error_handler(_: Request[Any, Any, Any], exc: ValidationException) -> Response:
    problems = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in problems:
        if isinstance(item, dict):
            key = item.get("key")
            msg = item.get("message", "")
            parts.append(f"{key}: {msg}" if key else str(msg))
    message = "; ".join(parts) or str(exc.detail)
    return _json(
        400, {"reason": "invalid_input", "message": message, "detail": {"errors": problems}}
    )


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
