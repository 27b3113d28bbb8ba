"""The router contract: how a reverse proxy puts a deployment's promoted slot at
``/apps/<id>/...``. Every router plugin (Traefik, Caddy, none) provides it.

A switch is one write, and ``verify`` proves the proxy serves the new upstream before the
old slot starts draining.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

from dockyard.core.models import Model


class Upstream(Model):
    """Where a slot's container answers on the host."""

    port: int
    host: str = "127.0.0.1"


class Route(Model):
    """A deployment's route: ``prefix`` (``/apps/<id>``) stripped before forwarding."""

    deployment_id: str
    prefix: str
    upstream: Upstream
    priority: int = 0
    host: str | None = None


class RouterHealth(Model):
    name: str
    ok: bool
    detail: str = ""
    entrypoint: str | None = None


class Router(abc.ABC):
    """A reverse proxy. Built by the factory a plugin registers through
    ``dockyard_register_routers``; used between ``open()`` and ``close()``."""

    name: ClassVar[str]

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Start or attach to the proxy."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop what ``open()`` started."""

    @abc.abstractmethod
    async def apply(self, route: Route) -> None:
        """Create the route or point it at ``route.upstream``, in one write."""

    @abc.abstractmethod
    async def verify(self, route: Route, *, timeout_s: float = 5.0) -> bool:
        """Whether the proxy now forwards ``route.prefix`` to ``route.upstream``."""

    @abc.abstractmethod
    async def remove(self, deployment_id: str) -> None:
        """Remove a deployment's route; a missing one is not an error."""

    @abc.abstractmethod
    async def health(self) -> RouterHealth:
        """Whether the proxy answers, and where clients reach it."""

    async def restore(self, routes: list[Route]) -> None:
        """Re-apply every route (after the proxy restarted or lost its config)."""
        for route in routes:
            await self.apply(route)

    def url_for(self, deployment_id: str) -> str | None:
        """The base URL clients use for a deployment through the proxy, if any."""
        return None


RouterFactory = Callable[..., Router]


def route_prefix(deployment_id: str) -> str:
    """The path prefix of a deployment: ``/apps/<id>``."""
    return f"/apps/{deployment_id}"
