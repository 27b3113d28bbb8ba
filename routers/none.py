"""The ``none`` router: no proxy; clients reach each promoted slot on its host port."""

from __future__ import annotations

from typing import Any

from dockyard.core.config import Settings
from dockyard.core.hookspecs import hookimpl
from dockyard.core.router import Route, Router, RouterHealth


class NoRouter(Router):
    """Routes nothing. A deployment's URL is its promoted slot's ``127.0.0.1:<host port>``;
    a switch is visible as soon as clients use the new URL."""

    name = "none"

    def __init__(self, settings: Settings | None = None) -> None:
        self.routes: dict[str, Route] = {}

    async def apply(self, route: Route) -> None:
        self.routes[route.deployment_id] = route

    async def verify(self, route: Route, *, timeout_s: float = 5.0) -> bool:
        return self.routes.get(route.deployment_id) == route

    async def remove(self, deployment_id: str) -> None:
        self.routes.pop(deployment_id, None)

    async def served(self) -> dict[str, str]:
        return {deployment_id: route.token for deployment_id, route in self.routes.items()}

    async def health(self) -> RouterHealth:
        return RouterHealth(name=self.name, ok=True, detail="no proxy: direct host ports")

    def url_for(self, deployment_id: str) -> str | None:
        route = self.routes.get(deployment_id)
        return f"http://{route.upstream.host}:{route.upstream.port}" if route else None


@hookimpl
def dockyard_register_routers(register: Any) -> None:
    register("none", NoRouter)
