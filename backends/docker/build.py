"""Docker's build primitives: start a build with the legacy builder (its stream read from
the response), abort one by disconnecting (the daemon then cancels it), discard the layers
a failed build committed, tag it. The log is read for the running step's container and
the layers the build committed (:class:`_BuildProgress`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from dockyard.backends.docker.context import context_tar
from dockyard.backends.engine.base import CPU_PERIOD_US, MIB
from dockyard.backends.engine.build import BuildJob, BuildLifecycle, split_ref
from dockyard.backends.engine.buildlog import BuildProgress, stream_message
from dockyard.backends.engine.context import add_to_tar
from dockyard.backends.engine.images import image_infos, label_filters
from dockyard.core.errors import BuildFailed, RuntimeUnavailable
from dockyard.core.runtime import LABEL_MANAGED, ImageInfo

log = logging.getLogger(__name__)

#: A single message of the build stream larger than this is a broken stream.
MAX_STREAM_MESSAGE = 4 * MIB
_STEP = re.compile(r"^Step \d+/\d+ : (\S+)", re.I)
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")
_COMMITTED = re.compile(r"^ ---> ([0-9a-f]{12,64})\s*$")


def _short(image: str) -> str:
    return image.removeprefix("sha256:")[:12]


class _BuildProgress(BuildProgress):
    """A build's progress, plus the container of the running step and the layers the
    build committed (not the base image's, not cached ones)."""

    def __init__(self, on_log: Callable[[str], None] | None, max_lines: int) -> None:
        super().__init__(on_log, max_lines)
        self.running: str | None = None
        self.committed: list[str] = []
        self._step = ""
        self._cached = False

    def _line(self, line: str) -> None:
        step = _STEP.match(line)
        if step is not None:
            self._step = step.group(1).upper()
            self._cached = False
        elif line.strip() == "---> Using cache":
            self._cached = True
        elif (running := _RUNNING_IN.match(line)) is not None:
            self.running = running.group(1)
        elif (committed := _COMMITTED.match(line)) is not None:
            # After FROM the id is the base image's: never ours to remove.
            if self._step != "FROM" and not self._cached:
                self.committed.append(committed.group(1))
            self.running = None
        super()._line(line)


async def build_stream_messages(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The messages of a build's response, one JSON object a line; a message larger than
    :data:`MAX_STREAM_MESSAGE` is a broken stream (BuildFailed)."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *messages, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_STREAM_MESSAGE:
            raise BuildFailed("the build stream sent a message larger than 4 MiB")
        for raw in messages:
            if (message := stream_message(raw)) is not None:
                yield message
    if (message := stream_message(buffer)) is not None:
        yield message


class DockerBuilds(BuildLifecycle):
    """The build primitives of :class:`dockyard.backends.docker.DockerRuntime`."""

    progress_type = _BuildProgress
    docker: Any
    options: Any
    _network: str | None
    _engine_errors: Callable[[], tuple[type[BaseException], ...]]
    _error: Callable[[BaseException, str], Exception]
    _timeout: Callable[[float], Any]
    _wait_gone: Callable[..., Any]

    def _build_params(self, job: BuildJob) -> dict[str, Any]:
        request, options = job.request, self.options
        memory = int(request.memory_mb) * MIB
        return {
            "t": job.temp_ref,
            "dockerfile": job.sent_dockerfile,
            "buildargs": json.dumps(dict(request.build_args)),
            "labels": json.dumps({**request.labels, LABEL_MANAGED: "true"}),
            "version": "1",  # the legacy builder: BuildKit ignores memory/CPU limits
            "rm": "1",
            "forcerm": "1",
            "pull": "0",
            "nocache": "0" if options.build_cache else "1",
            "networkmode": (self._network or "default") if request.network else "none",
            "memory": str(memory),
            "memswap": str(memory),
            "cpuperiod": str(CPU_PERIOD_US),
            "cpuquota": str(max(1000, int(request.cpus * CPU_PERIOD_US))),
            "ulimits": json.dumps(
                [
                    {"Name": "nofile", "Soft": options.build_nofile, "Hard": options.build_nofile},
                    {"Name": "nproc", "Soft": options.build_nproc, "Hard": options.build_nproc},
                ]
            ),
        }

    async def _build_messages(self, job: BuildJob) -> AsyncIterator[dict[str, Any]]:
        body = await asyncio.to_thread(context_tar, job.context, job.dockerfile)
        if job.dockerfile_override is not None:  # base image aliases rewrote it
            body = await asyncio.to_thread(
                add_to_tar, body, job.sent_dockerfile, job.dockerfile_override
            )
        job.handle = {"body": body, "response": None}
        try:
            # raw: aiodocker's images.build() has no memory, CPU, network or ulimit
            # parameters: the same request, through the client's own request path.
            async with self.docker._query(
                "build",
                "POST",
                params=self._build_params(job),
                data=body,
                headers={"Content-Type": "application/x-tar"},
                timeout=self._timeout(job.request.timeout_s + 60.0),
            ) as response:
                job.handle["response"] = response
                async for message in build_stream_messages(response):
                    yield message
        except BuildFailed as exc:
            raise job.failed(exc.message) from exc
        except self._engine_errors() as exc:
            error = self._error(exc, f"build of {job.tag}")
            if isinstance(error, RuntimeUnavailable):
                raise error from exc
            raise job.failed(getattr(error, "message", str(error))) from exc

    async def _end_build(self, job: BuildJob) -> None:
        handle = job.handle or {}
        if handle.get("response") is not None:
            handle["response"].close()
        if handle.get("body") is not None:
            handle["body"].close()

    async def _abort_build(self, job: BuildJob, reason: str) -> dict[str, Any]:
        """Disconnect (the daemon then cancels the build), make sure its container is gone,
        and remove what it committed."""
        await self._end_build(job)
        job.progress.flush()
        container = getattr(job.progress, "running", None)
        stopped = True
        if container is not None:
            stopped = await self._wait_gone(container, self.options.build_kill_grace_s)
            if not stopped:
                with contextlib.suppress(*self._engine_errors()):
                    await self.docker.containers.container(container).delete(force=True)
                stopped = await self._wait_gone(container, 5.0)
        await self._discard_build(job)
        outcome = {"stopped": stopped, "container": container}
        log.warning("build of %s %s: %s", job.temp_ref, reason, outcome)
        return outcome

    async def _our_layers(self, job: BuildJob, listed: list[Any]) -> list[str]:
        """The layers this build committed, and any child of them a late step committed,
        oldest first."""
        progress = job.progress
        committed = [_short(i) for i in getattr(progress, "committed", [])]
        ours = set(committed)
        if progress.image_id:
            ours.add(_short(progress.image_id))
        parents = {_short(str(i.get("Id", ""))): _short(str(i.get("ParentId", ""))) for i in listed}
        changed = bool(ours)
        while changed:  # children of our layers are ours too (a step that ended late)
            changed = False
            for image, parent in parents.items():
                if parent in ours and image not in ours:
                    ours.add(image)
                    changed = True
        return committed + sorted(ours - set(committed))

    async def _discard_build(self, job: BuildJob) -> None:
        """Delete the temporary tag and the untagged layers this build committed, newest
        first. Never forced: Docker refuses images that are tagged elsewhere, used by a
        container or parents of others."""
        errors = self._engine_errors()
        with contextlib.suppress(*errors):
            await self.docker.images.delete(job.temp_ref, force=True, noprune=False)
        if not getattr(job.progress, "committed", None) and not job.progress.image_id:
            return
        listed: list[Any] = []
        with contextlib.suppress(*errors):
            listed = await self.docker.images.list(all=True)
        tagged = {
            _short(str(i.get("Id", "")))
            for i in listed
            if [t for t in i.get("RepoTags") or [] if t != "<none>:<none>"]
        }
        for image in reversed(await self._our_layers(job, listed)):
            if image in tagged:
                continue  # tagged: not a leftover
            with contextlib.suppress(*errors):
                await self.docker.images.delete(image, force=False, noprune=False)

    async def _tag_build(self, job: BuildJob) -> str:
        docker = self.docker
        try:
            image = await docker.images.inspect(job.temp_ref)
            image_id = str(image["Id"]).removeprefix("sha256:")
            repo, version = split_ref(job.tag)
            await docker.images.tag(image_id, repo, tag=version)
            await docker.images.delete(job.temp_ref, force=False, noprune=True)
        except self._engine_errors() as exc:
            raise self._error(
                exc, f"tagging the image built as {job.temp_ref} as {job.tag}"
            ) from exc
        return image_id

    async def list_images(self, labels: Mapping[str, str] | None = None) -> list[ImageInfo]:
        """Local images carrying every label (what a build made, for garbage collection)."""
        try:
            entries = await self.docker.images.list(filters=label_filters(labels))
        except self._engine_errors() as exc:
            raise self._error(exc, "listing images") from exc
        return image_infos(list(entries or []), labels)


__all__ = ["MAX_STREAM_MESSAGE", "DockerBuilds", "build_stream_messages"]
