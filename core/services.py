"""The composition root: the plugin manager plus the runtime, store, router, sources and
builder that one dockyard process works with.

``Services.build`` makes them from the configured plugin names (no I/O; tests may pass
replacements), ``start`` opens them, ``close`` closes them; ``Services.open`` does the first
two at once. The API and the CLI both go through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dockyard.core.builds import Builder
from dockyard.core.config import Settings, ephemeral_overlap
from dockyard.core.errors import DockyardError, EgressNotEnforceable, LimitsNotEnforceable
from dockyard.core.plugins import DockyardPluginManager, build_plugin_manager
from dockyard.core.router import Router
from dockyard.core.runtime import LABEL_INSTANCE, LABEL_MANAGED, Runtime, RuntimeInfo
from dockyard.core.source import Source
from dockyard.core.store import StateStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a running dockyard needs."""

    settings: Settings
    pm: DockyardPluginManager
    runtime: Runtime
    store: StateStore
    router: Router
    sources: dict[str, Source]
    builder: Builder
    runtime_info: RuntimeInfo | None = None
    _opened: list[Any] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        settings: Settings,
        pm: DockyardPluginManager | None = None,
        *,
        runtime: Runtime | None = None,
        store: StateStore | None = None,
        router: Router | None = None,
        sources: dict[str, Source] | None = None,
    ) -> Services:
        """Instantiate the configured plugins (or the given replacements); nothing is opened.

        :raises UnknownPluginError: a configured name that no plugin registered.
        """
        pm = pm or build_plugin_manager(settings.disable_plugins)
        regs = pm.registries
        store = store or regs.stores.get(settings.store)(settings)
        runtime = runtime or regs.runtimes.get(settings.runtime)(settings)
        router = router or regs.routers.get(settings.router)(settings)
        if sources is None:
            sources = {name: factory(settings) for name, factory in regs.sources.items()}
        builder = Builder(
            runtime=runtime,
            network_allowed=settings.allow_build_network,
            memory_mb=settings.build_memory_mb,
            cpus=settings.build_cpus,
            timeout_s=settings.build_timeout_s,
            allowed_base_images=list(settings.allowed_base_images),
            views_dir=settings.data_path / "views",
            labels={LABEL_INSTANCE: settings.instance_id},
            base_image_aliases=dict(settings.base_image_aliases),
        )
        return cls(
            settings=settings,
            pm=pm,
            runtime=runtime,
            store=store,
            router=router,
            sources=sources,
            builder=builder,
        )

    @classmethod
    async def open(cls, settings: Settings, pm: DockyardPluginManager | None = None) -> Services:
        """``build`` then ``start``."""
        services = cls.build(settings, pm)
        await services.start()
        return services

    def labels(self, **more: str) -> dict[str, str]:
        """Labels that mark a container as this dockyard's (and filter its listings)."""
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.settings.instance_id, **more}

    @property
    def started(self) -> bool:
        return bool(self._opened)

    async def start(self) -> None:
        """Open the store, the runtime and the router.

        :raises DockyardError: an unreachable runtime, a store that cannot open, or limits
            that cannot be enforced while ``require_limits`` is set, or a network policy
            that cannot be while ``require_egress`` is.
        """
        settings = self.settings
        overlap = ephemeral_overlap(settings.port_range_start, settings.port_range_end)
        if overlap:
            log.warning("%s", overlap)
        try:
            await self.store.open()
            self._opened.append(self.store)
            await self.runtime.open()
            self._opened.append(self.runtime)
            info = await self.runtime.info()
            self.runtime_info = info
            if self.settings.require_limits and not info.limits_enforced:
                raise LimitsNotEnforceable(
                    f"require_limits is set but this host cannot enforce them: {info.limits_note}"
                )
            if self.settings.require_egress and not info.egress_enforced:
                raise EgressNotEnforceable(
                    "require_egress is set but this host cannot hold agents to their network "
                    f"policy: {info.egress_note}"
                )
            if not info.limits_enforced:
                log.warning("resource limits are NOT enforced on this host: %s", info.limits_note)
            if not info.egress_enforced:
                log.warning("the network policy is NOT enforced here: %s", info.egress_note)
            await self.router.open()
            self._opened.append(self.router)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close what ``start`` opened, last first; errors are logged, never raised."""
        while self._opened:
            thing = self._opened.pop()
            try:
                await thing.close()
            except DockyardError as exc:
                log.warning("closing %s failed: %s", thing.name, exc)
            except Exception:
                log.exception("closing %s failed", thing.name)
