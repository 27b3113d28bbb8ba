"""Podman's build primitives: start a build (its stream pumped by a thread of its own, since
podman-py is synchronous), stop one that ran out of time by killing its ``RUN`` processes
(:mod:`dockyard.backends.podman.processes`), discard it, tag it.

Podman 4.3's build endpoint ignores ``networkmode=none`` and shares the *host's* network
namespace unless ``nsoptions`` asks for a private one, so both are sent (verified: only
``lo`` inside ``RUN``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from podman import api as podman_api
from podman.errors import APIError

from dockyard.backends.engine.base import CPU_PERIOD_US, MIB
from dockyard.backends.engine.build import BUILD_REPO, BuildJob, BuildLifecycle, split_ref
from dockyard.backends.engine.buildlog import stream_message
from dockyard.backends.engine.context import add_to_tar
from dockyard.backends.engine.images import image_infos, label_filters_json
from dockyard.backends.podman.build_network import PodmanBuildNetwork
from dockyard.backends.podman.network_gc import PodmanNetworkGc
from dockyard.backends.podman.processes import _shutdown_response, kill_marked_build_processes
from dockyard.core.errors import BuildFailed
from dockyard.core.runtime import LABEL_MANAGED, ImageInfo

log = logging.getLogger(__name__)

Message = tuple[str, Any]


@dataclass
class _PodmanBuild:
    """A Podman build under way: its response, the thread pumping it, what it delivered."""

    marker: str
    response: Any = None
    reader: threading.Thread | None = None
    queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)


def _pump(resp: Any, deliver: Callable[[Message], None]) -> None:
    """Read the build stream (in a thread): each message, then ``end``."""
    try:
        for raw in resp.iter_lines():
            message = stream_message(raw)
            if message is not None:
                deliver(("message", message))
    except Exception as exc:
        deliver(("broken", f"{type(exc).__name__}: {exc}"))
    finally:
        with contextlib.suppress(Exception):
            resp.close()
        deliver(("end", None))


class PodmanBuilds(PodmanNetworkGc, PodmanBuildNetwork, BuildLifecycle):
    """The build primitives of :class:`dockyard.backends.podman.PodmanRuntime`."""

    client: Any
    _call: Callable[..., Any]
    _check: Callable[..., bool]
    options: Any
    _limits_enforced: bool

    @property
    def build_marker_prefix(self) -> str:
        """What starts the marker of every build this dockyard runs: its data directory's
        hash, so a restarted dockyard finds the ``RUN`` steps a killed one left (and only
        those)."""
        scope = hashlib.sha256(str(self.options.state_dir or "").encode()).hexdigest()[:12]
        return f"dockyard-build-{scope}-"

    def _build_params(self, job: BuildJob, marker: str) -> dict[str, Any]:
        request, options = job.request, self.options
        build_args = dict(request.build_args)
        session = job.egress
        if session is not None:  # the build proxy: its variables win over the request's
            build_args.update(session.build_args())
        previous = build_args.get("no_proxy")
        build_args["no_proxy"] = f"{previous},{marker}" if previous else marker
        params: dict[str, Any] = {
            "t": job.temp_ref,
            "dockerfile": job.sent_dockerfile,
            "buildargs": json.dumps(build_args),
            "labels": json.dumps({**request.labels, LABEL_MANAGED: "true"}),
            "rm": True,
            "forcerm": True,
            "pullpolicy": "never",
            "layers": options.build_layers,
            "outputformat": "application/vnd.docker.distribution.manifest.v2+json",
            # Podman 4.3 ignores networkmode=none and would share the host's network
            # namespace: ask for a private one, configured (bridge) or not (only lo).
            "networkmode": "2" if request.network or session is not None else "1",
            # The build proxy's network, by name (Podman 4.3 takes a name as the path).
            "nsoptions": json.dumps(
                [
                    {
                        "Name": "network",
                        "Host": False,
                        "Path": session.network.name if session is not None else "",
                    }
                ]
            ),
            "ulimits": json.dumps(
                [
                    f"nofile={options.build_nofile}:{options.build_nofile}",
                    f"nproc={options.build_nproc}:{options.build_nproc}",
                ]
            ),
        }
        if self._limits_enforced:
            memory = int(request.memory_mb) * MIB
            params.update(
                memory=memory,
                memswap=memory,
                cpuperiod=CPU_PERIOD_US,
                cpuquota=max(1000, int(request.cpus * CPU_PERIOD_US)),
            )
        return params

    def _post_build(self, job: BuildJob, build: _PodmanBuild, read_timeout_s: float) -> Any:
        context = str(job.context)
        excludes = podman_api.prepare_containerignore(context)
        body = podman_api.create_tar(anchor=context, exclude=excludes)
        if job.dockerfile_override is not None:
            body = add_to_tar(body, job.sent_dockerfile, job.dockerfile_override)
        try:
            # raw: podman-py's images.build() has no nsoptions, ulimits or pull policy.
            build.response = self.client.api.post(
                "/build",
                params=self._build_params(job, build.marker),
                data=body,
                headers={"Content-type": "application/x-tar"},
                stream=True,
                timeout=(30.0, read_timeout_s),
            )
        finally:
            body.close()
        return build.response

    async def _build_messages(self, job: BuildJob) -> AsyncIterator[dict[str, Any]]:
        build = job.handle = _PodmanBuild(marker=f"{self.build_marker_prefix}{job.build_id}")
        read_timeout = job.request.timeout_s + self.options.build_kill_grace_s + 60.0
        resp = await self._call(self._post_build, job, build, read_timeout)
        if resp.status_code >= 400:
            message = _response_text(resp)
            raise BuildFailed(
                f"build of {job.tag} refused: {message}", tag=job.tag, log_tail=[message]
            )
        loop = asyncio.get_running_loop()

        def deliver(item: Message) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(build.queue.put_nowait, item)

        build.reader = threading.Thread(
            target=_pump, args=(resp, deliver), name=f"podman-build-{job.build_id[:8]}", daemon=True
        )
        build.reader.start()
        while True:
            kind, value = await build.queue.get()
            if kind == "end":
                return
            if kind == "broken":
                raise job.failed(f"the connection to Podman broke ({value})")
            yield value

    def _stop_build(self, build: _PodmanBuild) -> dict[str, Any]:
        """Kill the build's RUN processes until its stream ends (bounded)."""
        deadline = time.monotonic() + self.options.build_kill_grace_s
        killed = 0
        reader = build.reader
        while reader is not None and reader.is_alive() and time.monotonic() < deadline:
            killed += kill_marked_build_processes(build.marker)
            reader.join(0.2)
        stopped = reader is None or not reader.is_alive()
        if reader is not None and not stopped:
            _shutdown_response(build.response)
            reader.join(5.0)
        return {"killed_processes": killed, "stopped": stopped}

    async def _abort_build(self, job: BuildJob, reason: str) -> dict[str, Any]:
        build: _PodmanBuild | None = job.handle
        outcome: dict[str, Any] = {"killed_processes": 0, "stopped": True}
        if build is not None:
            outcome = await asyncio.to_thread(self._stop_build, build)
            while not build.queue.empty():
                kind, value = build.queue.get_nowait()
                if kind == "message":
                    job.progress.feed(value)
        job.progress.flush()
        await self._discard_build(job)
        log.warning("build of %s %s: %s", job.tag, reason, outcome)
        return outcome

    async def _discard_build(self, job: BuildJob) -> None:
        def remove() -> None:
            with contextlib.suppress(Exception):
                self.client.images.remove(job.temp_ref, force=True)

        await asyncio.to_thread(remove)

    def _tag(self, job: BuildJob) -> str:
        try:
            image = self.client.images.get(job.temp_ref)
        except APIError as exc:
            self._check(exc.response, f"inspecting the image built as {job.temp_ref}")
            raise
        image_id = str(image.id).removeprefix("sha256:")
        repo, version = split_ref(job.tag)
        try:
            image.tag(repo, version)
        except APIError as exc:
            self._check(exc.response, f"tagging {image_id[:12]} as {job.tag}")
            raise
        # raw: podman-py has no untag.
        self._check(
            self.client.api.post(
                f"/images/{image_id}/untag", params={"repo": BUILD_REPO, "tag": job.build_id}
            ),
            f"removing the temporary tag {job.temp_ref}",
        )
        return image_id

    async def _tag_build(self, job: BuildJob) -> str:
        return await self._call(self._tag, job)

    async def image_id(self, ref: str) -> str | None:
        """The id of the local image ``ref`` names; None when there is none."""
        resp = await self._call(self.client.api.get, f"/images/{ref}/json")
        if not self._check(resp, f"inspecting image {ref}", ok_missing=True):
            return None
        return str(resp.json().get("Id") or "").removeprefix("sha256:") or None

    async def list_images(self, labels: Mapping[str, str] | None = None) -> list[ImageInfo]:
        """Local images carrying every label (what a build made, for garbage collection)."""

        def listing() -> list[Any]:
            # raw: podman-py's images.list() wraps each entry in an Image that re-inspects.
            params = {"filters": label_filters_json(labels)}
            for _attempt in range(2):  # an image removed meanwhile fails the whole listing
                resp = self.client.api.get("/images/json", params=params)
                if resp.ok:
                    break
                time.sleep(0.2)
            self._check(resp, "listing images")
            return list(resp.json() or [])

        return image_infos(await self._call(listing), labels)


def _response_text(resp: Any) -> str:
    """The engine's message in an error response."""
    try:
        body = resp.json()
    except ValueError:
        return str(resp.text).strip()
    if isinstance(body, dict):
        return str(body.get("message") or body.get("cause") or body).strip()
    return str(body)


__all__ = ["PodmanBuilds"]
