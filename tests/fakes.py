"""Fast stand-ins for unit tests of orchestration logic (never the only proof of a feature).

``FakeRuntime`` keeps "containers" as small aiohttp servers on their leased loopback port,
so the real prober, router and strategy code talk HTTP to them. ``FakeSource`` returns a
checkout made on disk without git; a ref resolves to a commit derived from its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from dockyard.core.config import Settings
from dockyard.core.errors import BuildFailed, Conflict, SourceError
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.runtime import (
    BuildRequest,
    BuiltImage,
    ContainerInfo,
    ContainerSpec,
    ImageInfo,
    LogCallback,
    Runtime,
    RuntimeInfo,
)
from dockyard.core.services import Services
from dockyard.core.source import FetchedSource, Source, SourceRequest


class FakeRuntime(Runtime):
    """Containers are HTTP servers answering ``/health`` (200, or 503 when the image's build
    args asked for ``HEALTH=fail``) and ``/`` with their revision label."""

    name = "fake"

    def __init__(self, settings: Any = None) -> None:
        self.images: dict[str, dict[str, str]] = {}
        #: What ``list_images`` shows of each built image (tests may age ``created``).
        self.image_info: dict[str, ImageInfo] = {}
        self.builds = 0
        self.containers: dict[str, ContainerInfo] = {}
        self.servers: dict[str, web.AppRunner] = {}
        self.sick: set[str] = set()  # container names whose /health answers 503
        self._ids = itertools.count(1)

    async def info(self) -> RuntimeInfo:
        return RuntimeInfo(
            name="fake",
            version="0",
            rootless=True,
            cgroup_version="none",
            limits_enforced=False,
            limits_note="fake runtime",
        )

    async def build(self, request: BuildRequest, on_log: LogCallback | None = None) -> BuiltImage:
        self.builds += 1
        if request.build_args.get("BUILD") == "fail":
            raise BuildFailed("build failed on request", log_tail=["boom"])
        if request.build_args.get("BUILD") == "refused":  # as the engines' build proxy says
            raise BuildFailed(
                "build failed: a host was refused",
                log_tail=["build proxy refused: pypi.example:443"],
                build_refused=["pypi.example:443", "10.0.0.5:80"],
            )
        self.images[request.tag] = dict(request.build_args)
        if on_log:
            on_log(f"built {request.tag}")
        image_id = f"{next(self._ids):064x}"
        self.image_info[request.tag] = ImageInfo(
            id=image_id, tags=[request.tag], created=time.time(), size=1000, labels=request.labels
        )
        return BuiltImage(id=f"sha256:{image_id}", tag=request.tag)

    async def list_images(self, labels: Mapping[str, str] | None = None) -> list[ImageInfo]:
        wanted = dict(labels or {})
        return [
            info
            for tag, info in self.image_info.items()
            if tag in self.images and all(info.labels.get(k) == v for k, v in wanted.items())
        ]

    async def image_exists(self, ref: str) -> bool:
        return ref in self.images

    async def image_id(self, ref: str) -> str | None:
        info = self.image_info.get(ref)
        return info.id if info is not None else (f"id-of-{ref}" if ref in self.images else None)

    async def remove_image(self, ref: str, *, force: bool = False) -> None:
        self.images.pop(ref, None)
        self.image_info.pop(ref, None)

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        if any(c.name == spec.name for c in self.containers.values()):
            raise Conflict(f"container {spec.name} exists")
        args = self.images.get(spec.image, {})
        healthy = args.get("HEALTH") != "fail"
        revision = spec.labels.get("io.dockyard.revision", "")

        async def health(_: web.Request) -> web.Response:
            ok = healthy and spec.name not in self.sick
            return web.Response(status=200 if ok else 503, text="ok" if ok else "no")

        async def root(_: web.Request) -> web.Response:
            return web.Response(text=revision)

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/", root)
        return await self.serve_app(spec, app)

    def record_running(self, spec: ContainerSpec) -> ContainerInfo:
        """A new running container for ``spec``, recorded as this runtime's."""
        info = ContainerInfo(
            id=f"{next(self._ids):012x}",
            name=spec.name,
            image=spec.image,
            status="running",
            running=True,
            labels=dict(spec.labels),
            host_port=spec.host_port,
        )
        self.containers[info.id] = info
        return info

    async def serve_app(
        self, spec: ContainerSpec, app: web.Application, **runner_options: Any
    ) -> ContainerInfo:
        """Serve ``app`` on 127.0.0.1 at the spec's host port as the container's process
        (``stop`` cleans it up); the recorded container."""
        runner = web.AppRunner(app, access_log=None, **runner_options)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", spec.host_port).start()
        info = self.record_running(spec)
        self.servers[info.id] = runner
        return info

    def _find(self, ref: str) -> ContainerInfo | None:
        return next((c for c in self.containers.values() if ref in (c.id, c.name)), None)

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        info = self._find(ref)
        if info is None:
            return
        runner = self.servers.pop(info.id, None)
        if runner:
            await runner.cleanup()
        self.containers[info.id] = msgspec.structs.replace(info, running=False, status="exited")

    async def remove(self, ref: str) -> None:
        info = self._find(ref)
        if info is None:
            return
        await self.stop(info.id)
        del self.containers[info.id]

    async def logs(self, ref: str, *, tail: int | None = 200) -> list[str]:
        return [f"\x1b[32mlog of {ref}\x1b[0m"] if self._find(ref) else []

    async def inspect(self, ref: str) -> ContainerInfo | None:
        return self._find(ref)

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerInfo]:
        wanted = dict(labels or {})
        return [
            c
            for c in self.containers.values()
            if all(c.labels.get(k) == v for k, v in wanted.items())
        ]

    async def close(self) -> None:
        for ref in list(self.containers):
            await self.remove(ref)


