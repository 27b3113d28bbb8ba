"""dockyard.testing: what a plugin author needs to prove a plugin from its own repository.

Installed with dockyard and loaded by pytest through the entry point ``pytest11``
(:mod:`dockyard.testing.plugin`). It ships:

- the contract suites every runtime, store and router plugin passes
  (:mod:`dockyard.testing.runtime_contract`, :mod:`dockyard.testing.store_contract`,
  :mod:`dockyard.testing.router_contract`); a test
  module runs one by importing it, ``from dockyard.testing.runtime_contract import *``, and
  the plugin under contract is chosen by name on the command line
  (``pytest --dockyard-runtime=myengine``, ``--dockyard-store=``, ``--dockyard-router=``),
  resolved through the
  plugin manager (entry points in the group ``dockyard``) like ``dockyard serve`` does;
- fixtures for a running dockyard with a given plugin set (``dockyard_app``).

Tests of the runtime contract that need containers that really run (a build's ``RUN``
steps, HTTP served on 127.0.0.1, the hardening read back) carry the marker
``dockyard_engine``: a runtime that runs nothing deselects them with
``-m "not dockyard_engine"``.
"""

from __future__ import annotations

from dockyard.testing.harness import (
    TEST_LABEL,
    TestImage,
    busybox_path,
    make_context,
    unavailable,
)

__all__ = ["TEST_LABEL", "TestImage", "busybox_path", "make_context", "unavailable"]
