"""The Docker runtime (``runtime = "docker"``, the extra ``dockyard[docker]``): Docker's
dialect on the engine floor (:mod:`dockyard.backends.engine`), through aiodocker, which is
imported only when the runtime is built.

``runtime.py`` holds :class:`DockerRuntime` and what was verified with which dockerd,
``containers.py`` the hardened create body and the agent interfaces, ``build.py`` the
build primitives, ``context.py`` the build context (``.dockerignore``). The names plugins
and tests import from ``dockyard.backends.docker`` are re-exported here.
"""

from dockyard.backends.docker.build import MAX_STREAM_MESSAGE, _BuildProgress, build_stream_messages
from dockyard.backends.docker.containers import _size, agent_iface
from dockyard.backends.docker.context import context_tar, is_ignored, read_dockerignore
from dockyard.backends.docker.runtime import (
    AGENT_NETWORK,
    ROOTLESS_EGRESS_NOTE,
    ROOTLESS_V1_NOTE,
    DockerOptions,
    DockerRuntime,
    cgroup_version,
    dockyard_register_runtimes,
    is_rootless,
    limits_status,
)
from dockyard.backends.engine.inspection import container_info, parse_hardening
from dockyard.backends.engine.inspection import timestamp as started_at
from dockyard.core.dockerfile import external_images

__all__ = [
    "AGENT_NETWORK",
    "MAX_STREAM_MESSAGE",
    "ROOTLESS_EGRESS_NOTE",
    "ROOTLESS_V1_NOTE",
    "DockerOptions",
    "DockerRuntime",
    "_BuildProgress",
    "_size",
    "agent_iface",
    "build_stream_messages",
    "cgroup_version",
    "container_info",
    "context_tar",
    "dockyard_register_runtimes",
    "external_images",
    "is_ignored",
    "is_rootless",
    "limits_status",
    "parse_hardening",
    "read_dockerignore",
    "started_at",
]
