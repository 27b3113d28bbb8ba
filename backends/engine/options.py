"""Engine options (``[plugins.<engine>]`` and the runtimes' keyword arguments) as msgspec
structs, as the routers have theirs: an unknown or mistyped option is a ConfigError that
names the key."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from dockyard.core.errors import ConfigError
from dockyard.core.models import Model

OptionsT = TypeVar("OptionsT", bound="EngineOptions")

_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_AT = re.compile(r"^(.*?)(?: - at `\$\.([^`\[]+)[^`]*`)?$")


class EngineOptions(Model):
    """What every engine takes."""

    socket: str | None = None  # the engine's API (path or URL); when set, it must answer
    api_timeout_s: float = 120.0
    build_log_lines: int = 2000  # how many lines of a build's log are kept
    build_nofile: int = 4096  # nofile ulimit of RUN steps
    build_nproc: int = 4096  # nproc ulimit of RUN steps
    build_kill_grace_s: float = 15.0  # how long a stopped build may take to go
    nft_path: str = "nft"  # the nft binary of the agent firewall


def engine_options(engine: str, kind: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
    """``values`` as ``kind``; ConfigError naming the key of ``[plugins.<engine>]`` that is
    unknown or of the wrong type."""
    try:
        return msgspec.convert(dict(values), kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = _UNKNOWN.search(text)
        if unknown is not None:
            known = ", ".join(sorted(kind.__struct_fields__))
            raise ConfigError(
                f"unknown option plugins.{engine}.{unknown.group(1)}; known: {known}"
            ) from None
        match = _AT.match(text)
        reason, key = (match.group(1), match.group(2)) if match else (text, None)
        where = f"plugins.{engine}.{key}" if key else f"[plugins.{engine}]"
        raise ConfigError(f"{where} has the wrong type: {reason}") from None


__all__ = ["EngineOptions", "engine_options"]
