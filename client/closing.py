"""``async with`` for the client's objects that hold a session, a process or a socket:
leaving the block calls their ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncClosing:
    """Base of an object used as ``async with obj:``; ``__aenter__`` returns it (override
    it to connect first) and ``__aexit__`` awaits :meth:`close`, whatever happened."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Release what the object holds; safe to call more than once."""
        raise NotImplementedError