class FakeSource(Source):
    """Accepts ``https://github.com/<owner>/<repo>``; ``ref`` "missing" is not found."""

    name = "fake"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetches = 0

    def accepts(self, url: str) -> bool:
        return url.startswith("https://github.com/")

    def validate(self, url: str, ref: str | None) -> None:
        if url.count("/") != 4:
            raise SourceError(f"repo: {url!r} is not owner/repo", reason="invalid_repo_url")

    async def fetch(self, request: SourceRequest) -> FetchedSource:
        self.fetches += 1
        if request.ref == "missing":
            raise SourceError(f"ref {request.ref!r} not found", reason="ref_not_found")
        ref = request.ref or ""
        is_sha = len(ref) == 40 and all(c in "0123456789abcdef" for c in ref)
        commit = ref if is_sha else hashlib.sha1(f"{request.repo}@{ref}".encode()).hexdigest()
        checkout = self.root / commit
        context = checkout / request.subdir
        context.mkdir(parents=True, exist_ok=True)
        (context / "Dockerfile").write_text("FROM scratch\n")
        return FetchedSource(
            repo=request.repo,
            ref=request.ref,
            resolved_ref=request.ref,
            commit=commit,
            checkout=str(checkout),
            context=str(context),
            dockerfile=str(context / "Dockerfile") if request.dockerfile else None,
        )


@contextlib.asynccontextmanager
async def started_services(
    tmp_path: Path, runtime: Runtime, **settings: Any
) -> AsyncIterator[Services]:
    """Services on ``runtime`` with a :class:`FakeSource` (``tmp_path/src``), no entry-point
    plugins, data in ``tmp_path`` and no monitor unless ``settings`` say otherwise; started,
    and closed (the runtime too) on the way out."""
    cfg = Settings(**{"data_dir": str(tmp_path), "monitor_interval_s": 0, **settings})
    svc = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=runtime,
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.runtime.close()
        await svc.close()


@contextlib.contextmanager
def api_over(
    tmp_path: Path,
    runtime: Runtime,
    *,
    pm: Any = None,
    sources: Mapping[str, Source] | None = None,
    **settings: Any,
) -> Iterator[Any]:
    """dockyard's API as an authenticated Litestar ``TestClient`` over ``runtime``: data in
    ``tmp_path/data``, the test settings with ``settings`` on top, a :class:`FakeSource`
    (``tmp_path/src``) unless ``sources`` says otherwise, no entry-point plugins unless
    ``pm`` is given."""
    from litestar.testing import TestClient

    from dockyard.api.app import create_app
    from tests.conftest import AUTH, TEST_SETTINGS

    cfg = Settings(data_dir=str(tmp_path / "data"), **{**TEST_SETTINGS, **settings})
    services = Services.build(
        cfg,
        pm or build_plugin_manager(load_entry_points=False),
        runtime=runtime,
        sources=sources or {"fake": FakeSource(tmp_path / "src")},
    )
    with TestClient(create_app(cfg, services=services)) as client:
        client.headers.update(AUTH)
        yield client
