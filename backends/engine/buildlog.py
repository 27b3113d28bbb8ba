"""A build's log, assembled from the engine's JSON stream: text into lines (each at most
:data:`MAX_LOG_LINE` characters), the last lines kept, every line handed to the caller's
callback; the error and the image id the stream ended with."""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Mapping
from typing import Any

from dockyard.core.runtime import LogCallback

log = logging.getLogger(__name__)

MAX_LOG_LINE = 8192


def stream_message(raw: bytes) -> dict[str, Any] | None:
    """One message of a build stream: a JSON object, or text as a ``stream`` message."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        return {"stream": raw.decode("utf-8", "replace") + "\n"}
    return message if isinstance(message, dict) else None


class BuildProgress:
    """What a build's stream said so far: log lines, the image id, the error it ended with.
    Engines that read more from the lines (a running step) override :meth:`_line`."""

    def __init__(self, on_log: LogCallback | None, max_lines: int) -> None:
        self.on_log = on_log
        self.lines: collections.deque[str] = collections.deque(maxlen=max(1, max_lines))
        self.image_id: str | None = None
        self.error: str | None = None
        self._pending = ""

    def feed(self, message: Mapping[str, Any]) -> None:
        """Take one message of the stream (``stream``, ``error``/``errorDetail``, ``aux``)."""
        error = message.get("error") or (message.get("errorDetail") or {}).get("message")
        if error:
            self.error = str(error).strip()
            self._text(f"ERROR: {self.error}\n")
            return
        aux = message.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            self.image_id = aux["ID"]
        stream = message.get("stream")
        if isinstance(stream, str):
            self._text(stream)

    def flush(self) -> None:
        """End a last line the stream left open."""
        if self._pending:
            self._text("\n")

    def note(self, line: str) -> None:
        """Add a line of dockyard's own (the build proxy's evidence) after the stream's."""
        self.flush()
        self._line(line[:MAX_LOG_LINE])

    def _text(self, text: str) -> None:
        self._pending += text
        *complete, self._pending = self._pending.split("\n")
        if len(self._pending) > MAX_LOG_LINE:
            complete.append(self._pending)
            self._pending = ""
        for line in complete:
            self._line(line.rstrip("\r")[:MAX_LOG_LINE])

    def _line(self, line: str) -> None:
        self.lines.append(line)
        if self.on_log is not None:
            try:
                self.on_log(line)
            except Exception:
                log.exception("build log callback failed")


__all__ = ["MAX_LOG_LINE", "BuildProgress", "stream_message"]
