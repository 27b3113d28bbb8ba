"""The router contract (``dockyard.testing.router_contract``, the suite plugin authors run)
against Traefik and Caddy (``dockyard_router_factory`` in ``conftest.py``)."""

from dockyard.testing.router_contract import *  # noqa: F403
