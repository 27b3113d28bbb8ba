"""Where the agent firewall used to live: it is :mod:`dockyard.backends.engine.firewall` now;
this name stays for the plugins and tests that import it."""

from dockyard.backends.engine.firewall import *  # noqa: F403
from dockyard.backends.engine.firewall import __all__ as __all__
