"""The test plugin's own hook, added through ``dockyard_add_hookspecs``."""

from __future__ import annotations

from dockyard.core.hookspecs import hookspec


@hookspec
def testplugin_greetings(name: str) -> str:
    """Greet ``name``: every implementation's answer is listed by ``GET /v1/testplugin/greet``."""
