"""The build lifecycle every engine follows, as template methods: check the request and the
Dockerfile's base images (never pulled: a missing one is refused before the build starts),
stream the build under its deadline into a :class:`BuildProgress`, stop it on timeout or
cancellation, discard what a failed build left, and re-tag the image from its private
temporary name on success (so a build that ends past its deadline never produces the
requested tag). The engines supply the primitives: start a build (its messages), abort
it, discard it, tag it."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockyard.backends.engine.build_egress import BuildEgressConfig, BuildNetwork, egress_session
from dockyard.backends.engine.build_firewall import BuildFirewall
from dockyard.backends.engine.buildlog import BuildProgress
from dockyard.backends.engine.firewall import local_nft
from dockyard.core.build_egress import resolve_alias
from dockyard.core.dockerfile import external_images, rewrite_images
from dockyard.core.errors import (
    BuildFailed,
    BuildTimeout,
    Conflict,
    NotFound,
    RuntimeOperationError,
    RuntimeUnavailable,
)
from dockyard.core.runtime import BuildRequest, BuiltImage, LogCallback

#: Temporary repository builds are tagged with until they succeed.
BUILD_REPO = "localhost/dockyard-build"
#: The most of a Dockerfile read for its base images.
MAX_DOCKERFILE_BYTES = 1024 * 1024
#: An image reference: [registry[:port]/]path[:tag][@digest], or an id.
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]*$")


def split_ref(ref: str) -> tuple[str, str]:
    """``name[:tag]`` into (repository, tag); a port in the registry is not a tag."""
    if "@" in ref:
        raise BuildFailed(f"image tag {ref!r} must not be a digest", tag=ref)
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


@dataclass
class BuildJob:
    """One build under way: the request, where it reads from, its temporary tag, what its
    stream said, and the engine's handle on it (a response, a reader thread)."""

    request: BuildRequest
    context: Path
    dockerfile: str  # relative to the context, ``/``-separated
    progress: BuildProgress
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    handle: Any = None
    #: The Dockerfile as sent when base image aliases rewrote it: the engine adds it to the
    #: context it sends as :attr:`sent_dockerfile` (the checkout is never written).
    dockerfile_override: bytes | None = None
    #: The build's proxy (:class:`dockyard.backends.engine.build_egress.EgressSession`).
    egress: Any = None

    @property
    def tag(self) -> str:
        return self.request.tag

    @property
    def sent_dockerfile(self) -> str:
        """The Dockerfile the engine is told to build: the rewritten one, if any."""
        if self.dockerfile_override is None:
            return self.dockerfile
        return f".dockyard-Dockerfile-{self.build_id[:12]}"

    @property
    def temp_ref(self) -> str:
        return f"{BUILD_REPO}:{self.build_id}"

    @property
    def refused(self) -> list[str] | None:
        """``host:port`` the build's proxy refused (None: the build had no proxy)."""
        return None if self.egress is None else self.egress.refused

    def failed(self, reason: str, **detail: Any) -> BuildFailed:
        if self.refused is not None:
            detail.setdefault("build_refused", self.refused)
        return BuildFailed(
            f"build of {self.tag} failed: {reason}",
            tag=self.tag,
            log_tail=list(self.progress.lines),
            **detail,
        )


