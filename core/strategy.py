"""The strategy contract: how a deployment rolls out a revision and switches between slots.

Strategies compose :class:`dockyard.core.deployer.SlotOps` primitives; the controller calls
them with the deployment's lock held, so a strategy never races itself on one deployment.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from dockyard.core.deployer import SlotOps
    from dockyard.core.models import Deployment


class Strategy(abc.ABC):
    """Built by the factory a plugin registers through ``dockyard_register_strategies``."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def deploy(self, ops: SlotOps, deployment: Deployment) -> None:
        """Roll out ``deployment.spec``; on failure the serving slot must keep serving."""

    @abc.abstractmethod
    async def switch(self, ops: SlotOps, deployment: Deployment) -> None:
        """Serve from the other slot (manual rollback)."""


StrategyFactory = Callable[..., Strategy]
