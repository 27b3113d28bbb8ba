"""A template for third-party dockyard plugins.

It registers a runtime named ``example`` that keeps containers in memory (nothing runs: copy
it and fill in a real engine), a spec policy that refuses repositories outside the owners
listed in ``[plugins.example] allowed_owners``, and an event observer that counts events.
Its tests (``tests/``) run dockyard's runtime contract against it through
``dockyard.testing``: ``pytest`` in this directory.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from dockyard.core import hookimpl
from dockyard.core.config import Settings
from dockyard.core.errors import BuildFailed, Conflict, NotFound, PolicyRefused
from dockyard.core.models import DeploymentSpec, Event
from dockyard.core.runtime import (
    LABEL_MANAGED,
    BuildRequest,
    BuiltImage,
    ContainerInfo,
    ContainerSpec,
    LogCallback,
    Runtime,
    RuntimeInfo,
)

#: Events seen by :func:`dockyard_event`, by kind (an observer example).
EVENT_COUNTS: dict[str, int] = {}
_ALLOWED_OWNERS: set[str] = set()


class ExampleRuntime(Runtime):
    """An in-memory runtime: the smallest thing that fulfils the Runtime contract's shape."""

    name = "example"

    def __init__(self, settings: Settings | None = None) -> None:
        self.images: dict[str, str] = {}
        self.containers: dict[str, ContainerInfo] = {}
        self._ids = itertools.count(1)

    async def info(self) -> RuntimeInfo:
        return RuntimeInfo(
            name=self.name,
            version="0.1.0",
            rootless=True,
            cgroup_version="none",
            limits_enforced=False,
            limits_note="the example runtime runs nothing",
        )

    async def build(self, request: BuildRequest, on_log: LogCallback | None = None) -> BuiltImage:
        if on_log:
            on_log(f"pretending to build {request.tag}")
        if "fail" in request.build_args:
            raise BuildFailed("build failed on request", log_tail=["fail"])
        image_id = f"sha256:{next(self._ids):064x}"
        self.images[request.tag] = image_id
        return BuiltImage(id=image_id, tag=request.tag, log=[f"built {request.tag}"])

    async def image_exists(self, ref: str) -> bool:
        return ref in self.images or ref in self.images.values()

    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        self.images.pop(ref, None)

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        if self._find(spec.name) is not None:
            raise Conflict(f"a container named {spec.name!r} exists already")
        info = ContainerInfo(
            id=f"{next(self._ids):012x}",
            name=spec.name,
            image=spec.image,
            status="running",
            running=True,
            labels={**spec.labels, LABEL_MANAGED: "true"},
            host_port=spec.host_port,
        )
        self.containers[info.id] = info
        return info

    def _find(self, ref: str) -> ContainerInfo | None:
        for info in self.containers.values():
            if ref in (info.id, info.name):
                return info
        return None

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        info = self._find(ref)
        if info:
            self.containers[info.id] = ContainerInfo(
                **{**_asdict(info), "status": "exited", "running": False, "exit_code": 0}
            )

    async def remove(self, ref: str) -> None:
        info = self._find(ref)
        if info:
            del self.containers[info.id]

    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        if self._find(ref) is None:
            raise NotFound(f"no container {ref!r}")
        return []

    async def inspect(self, ref: str) -> ContainerInfo | None:
        return self._find(ref)

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        wanted = dict(labels or {})
        return [
            c
            for c in self.containers.values()
            if all(c.labels.get(k) == v for k, v in wanted.items())
        ]


def _asdict(info: ContainerInfo) -> dict[str, Any]:
    return {f: getattr(info, f) for f in info.__struct_fields__}


def _runtime_factory(settings: Settings) -> ExampleRuntime:
    _ALLOWED_OWNERS.clear()
    _ALLOWED_OWNERS.update(settings.plugin_options("example").get("allowed_owners", []))
    return ExampleRuntime(settings)


@hookimpl
def dockyard_register_runtimes(register: Any) -> None:
    register("example", _runtime_factory)


@hookimpl
def dockyard_check_spec(spec: DeploymentSpec) -> None:
    if not _ALLOWED_OWNERS:
        return
    owner = urlsplit(spec.repo).path.strip("/").split("/")[0]
    if owner not in _ALLOWED_OWNERS:
        raise PolicyRefused(f"repo owner {owner!r} is not in allowed_owners")


@hookimpl
def dockyard_event(event: Event) -> None:
    EVENT_COUNTS[event.kind] = EVENT_COUNTS.get(event.kind, 0) + 1
