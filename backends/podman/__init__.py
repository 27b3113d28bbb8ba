"""The Podman runtime (``runtime = "podman"``, the default): Podman's dialect on the engine
floor (:mod:`dockyard.backends.engine`), through podman-py.

``runtime.py`` holds :class:`PodmanRuntime` and what was verified with which Podman,
``containers.py`` the hardened create arguments and the k8s-file log reader, ``build.py``
the build primitives, ``processes.py`` the ``/proc`` reading that stops a timed-out build,
``service.py`` the private ``podman system service``. The names plugins and tests import
from ``dockyard.backends.podman`` are re-exported here.
"""

from dockyard.backends.engine.build import split_ref as _split_ref
from dockyard.backends.engine.inspection import (
    DEFAULT_CAPABILITIES,
    container_info,
    parse_hardening,
)
from dockyard.backends.engine.inspection import timestamp as _timestamp
from dockyard.backends.podman.containers import _K8S_LOG_LINE
from dockyard.backends.podman.processes import kill_marked_build_processes
from dockyard.backends.podman.runtime import (
    AGENT_IFACE,
    AGENT_NETWORK,
    ROOTLESS_EGRESS_NOTE,
    ROOTLESS_V1_NOTE,
    PodmanOptions,
    PodmanRuntime,
    dockyard_register_runtimes,
    limits_status,
)
from dockyard.backends.podman.service import INSTALL_HINT, PodmanService, socket_answers
from dockyard.core.errors import BuildFailed

__all__ = [
    "AGENT_IFACE",
    "AGENT_NETWORK",
    "DEFAULT_CAPABILITIES",
    "INSTALL_HINT",
    "ROOTLESS_EGRESS_NOTE",
    "ROOTLESS_V1_NOTE",
    "_K8S_LOG_LINE",
    "BuildFailed",
    "PodmanOptions",
    "PodmanRuntime",
    "PodmanService",
    "_split_ref",
    "_timestamp",
    "container_info",
    "dockyard_register_runtimes",
    "kill_marked_build_processes",
    "limits_status",
    "parse_hardening",
    "socket_answers",
]
