"""The runtime contract (``dockyard.testing.runtime_contract``, the suite plugin authors run)
against every built-in engine of :data:`tests.contract.conftest.RUNTIMES`."""

from dockyard.testing.runtime_contract import *  # noqa: F403
