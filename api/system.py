"""System routes: the controller's own health and the list of loaded plugins."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get
from litestar.di import NamedDependency

from dockyard.core.gc import DiskUsage
from dockyard.core.models import Model
from dockyard.core.plugins import dockyard_version
from dockyard.core.router import RouterHealth
from dockyard.core.runtime import RuntimeInfo
from dockyard.core.services import Services


class StoreHealth(Model):
    name: str
    ok: bool
    error: str | None = None


class Health(Model):
    """``GET /v1/healthz``: is the controller able to do its job, and can it enforce limits?"""

    status: str  # "ok" | "degraded"
    version: str
    runtime: RuntimeInfo | None
    runtime_error: str | None
    store: StoreHealth
    router: RouterHealth
    limits_enforced: bool
    limits_note: str
    #: Disk use of each kind garbage collection manages, as last measured (``core/gc.py``).
    disk: DiskUsage | None = None


class PluginInfo(Model):
    name: str
    version: str
    module: str
    hooks: list[str]


class SystemController(Controller):
    """Routes about dockyard itself."""

    path = "/v1"
    tags = ["system"]

    @get(
        "/healthz",
        operation_id="healthz",
        summary="The controller's own health",
        opt={"public": True},
    )
    async def healthz(
        self, services: NamedDependency[Services], request: Request[Any, Any, Any]
    ) -> Health:
        runtime_info: RuntimeInfo | None = None
        runtime_error: str | None = None
        try:
            runtime_info = await services.runtime.info()
            services.runtime_info = runtime_info
        except Exception as exc:
            runtime_error = str(exc) or type(exc).__name__
        try:
            store_ok = await services.store.ping()
            store = StoreHealth(name=services.store.name, ok=store_ok)
        except Exception as exc:
            store = StoreHealth(name=services.store.name, ok=False, error=str(exc))
        try:
            router = await services.router.health()
        except Exception as exc:
            router = RouterHealth(name=services.router.name, ok=False, detail=str(exc))
        ok = runtime_info is not None and store.ok and router.ok
        return Health(
            status="ok" if ok else "degraded",
            version=dockyard_version(),
            runtime=runtime_info,
            runtime_error=runtime_error,
            store=store,
            router=router,
            limits_enforced=bool(runtime_info and runtime_info.limits_enforced),
            limits_note=(runtime_info.limits_note if runtime_info else "runtime unavailable"),
            disk=getattr(request.app.state, "gc", None) and request.app.state.gc.usage,
        )

    @get(
        "/plugins",
        operation_id="listPlugins",
        summary="Every loaded plugin and its hooks",
        opt={"scope": "read"},
    )
    async def plugins(self, services: NamedDependency[Services]) -> list[PluginInfo]:
        return [msgspec.convert(p, PluginInfo) for p in services.pm.describe()]
