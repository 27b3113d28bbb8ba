"""The source contract: what every source plugin (git, ...) provides.

A source turns a repository URL and a ref into a checked-out directory at exactly one
commit, refusing anything unsafe with a :class:`dockyard.core.errors.SourceError` whose
``reason`` is a stable code a validator can record.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

from dockyard.core.models import Model


class SourceLimits(Model):
    """Bounds enforced while fetching (not after)."""

    timeout_s: float = 120.0
    max_bytes: int = 50 * 1024 * 1024
    max_files: int = 2000


class SourceRequest(Model):
    """What to fetch. ``ref`` is a branch, a tag or a full 40-hex commit; None means the
    remote's default branch. ``subdir`` and ``dockerfile`` are checked to stay inside the
    checkout (``dockerfile`` is relative to ``subdir``; None means none is needed)."""

    repo: str
    ref: str | None = None
    subdir: str = ""
    dockerfile: str | None = "Dockerfile"


class FetchedSource(Model):
    """A checkout at exactly ``commit``."""

    repo: str  # normalized URL that was fetched
    ref: str | None  # as requested (after URL forms like /tree/<ref> were understood)
    resolved_ref: str | None  # e.g. refs/heads/main, refs/tags/v1; None for a bare commit
    commit: str  # 40-hex, verified against the checked-out HEAD
    checkout: str  # absolute path of the work tree root
    context: str  # absolute path of the subdirectory (the build context)
    dockerfile: str | None  # absolute path of the Dockerfile, when asked for
    bytes_received: int = 0
    files: int = 0
    cached: bool = False


class Source(abc.ABC):
    """Fetches code. Built by the factory a plugin registers through
    ``dockyard_register_sources``."""

    name: ClassVar[str]

    @abc.abstractmethod
    def accepts(self, url: str) -> bool:
        """Whether this source handles ``url`` (it may still refuse it as unsafe in fetch)."""

    @abc.abstractmethod
    async def fetch(self, request: SourceRequest) -> FetchedSource:
        """Fetch ``request`` into the source's cache; raise SourceError with a stable reason."""


SourceFactory = Callable[..., Source]
