"""From a fetched source to a runnable image: safety checks, content-addressed tags, reuse.

Two build modes:

- ``dockerfile``: the repository's own Dockerfile (relative to the subdirectory) is built
  with the runtime, network ``none`` unless the deployment opts in and the operator allows
  it. Parser directives (``# syntax=``) and ``RUN --security=insecure`` are refused.
- ``image``: nothing is built; an operator-chosen base image runs the source mounted
  read-only at ``/app`` with a start command, working directory ``/app`` and a tmpfs at
  ``/app/logs``, as Autoppia's validator does today. What is mounted is a *view* of the
  cached checkout (:func:`source_view`): a world-readable copy that has the ``logs``
  mountpoint, so the engine never writes into the cache (a tmpfs inside a read-only bind
  needs its mountpoint to exist) and an agent running as any uid can read its code.

Images are tagged from the repository and commit plus a hash of every build input, and
labelled with their provenance, so the same inputs never build twice (an evaluation of a
commit that was deployed before reuses its image).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dockyard.core.build_egress import resolve_alias
from dockyard.core.dockerfile import external_images, parse
from dockyard.core.errors import BuildFailed, ValidationError
from dockyard.core.models import DeploymentSpec
from dockyard.core.runtime import (
    LABEL_MANAGED,
    BuildRequest,
    Runtime,
)
from dockyard.core.source import FetchedSource

LABEL_REPO = "io.dockyard.source.repo"
LABEL_COMMIT = "io.dockyard.source.commit"
LABEL_SUBDIR = "io.dockyard.source.subdir"
LABEL_DOCKERFILE = "io.dockyard.source.dockerfile"
LABEL_INPUTS = "io.dockyard.build.inputs"
LABEL_ARGS_HASH = "io.dockyard.build.args-hash"

#: Where ``image`` mode mounts the source inside the container.
SOURCE_MOUNT = "/app"
#: ``image`` mode's scratch directory (a tmpfs) inside the source mount.
LOGS_DIR = "logs"

_INSECURE = re.compile(r"--security(?:=|\s+)insecure", re.I)
_RUN_NETWORK = re.compile(r"--network(?:=|\s+)(\S+)", re.I)
_ADD_URL = re.compile(r"^\s*ADD\s+(?:--\S+\s+)*(?:https?|git|ftp)://", re.I)
_MAX_DOCKERFILE_BYTES = 256 * 1024


def check_dockerfile(text: str, *, network_allowed: bool = False) -> None:
    """Refuse Dockerfile features that escape the build sandbox, reading the instructions
    as the engines do (:mod:`dockyard.core.dockerfile`: ``# escape=``, continuations,
    comments inside them).

    :raises BuildFailed: with reason ``dockerfile_refused`` and the offending line.
    """
    dockerfile = parse(text)
    if "syntax" in dockerfile.directives:
        raise BuildFailed(
            f"Dockerfile line {dockerfile.directives['syntax'][0]}: '# syntax=' frontends are "
            "not allowed",
            reason="dockerfile_refused",
        )
    for instruction in dockerfile.instructions:
        number, stripped = instruction.line, instruction.text
        if _ADD_URL.match(stripped):
            # The engine fetches ADD <url> itself, outside the build's network sandbox.
            raise BuildFailed(
                f"Dockerfile line {number}: ADD <url> is not allowed (the engine would "
                "fetch it outside the build's network sandbox); fetch it in the repository",
                reason="dockerfile_refused",
            )
        if instruction.keyword != "RUN":
            continue
        if _INSECURE.search(stripped):
            raise BuildFailed(
                f"Dockerfile line {number}: RUN --security=insecure is not allowed",
                reason="dockerfile_refused",
            )
        net = _RUN_NETWORK.search(stripped)
        if net and net.group(1).lower() != "none" and not network_allowed:
            raise BuildFailed(
                f"Dockerfile line {number}: RUN --network={net.group(1)} is not allowed",
                reason="dockerfile_refused",
            )


def build_inputs(spec: DeploymentSpec, source: FetchedSource) -> dict[str, object]:
    """Everything that determines the image; its hash names the image."""
    return {
        "repo": source.repo,
        "commit": source.commit,
        "subdir": spec.subdir,
        "mode": spec.build_mode,
        "dockerfile": spec.dockerfile if spec.build_mode == "dockerfile" else None,
        "build_args": dict(sorted(spec.build_args.items())),
        "network": spec.build_network,
    }


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def image_tag(source: FetchedSource, inputs_hash: str) -> str:
    """``localhost/dockyard/<owner>-<repo>:<commit12>-<inputs8>``, a valid local reference."""
    path = source.repo.rstrip("/").removesuffix(".git")
    name = "-".join(path.split("/")[-2:]).lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", name).strip("-._") or "source"
    return f"localhost/dockyard/{name[:100]}:{source.commit[:12]}-{inputs_hash[:8]}"


@dataclass
class BuiltRevision:
    """What a deployment runs: an image, and for ``image`` mode the source mount."""

    image: str
    image_id: str | None
    inputs_hash: str
    build_args_hash: str
    reused: bool
    log: list[str] = field(default_factory=list)
    mounts: list[tuple[str, str]] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    #: Scratch tmpfs mounts the container gets (path -> MiB, before the operator's cap).
    tmpfs: dict[str, int] = field(default_factory=dict)
    workdir: str | None = None


def source_view(context: str | os.PathLike[str], views_dir: Path, mountpoints: list[str]) -> Path:
    """A read-only-by-convention copy of a cached checkout's ``context`` for a bind mount:
    ``.git`` left out, directories 0755 and files 0644 (0755 when executable), and each of
    ``mountpoints`` (relative paths) an empty directory of mode 1777: Podman copies a
    mountpoint's mode (and content) up into the tmpfs mounted over it, and the agent may run
    as any uid. The views directory is 0700.

    Views are content-addressed by the context's path (the cache never changes a
    checkout) and the mountpoints, made once in a temporary directory and renamed into
    place, so concurrent deploys of one commit share one view and never see a partial one.
    """
    src = Path(context).resolve()
    key = hashlib.sha256(json.dumps([str(src), sorted(mountpoints)]).encode()).hexdigest()[:32]
    final = views_dir / key
    if final.is_dir():
        with contextlib.suppress(OSError):
            os.utime(final)  # garbage collection ages a view from its last use
        return final
    views_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(views_dir, 0o700)  # only the engine (root, or rootless this user) goes in
    tmp = views_dir / f".tmp-{uuid.uuid4().hex}"
    try:
        shutil.copytree(
            src,
            tmp,
            symlinks=True,
            ignore=shutil.ignore_patterns(".git"),
            copy_function=shutil.copy,
        )
        for point in mountpoints:
            target = tmp / point
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # hidden by the mount anyway (never copied up)
            if not target.exists() and not target.is_symlink():
                target.mkdir(parents=True)
        for root, _dirs, files in os.walk(tmp):
            os.chmod(root, 0o755)
            for name in files:
                path = Path(root) / name
                mode = path.lstat().st_mode
                if stat.S_ISREG(mode):
                    os.chmod(path, 0o755 if mode & 0o111 else 0o644)
        for point in mountpoints:
            # Podman copies a mountpoint's mode up into the tmpfs over it: any uid may write.
            if (tmp / point).is_dir() and not (tmp / point).is_symlink():
                os.chmod(tmp / point, 0o1777)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class Builder:
    """Builds revisions with a runtime, never twice for the same inputs at once or ever."""

    runtime: Runtime
    network_allowed: bool = False
    memory_mb: int = 2048
    cpus: float = 2.0
    timeout_s: float = 900.0
    allowed_base_images: list[str] = field(default_factory=list)
    #: Where ``image`` mode's source views live (:func:`source_view`); ``Services`` sets
    #: ``<data_dir>/views``; None: ``dockyard-views`` in the temporary directory.
    views_dir: Path | None = None
    #: Labels every built image gets besides its provenance (``Services`` adds the
    #: instance label, so garbage collection only ever considers its own dockyard's builds).
    labels: dict[str, str] = field(default_factory=dict)
    #: ``base_image_aliases``: the names ``FROM`` lines use, mapped to local images. The
    #: images a Dockerfile's names map to (and their ids) are build inputs.
    base_image_aliases: dict[str, str] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def aliased_base_images(
        self, spec: DeploymentSpec, source: FetchedSource
    ) -> dict[str, dict[str, str | None]]:
        """The Dockerfile's base images that ``base_image_aliases`` maps: each name as
        written, the local image it maps to and that image's id (empty when none map;
        a Dockerfile that cannot be read here is left to the build to report)."""
        if not self.base_image_aliases:
            return {}
        path = Path(source.dockerfile or Path(source.context) / spec.dockerfile)
        try:
            text = path.read_bytes()[:_MAX_DOCKERFILE_BYTES].decode("utf-8", "replace")
            refs = external_images(text, spec.build_args)
        except (OSError, BuildFailed):
            return {}
        found: dict[str, dict[str, str | None]] = {}
        for ref in refs:
            image = resolve_alias(ref, self.base_image_aliases)
            if image is not None:
                found[ref] = {"image": image, "id": await self.runtime.image_id(image)}
        return found

    async def build(
        self,
        spec: DeploymentSpec,
        source: FetchedSource,
        on_log: Callable[[str], None] | None = None,
    ) -> BuiltRevision:
        """Produce the image for ``spec`` at ``source.commit``, reusing one built before."""
        inputs = build_inputs(spec, source)
        if spec.build_mode == "dockerfile":
            # Another alias table (or the aliased image rebuilt) is another image: never
            # reuse one built from the old base. No alias in play: the hash is unchanged.
            aliased = await self.aliased_base_images(spec, source)
            if aliased:
                inputs["base_images"] = aliased
        inputs_hash = _digest(inputs)
        args_hash = _digest(inputs["build_args"])
        if spec.build_mode == "image":
            return await self._image_mode(spec, source, inputs_hash, args_hash)
        if spec.build_network and not self.network_allowed:
            raise ValidationError(
                "build_network: the operator does not allow network access during builds"
            )
        tag = image_tag(source, inputs_hash)
        lock = self._locks.setdefault(inputs_hash, asyncio.Lock())
        async with lock:
            if await self.runtime.image_exists(tag):
                if on_log:
                    on_log(f"reusing {tag}: built before from the same inputs")
                return BuiltRevision(tag, None, inputs_hash, args_hash, reused=True)
            dockerfile = Path(source.dockerfile or Path(source.context) / spec.dockerfile)
            text = dockerfile.read_bytes()[:_MAX_DOCKERFILE_BYTES].decode("utf-8", "replace")
            check_dockerfile(text, network_allowed=spec.build_network)
            request = BuildRequest(
                context=source.context,
                tag=tag,
                dockerfile=str(dockerfile.relative_to(source.context)),
                build_args=dict(spec.build_args),
                labels={
                    **self.labels,
                    LABEL_MANAGED: "true",
                    LABEL_REPO: source.repo,
                    LABEL_COMMIT: source.commit,
                    LABEL_SUBDIR: spec.subdir,
                    LABEL_DOCKERFILE: spec.dockerfile,
                    LABEL_INPUTS: inputs_hash,
                    LABEL_ARGS_HASH: args_hash,
                },
                network=spec.build_network,
                memory_mb=self.memory_mb,
                cpus=self.cpus,
                timeout_s=self.timeout_s,
            )
            built = await self.runtime.build(request, on_log)
            return BuiltRevision(tag, built.id, inputs_hash, args_hash, False, built.log)

    async def _image_mode(
        self, spec: DeploymentSpec, source: FetchedSource, inputs_hash: str, args_hash: str
    ) -> BuiltRevision:
        assert spec.image is not None  # enforced by DeploymentSpec
        if self.allowed_base_images and spec.image not in self.allowed_base_images:
            allowed = ", ".join(self.allowed_base_images)
            raise ValidationError(f"image: {spec.image!r} is not an allowed base image ({allowed})")
        if not await self.runtime.image_exists(spec.image):
            raise ValidationError(
                f"image: {spec.image!r} does not exist on this host (images are never pulled)"
            )
        logs = f"{SOURCE_MOUNT}/{LOGS_DIR}"
        tmpfs = {logs: spec.logs_tmpfs_mb} if spec.logs_tmpfs_mb else {}
        views_dir = self.views_dir or Path(tempfile.gettempdir()) / "dockyard-views"
        mountpoints = [LOGS_DIR] if tmpfs else []
        view = await asyncio.to_thread(source_view, source.context, views_dir, mountpoints)
        return BuiltRevision(
            image=spec.image,
            image_id=None,
            inputs_hash=inputs_hash,
            build_args_hash=args_hash,
            reused=True,
            mounts=[(str(view), SOURCE_MOUNT)],
            command=list(spec.command),
            tmpfs=tmpfs,
            workdir=spec.workdir or SOURCE_MOUNT,
        )
