"""The engine floor: what every Docker-compatible container engine does the same way, with
no engine client imported. Engines (``backends/podman/``, ``backends/docker/``) stand on it
and keep only their dialect, as small primitives.

``base.py`` the engine base class (connect, ``info``, ``run``: policy, create, start, read
back), ``build.py`` the build lifecycle, ``network.py`` the agent network policy and the
firewall sync, ``firewall.py`` the nftables firewall, ``inspection.py`` the one parser of
inspect JSON, ``buildlog.py`` build-log line assembly, ``options.py`` engine options as
msgspec structs.
"""

from dockyard.backends.engine.base import EngineRuntime, socket_url
from dockyard.backends.engine.build import BuildJob, BuildLifecycle, split_ref
from dockyard.backends.engine.buildlog import BuildProgress
from dockyard.backends.engine.inspection import container_info, parse_hardening
from dockyard.backends.engine.network import AgentNetworkPlan, EngineNetwork
from dockyard.backends.engine.options import EngineOptions, engine_options

__all__ = [
    "AgentNetworkPlan",
    "BuildJob",
    "BuildLifecycle",
    "BuildProgress",
    "EngineNetwork",
    "EngineOptions",
    "EngineRuntime",
    "container_info",
    "engine_options",
    "parse_hardening",
    "socket_url",
    "split_ref",
]
