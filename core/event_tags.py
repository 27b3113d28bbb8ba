"""Event tags: names a plugin attaches to journaled events, so the journal can be read per
unit of its work (``dockyard_register_event_tags``).

A tag has a name (``[a-z][a-z0-9_]{0,39}``) and, per event, a value (an id) or none. Who
decides the value is the plugin's tagger, made once per event hub by the factory it
registered: ``tagger(event, context)`` sees the event and the log context it was emitted in
(``dockyard.core.logs.current()``) and may remember what earlier events said (which
deployment belongs to which unit of work, say).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from dockyard.core.errors import PluginError
from dockyard.core.models import Event

if TYPE_CHECKING:
    from dockyard.core.plugins import DockyardPluginManager

log = logging.getLogger(__name__)

#: A tag's name (it is also a query parameter of the event routes).
TAG_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
#: A tag's value: an id.
TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


class EventTagger(Protocol):
    """Decides one tag's value for each event journaled (None: the event has no such tag)."""

    def __call__(self, event: Event, context: Mapping[str, Any]) -> str | None: ...


#: What ``dockyard_register_event_tags`` registers: makes a fresh tagger.
TaggerFactory = Callable[[], EventTagger]


def make_taggers(pm: DockyardPluginManager, reserved: Iterable[str] = ()) -> dict[str, EventTagger]:
    """A fresh tagger for every registered tag (name -> tagger); a bad or ``reserved``
    name (one an event's own fields use) is a PluginError naming its plugin."""
    registry = pm.registries.event_tags
    taken = set(reserved)
    taggers: dict[str, EventTagger] = {}
    for name, factory in registry.items():
        if not TAG_NAME_RE.match(name) or name in taken:
            why = f"must match {TAG_NAME_RE.pattern}"
            if name in taken:
                why = "is an event's own field"
            raise PluginError(
                f"plugin {registry.owner(name)!r} registered the event tag {name!r}: the name {why}"
            )
        taggers[name] = factory()
    return taggers


def tag_event(
    taggers: Mapping[str, EventTagger], event: Event, context: Mapping[str, Any]
) -> dict[str, str]:
    """Every tag's value for ``event``; a tagger that fails or answers something that is
    not an id is logged and leaves its tag off (an observer cannot break a deployment)."""
    tags: dict[str, str] = {}
    for name, tagger in taggers.items():
        try:
            value = tagger(event, context)
        except Exception:
            log.exception("event tagger %r failed", name)
            continue
        if value is None:
            continue
        if not isinstance(value, str) or not TAG_VALUE_RE.match(value):
            log.warning("event tagger %r answered %r, not an id; tag left off", name, value)
            continue
        tags[name] = value
    return tags
