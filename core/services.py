"""The composition root: the plugin manager plus the opened runtime and state store that one
dockyard process works with. The API and the CLI both build one through :meth:`Services.open`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from dockyard.core.config import Settings
from dockyard.core.errors import DockyardError, LimitsNotEnforceable
from dockyard.core.plugins import DockyardPluginManager, build_plugin_manager
from dockyard.core.runtime import Runtime, RuntimeInfo
from dockyard.core.store import StateStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a running dockyard needs, opened and ready."""

    settings: Settings
    pm: DockyardPluginManager
    runtime: Runtime
    store: StateStore
    runtime_info: RuntimeInfo | None = None
    _closers: list[Any] = field(default_factory=list)

    @classmethod
    async def open(cls, settings: Settings, pm: DockyardPluginManager | None = None) -> Services:
        """Build the plugin manager (unless given), then open the configured store and runtime.

        :raises DockyardError: an unknown plugin name, an unreachable runtime, a store that
            cannot open, or limits that cannot be enforced while ``require_limits`` is set.
        """
        pm = pm or build_plugin_manager(settings.disable_plugins)
        regs = pm.registries
        store: StateStore = regs.stores.get(settings.store)(settings)
        runtime: Runtime = regs.runtimes.get(settings.runtime)(settings)
        opened: list[Any] = []
        try:
            await store.open()
            opened.append(store)
            await runtime.open()
            opened.append(runtime)
            info = await runtime.info()
            if settings.require_limits and not info.limits_enforced:
                raise LimitsNotEnforceable(
                    f"require_limits is set but this host cannot enforce them: {info.limits_note}"
                )
            if not info.limits_enforced:
                log.warning("resource limits are NOT enforced on this host: %s", info.limits_note)
        except BaseException:
            for thing in reversed(opened):
                with contextlib.suppress(Exception):
                    await thing.close()
            raise
        return cls(settings=settings, pm=pm, runtime=runtime, store=store, runtime_info=info)

    async def close(self) -> None:
        """Close the runtime, then the store; errors are logged, never raised."""
        for thing in (self.runtime, self.store):
            try:
                await thing.close()
            except DockyardError as exc:
                log.warning("closing %s failed: %s", thing.name, exc)
            except Exception:
                log.exception("closing %s failed", thing.name)
