"""The store contract (``dockyard.testing.store_contract``, the suite plugin authors run)
against the built-in stores (``dockyard_stores`` in pyproject's pytest options)."""

from dockyard.testing.store_contract import *  # noqa: F403
