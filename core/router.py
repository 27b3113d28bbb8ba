"""The router contract: how a reverse proxy puts a deployment's promoted slot at
``/apps/<id>/...``. Every router plugin (Traefik, Caddy, none) provides it.

A switch is one write (``apply``), and ``verify`` proves the proxy serves the new upstream
before the old slot starts draining: the proxy stamps every response it forwards for a route
with a value naming its upstream (header ``X-Dockyard-Route``, ``Router.stamp``), so a probe
through the proxy tells which upstream answered. ``served`` reads back what the proxy holds,
which lets the controller restore routes a restarted proxy lost.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable
from typing import ClassVar

from dockyard.core.errors import DockyardError
from dockyard.core.models import Model

#: Response header a proxy adds to every answer it forwards for a dockyard route.
ROUTE_HEADER = "X-Dockyard-Route"


class RouterError(DockyardError):
    """The proxy cannot be started, reached or configured."""

    reason = "router_error"
    status_code = 503


class Upstream(Model):
    """Where a slot's container answers on the host."""

    port: int
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Route(Model):
    """A deployment's route: requests for ``prefix`` (``/apps/<id>``) and below, with the
    prefix stripped, go to ``upstream``.

    ``priority`` orders overlapping routes (higher first); ``host`` adds a Host rule;
    ``probe_path`` is what ``verify`` requests through the proxy (the deployment's health
    path); ``tag`` names the slot behind the upstream (e.g. ``green:<revision>``) so two
    routes to the same port of different revisions differ.
    """

    deployment_id: str
    prefix: str
    upstream: Upstream
    priority: int = 0
    host: str | None = None
    probe_path: str = "/"
    tag: str = ""

    @property
    def token(self) -> str:
        """An opaque value identifying this route's target, sent back in ``ROUTE_HEADER``."""
        raw = f"{self.deployment_id}|{self.upstream.address}|{self.tag}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


class RouterHealth(Model):
    name: str
    ok: bool
    detail: str = ""
    entrypoint: str | None = None
    managed: bool = False
    version: str | None = None


class Router(abc.ABC):
    """A reverse proxy. Built by the factory a plugin registers through
    ``dockyard_register_routers``; used between ``open()`` and ``close()``.

    A router either runs its proxy itself (``managed``) or attaches to an operator's.
    """

    name: ClassVar[str]
    managed: bool = False

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Start or attach to the proxy."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop what ``open()`` started."""

    @abc.abstractmethod
    async def apply(self, route: Route) -> None:
        """Create the route or point it at ``route.upstream``, in one write.

        :raises RouterError: the proxy refused the change or cannot be reached.
        """

    @abc.abstractmethod
    async def verify(self, route: Route, *, timeout_s: float = 5.0) -> bool:
        """Whether the proxy now forwards ``route.prefix`` to ``route.upstream``; waits up
        to ``timeout_s`` for a change ``apply`` made to take effect."""

    @abc.abstractmethod
    async def remove(self, deployment_id: str) -> None:
        """Remove a deployment's route; a missing one is not an error."""

    @abc.abstractmethod
    async def health(self) -> RouterHealth:
        """Whether the proxy answers, and where clients reach it."""

    @abc.abstractmethod
    async def served(self) -> dict[str, str] | None:
        """What the proxy holds now: deployment id -> route token, for every dockyard route.
        None when the proxy cannot be asked (down)."""

    def stamp(self, route: Route) -> str:
        """The ``X-Dockyard-Route`` value the proxy sends with answers for ``route``: its
        token, unless the proxy names the upstream that answered some other way."""
        return route.token

    async def revive(self) -> bool:
        """Start again a proxy this router runs itself whose process died. True when it
        did; attached proxies are the operator's to restart."""
        return False

    async def inflight(self, upstream: Upstream) -> int | None:
        """Requests the proxy is forwarding to ``upstream`` right now (drain tracking);
        None when the proxy cannot tell."""
        return None

    async def restore(self, routes: list[Route]) -> list[str]:
        """Re-apply every route the proxy lost or holds differently (after it restarted or
        lost its config); return the deployment ids re-applied."""
        served = await self.served() or {}
        fixed = []
        for route in routes:
            if served.get(route.deployment_id) != route.token:
                await self.apply(route)
                fixed.append(route.deployment_id)
        return fixed

    def url_for(self, deployment_id: str) -> str | None:
        """The base URL clients use for a deployment through the proxy, if any."""
        return None


RouterFactory = Callable[..., Router]


def route_prefix(deployment_id: str) -> str:
    """The path prefix of a deployment: ``/apps/<id>``."""
    return f"/apps/{deployment_id}"
