"""The evaluation plugin's own hook: agent protocols.

Added to the plugin manager by the evaluation plugin (``dockyard_add_hookspecs``), so it
exists only while that plugin is loaded; an implementation that may be loaded without it
marks itself ``@hookimpl(optionalhook=True)``. Its registrar is read as
``pm.registries.protocols``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dockyard.core.hookspecs import hookspec

if TYPE_CHECKING:
    from collections.abc import Callable

    from dockyard.core.plugins import Registrar


@hookspec
def dockyard_register_protocols(register: Registrar[Callable[..., Any]]) -> None:
    """Register agent protocols (Autoppia's ``step`` and ``solve_task``, ...).

    :param register: call ``register(name, factory)``; ``factory(settings)`` returns a
        :class:`dockyard.plugins.protocols.AgentProtocol` whose ``solve(agent, task)`` relays
        one task and returns a normalized ``TaskAnswer``; an evaluation names its protocol
        (built in: ``solve_task``, ``step``, ``act``).

    A third-party plugin implements this hook to relay tasks in another agent protocol.
    """
