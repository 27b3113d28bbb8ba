"""Logging set-up: text for people, JSON lines for machines, and correlation ids on both.

Context variables follow the work: ``request_id`` (set for each HTTP request, from
``X-Request-ID`` when it is sane), ``deployment_id`` (set by the controller for an
operation), and those plugins add with :func:`add_field` (the evaluation plugin's
``evaluation_id``, set for a run). asyncio copies them into every task a request starts, so
a deploy that outlives its request still logs with its id: one ``grep <request id>``
follows it through fetch, build, start, probe, switch and cleanup.

``configure_logging(settings)`` installs one handler on the root logger with
:class:`ContextFilter` and the chosen formatter; uvicorn's loggers (access log included)
propagate to it, so they use the same format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dockyard_request_id", default=None
)
deployment_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dockyard_deployment_id", default=None
)
_VARS = {"request_id": request_id, "deployment_id": deployment_id}
#: Each correlation id's name in text lines (``[rid=.. dep=..]``).
_SHORT = {"request_id": "rid", "deployment_id": "dep"}
#: Attributes every LogRecord has; anything else passed as ``extra=`` goes into JSON lines.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
    "ids",  # TextFormatter's
}
LogFormat = Literal["text", "json"]


def add_field(name: str, short: str) -> contextvars.ContextVar[str | None]:
    """Add a correlation id a plugin binds (``bind(name=...)``): JSON lines carry it as
    ``name``, text lines as ``short=``. Adding a name again returns the same variable."""
    if name not in _VARS:
        _VARS[name] = contextvars.ContextVar(f"dockyard_{name}", default=None)
        _SHORT[name] = short
    return _VARS[name]


def bind(**ids: str | None) -> None:
    """Set correlation ids for the current context (and the tasks it starts from now on)."""
    for name, value in ids.items():
        _VARS[name].set(value)


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Set correlation ids for the duration of a block."""
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The correlation ids set in this context."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Stamps every record with the context's ids (an id given via ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _VARS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _VARS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [rid=.. dep=.. eval=..]: message`` for people (the short names
    of the fields plugins add follow dockyard's own)."""

    SHORT = _SHORT

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [
            f"{short}={value}"
            for name, short in self.SHORT.items()
            if (value := getattr(record, name, None)) is not None
        ]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_logging(
    level: str = "INFO", log_format: LogFormat = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log line (dockyard's and uvicorn's, access log included) to ``stream``
    (stderr) in ``log_format``, stamped with the correlation ids. Replaces earlier root
    handlers; run uvicorn with ``log_config=None`` so that it keeps them."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
