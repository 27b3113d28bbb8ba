"""The example runtime against dockyard's runtime contract, through ``dockyard.testing``.

``dockyard_runtimes = ["example"]`` in pyproject.toml names the runtime under contract (the
name the plugin registers through its entry point); ``pytest --dockyard-runtime=NAME``
chooses another. The runtime runs nothing, so the tests needing containers that really run
(marked ``dockyard_engine``) are deselected in pyproject.toml; a real engine drops that.
"""

from dockyard.testing.runtime_contract import *  # noqa: F403