class BuildLifecycle(abc.ABC):
    """The build template of :class:`dockyard.backends.engine.EngineRuntime`."""

    build_log_lines: int = 2000
    options: Any
    #: The build proxy and base image aliases (the runtime's settings set them).
    build_egress: BuildEgressConfig = BuildEgressConfig()
    _build_firewall: BuildFirewall | None = None
    #: Build cleanups under way (a proxy being stopped, a build network being removed):
    #: they finish even when their build is cancelled, and ``close`` waits for them.
    _build_cleanups: set[asyncio.Task[None]] | None = None
    #: Makes the progress of a build: engines that read more from the log subclass it.
    progress_type: Callable[[LogCallback | None, int], BuildProgress] = BuildProgress

    @abc.abstractmethod
    async def image_exists(self, ref: str) -> bool: ...

    # ---------------------------------------------------------------- primitives
    @abc.abstractmethod
    def _build_messages(self, job: BuildJob) -> AsyncIterator[dict[str, Any]]:
        """Start the build; its stream's messages. A broken stream raises BuildFailed."""

    @abc.abstractmethod
    async def _abort_build(self, job: BuildJob, reason: str) -> dict[str, Any]:
        """Stop a build that is still running, discard it; what happened (``stopped``)."""

    @abc.abstractmethod
    async def _discard_build(self, job: BuildJob) -> None:
        """Remove what a build that ended without an image left (never raises)."""

    @abc.abstractmethod
    async def _tag_build(self, job: BuildJob) -> str:
        """Give the built image ``job.tag`` instead of its temporary tag; its id."""

    async def _end_build(self, job: BuildJob) -> None:
        """Release what the build held open (a request body, a response)."""
        return None

    async def _build_network(self, build_id: str) -> BuildNetwork:
        """A network of the build's own (its proxy is the only thing it reaches there),
        held by the build firewall; BuildFailed (``network_policy_failed``) when the
        engine cannot hold builds to their proxy."""
        raise BuildFailed(
            f"build_proxy is set but the {type(self).__name__} engine cannot hold builds to "
            "their proxy, so builds are refused (use Podman rootful)",
            reason="network_policy_failed",
        )

    async def _drop_build_network(self, network: BuildNetwork) -> None:
        """Remove a build's network once the build is over (never raises)."""
        return None

    async def _build_cleanup(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Run ``cleanup`` to its end, even when the build is cancelled (again) meanwhile;
        :meth:`_finish_build_cleanups` waits for it."""
        if self._build_cleanups is None:
            self._build_cleanups = set()
        task = asyncio.ensure_future(cleanup)
        self._build_cleanups.add(task)
        task.add_done_callback(self._build_cleanups.discard)
        await asyncio.shield(task)

    async def _finish_build_cleanups(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for the build cleanups still under way: a dockyard that stops
        mid-build leaves no proxy's firewall grant, log directory or build network."""
        pending = [task for task in self._build_cleanups or () if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def _build_egress(self, job: BuildJob) -> AsyncIterator[None]:
        """The build's network and proxy for the build's lifetime (none when off or when
        the build has the whole network)."""
        config = self.build_egress
        if not config.enabled or job.request.network:
            yield
            return
        network = await self._build_network(job.build_id)
        try:
            if self._build_firewall is None:
                self._build_firewall = BuildFirewall(local_nft(self.options.nft_path))
            state_dir = getattr(self.options, "state_dir", None)
            async with egress_session(
                config,
                self._build_firewall,
                network,
                state_dir,
                job.build_id,
                job.progress.note,
                cleanup=self._build_cleanup,
            ) as session:
                job.egress = session
                yield
        finally:
            await self._build_cleanup(self._drop_build_network(network))

    # ------------------------------------------------------------------ template
    def _build_job(self, request: BuildRequest, on_log: LogCallback | None) -> BuildJob:
        split_ref(request.tag)
        context = Path(request.context).resolve()
        if not context.is_dir():
            raise BuildFailed(f"build context {context} is not a directory", tag=request.tag)
        dockerfile = (context / request.dockerfile).resolve()
        if not dockerfile.is_relative_to(context) or not dockerfile.is_file():
            raise BuildFailed(
                f"Dockerfile {request.dockerfile!r} is not a file inside the build context",
                tag=request.tag,
            )
        progress = self.progress_type(on_log, self.build_log_lines)
        return BuildJob(request, context, dockerfile.relative_to(context).as_posix(), progress)

    async def _check_base_images(self, job: BuildJob) -> None:
        """Refuse a build whose base images are not on this host (they are never pulled);
        a name ``base_image_aliases`` maps is replaced by its local image."""
        path = job.context / job.dockerfile
        text = path.read_bytes()[:MAX_DOCKERFILE_BYTES].decode("utf-8", "replace")
        aliases = self.build_egress.aliases
        rewrites: dict[str, str] = {}
        for ref in external_images(text, job.request.build_args):
            image = resolve_alias(ref, aliases) if aliases else None
            if image is not None:
                rewrites[ref] = image
            local = image or ref
            if not IMAGE_REF.match(local) or not await self.image_exists(local):
                alias = f" (its base_image_aliases entry maps it to {image!r})" if image else ""
                raise BuildFailed(
                    f"build of {job.tag}: image {ref!r}{alias} is not on this host, and "
                    "dockyard never pulls images (map it to a local image in "
                    "base_image_aliases, or build or load it first)",
                    tag=job.tag,
                    log_tail=[f"missing image: {ref}"],
                )
        if rewrites:
            rewritten = rewrite_images(text, rewrites, job.request.build_args)
            job.dockerfile_override = rewritten.encode()
            for ref, image in rewrites.items():
                job.progress.note(f"base image {ref} -> {image} (base_image_aliases)")

    async def _stream_build(self, job: BuildJob) -> None:
        """Read the build's stream until it ends or its deadline passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.request.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                async with contextlib.aclosing(self._build_messages(job)) as messages:
                    async for message in messages:
                        job.progress.feed(message)
        except TimeoutError:
            outcome = await self._abort_build(job, "timed out")
            raise BuildTimeout(
                f"build of {job.tag} ran past its {job.request.timeout_s:g}s timeout and "
                + ("was stopped" if outcome["stopped"] else "was abandoned (it may still run)"),
                tag=job.tag,
                timeout_s=job.request.timeout_s,
                log_tail=list(job.progress.lines),
                **outcome,
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_build(job, "was cancelled"))
            raise
        except BuildFailed:  # a broken stream or a refused build: make sure it stops
            await self._abort_build(job, "failed")
            raise
        except RuntimeUnavailable:
            await self._discard_build(job)
            raise
        finally:
            await self._end_build(job)

    async def build(self, request: BuildRequest, on_log: LogCallback | None = None) -> BuiltImage:
        """Build ``request.context`` into ``request.tag``; see the engine's module docstring
        for what holds (no network, no pulls, limits, timeouts that stop the build)."""
        job = self._build_job(request, on_log)
        await self._check_base_images(job)
        try:
            async with self._build_egress(job):
                await self._stream_build(job)
        except BuildFailed as exc:
            # The proxy's summary is read as the session closes: the hosts it refused
            # travel with the failure as data (deployer, slot event, evaluation).
            if job.refused is not None:
                exc.detail["build_refused"] = job.refused
            raise
        job.progress.flush()
        if job.progress.error is not None:
            await self._discard_build(job)
            raise job.failed(job.progress.error)
        try:
            image_id = await self._tag_build(job)
        except (RuntimeOperationError, NotFound, Conflict, RuntimeUnavailable) as exc:
            await self._discard_build(job)
            raise job.failed(exc.message) from exc
        return BuiltImage(id=image_id, tag=request.tag, log=list(job.progress.lines))


__all__ = ["BUILD_REPO", "IMAGE_REF", "BuildJob", "BuildLifecycle", "split_ref"]
