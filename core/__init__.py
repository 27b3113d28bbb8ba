"""dockyard's core: domain models, the slot state machine, hookspecs, the plugin manager,
configuration, errors, and the abstract contracts every runtime and state store fulfils."""

from dockyard.core.hookspecs import hookimpl

__all__ = ["hookimpl"]
