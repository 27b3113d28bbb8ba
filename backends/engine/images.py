"""Image listings: the engines' ``/images/json`` entries (Docker's and Podman's compatible
shape) read into :class:`dockyard.core.runtime.ImageInfo`, and the label filter they take."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from dockyard.core.runtime import ImageInfo


def label_filters(labels: Mapping[str, str] | None) -> dict[str, list[str]]:
    """``{"label": ["k=v"]}``: the engine's filter, on the first label only: Podman 4.3
    lists nothing when given two (verified); :func:`image_infos` checks them all."""
    first = next(iter((labels or {}).items()), None)
    return {"label": [f"{first[0]}={first[1]}"]} if first else {}


def label_filters_json(labels: Mapping[str, str] | None) -> str:
    return json.dumps(label_filters(labels))


def _created(value: Any) -> float:
    """``Created``: epoch seconds (the list endpoint) or an RFC 3339 time (inspect)."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")[:26]).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def image_info(entry: Mapping[str, Any]) -> ImageInfo:
    """One entry of an image listing."""
    tags = [t for t in entry.get("RepoTags") or entry.get("Names") or [] if t != "<none>:<none>"]
    return ImageInfo(
        id=str(entry.get("Id") or entry.get("ID") or "").removeprefix("sha256:"),
        tags=tags,
        created=_created(entry.get("Created")),
        size=int(entry.get("Size") or 0),
        labels={str(k): str(v) for k, v in (entry.get("Labels") or {}).items()},
    )


def image_infos(
    entries: list[Mapping[str, Any]], labels: Mapping[str, str] | None
) -> list[ImageInfo]:
    """The entries carrying every label (checked again: a filter an engine ignored must not
    widen what garbage collection sees)."""
    found = [image_info(entry) for entry in entries]
    wanted = dict(labels or {})
    return [i for i in found if all(i.labels.get(k) == v for k, v in wanted.items())]


__all__ = ["image_info", "image_infos", "label_filters", "label_filters_json"]
