"""Real engines for the runtime contract suite (``test_runtime_contract.py``).

Every test that asks for ``engine`` (or ``runtime``, ``test_image``) runs once per entry of
:data:`RUNTIMES`. Each engine is private to the test session and stopped at its end:

- ``podman-rootful``: a ``podman system service`` started here, as root, on a socket in a
  temp dir;
- ``podman-rootless``: the same, started as the unprivileged user ``dockyard-test`` (created
  by ``contrib/ci/setup-podman.sh``) through ``runuser``; the root test process connects to
  its socket.

An engine that cannot run here is skipped with the checked reason, except on CI
(``CI=true``), where it fails: CI must run every engine. To add a runtime (e.g. Docker),
append its name to :data:`RUNTIMES` and teach :func:`_start_engine` to start it.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import pytest_asyncio

from dockyard.backends.podman import PodmanRuntime, PodmanService
from dockyard.core.runtime import BuildRequest, BuiltImage, ContainerSpec, Limits, Runtime

ON_CI = os.environ.get("CI", "").lower() == "true"
TEST_USER = os.environ.get("DOCKYARD_TEST_USER", "dockyard-test")
#: Label on every container a test creates; the ``runtime`` fixture removes them afterwards.
TEST_LABEL = "io.dockyard.test"

RUNTIMES = [
    pytest.param("podman-rootful", marks=[pytest.mark.podman]),
    pytest.param("podman-rootless", marks=[pytest.mark.podman, pytest.mark.rootless]),
]

PROBE_CGI = r"""#!/bin/sh
writable() { if touch "$1" 2>/dev/null; then echo yes; else echo no; fi; }
echo "Content-Type: text/plain"
echo ""
echo "uid=$(id -u)"
grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | tr -d ' \t' | tr ':' '='
echo "nofile=$(ulimit -n)"
echo "nproc=$(ulimit -u)"
echo "root_writable=$(writable /rootfs-write-test)"
echo "tmp_writable=$(writable /tmp/write-test)"
echo "tmp_mount=$(grep ' /tmp ' /proc/mounts | cut -d' ' -f4)"
echo "env_value=${DOCKYARD_TEST_VALUE:-}"
echo "mounted=$(cat /data/mounted.txt 2>/dev/null)"
echo "mount_writable=$(writable /data/write-test)"
"""

DOCKERFILE = """\
FROM scratch
ARG GREETING=unset
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
RUN echo "greeting=$GREETING" && echo "$GREETING" > /www/greeting.txt \\
    && sed -n 's/^ *\\([^:]*\\):.*/build-iface=\\1/p' /proc/net/dev
CMD ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
"""


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``; on CI, fail instead (every engine must run there)."""
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: engines are never skipped on CI)", pytrace=False)
    pytest.skip(reason)


def busybox_path() -> Path:
    """The static busybox the test images are made of (Debian's busybox-static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            return path
    unavailable("busybox is not installed: apt-get install busybox-static")


def make_context(directory: Path, dockerfile: str = DOCKERFILE) -> Path:
    """A build context: busybox, a static ``/health``, a probe CGI, and ``dockerfile``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox_path(), directory / "busybox")
    www = directory / "www"
    (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
    (www / "health").write_text('{"status": "ok"}\n')
    probe = www / "cgi-bin" / "probe"
    probe.write_text(PROBE_CGI)
    probe.chmod(0o755)
    (directory / "Dockerfile").write_text(dockerfile)
    return directory


@dataclass
class Engine:
    """One running engine and how to reach it, plus engine-specific probes for the suite."""

    kind: str
    url: str
    user: str | None = None
    service: PodmanService | None = None
    runtime_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def make_runtime(self) -> Runtime:
        """A new, unopened runtime connected to this engine."""
        return PodmanRuntime(socket=self.url, **self.runtime_kwargs)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the engine's own CLI locally (not through the API), as the engine's user."""
        podman = shutil.which("podman") or "podman"
        if self.user is None:
            cmd = [podman, *args]
            cwd = None
        else:
            entry = pwd.getpwnam(self.user)
            runtime_dir = (self.service.runtime_dir if self.service else None) or (
                f"/run/user/{entry.pw_uid}"
            )
            cmd = [
                "runuser", "-u", self.user, "--", "env", "-i",
                f"HOME={entry.pw_dir}", f"XDG_RUNTIME_DIR={runtime_dir}",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                podman, *args,
            ]  # fmt: skip
            cwd = entry.pw_dir
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=cwd, timeout=60)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args).stdout or "null")

    def build_containers(self, name_part: str) -> list[str]:
        """Names of build (external/storage) containers whose name contains ``name_part``."""
        rows = self.cli_json("ps", "--all", "--external", "--format", "json") or []
        names = [str(n) for row in rows for n in (row.get("Names") or [])]
        return [n for n in names if name_part in n]


def _check_root(kind: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{kind}: the test engines are started by root (rootful, and runuser)")


def _start_engine(kind: str) -> Engine:
    if shutil.which("podman") is None:
        unavailable("podman is not installed: run contrib/ci/setup-podman.sh as root")
    _check_root(kind)
    if kind == "podman-rootful":
        service = PodmanService()
        url = service.start()
        return Engine(kind=kind, url=url, service=service)
    if kind == "podman-rootless":
        if shutil.which("runuser") is None:
            unavailable("runuser (util-linux) is missing: cannot run podman as another user")
        try:
            pwd.getpwnam(TEST_USER)
        except KeyError:
            unavailable(
                f"user {TEST_USER!r} does not exist: run contrib/ci/setup-podman.sh as root"
            )
        for path in ("/etc/subuid", "/etc/subgid"):
            try:
                entries = Path(path).read_text().splitlines()
            except OSError:
                entries = []
            if not any(line.split(":", 1)[0] == TEST_USER for line in entries):
                unavailable(f"{TEST_USER!r} has no range in {path}: run setup-podman.sh")
        tun = Path("/dev/net/tun")
        if tun.exists() and (tun.stat().st_mode & 0o666) != 0o666:
            mode = stat.filemode(tun.stat().st_mode)
            unavailable(f"/dev/net/tun is {mode}: slirp4netns needs chmod 666 (setup-podman.sh)")
        service = PodmanService(user=TEST_USER)
        url = service.start()
        return Engine(kind=kind, url=url, user=TEST_USER, service=service)
    raise AssertionError(f"unknown runtime {kind!r}")


@pytest.fixture(scope="session", params=RUNTIMES)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A private engine for the session, one per entry of :data:`RUNTIMES`."""
    started = _start_engine(str(request.param))
    try:
        yield started
    finally:
        if started.service is not None:
            started.service.stop()


@pytest.fixture
def token() -> str:
    """A short unique id for names and labels of one test."""
    return uuid.uuid4().hex[:10]


@pytest_asyncio.fixture
async def runtime(engine: Engine, token: str) -> AsyncIterator[Runtime]:
    """An open runtime on ``engine``; containers labelled with ``token`` are removed after."""
    rt = engine.make_runtime()
    await rt.open()
    try:
        yield rt
    finally:
        try:
            for info in await rt.list({TEST_LABEL: token}):
                await rt.remove(info.id)
        finally:
            await rt.close()


@pytest.fixture
def make_spec(token: str, test_image: TestImage) -> Callable[..., ContainerSpec]:
    """``make_spec(suffix, **fields)``: a ContainerSpec of the test image, uniquely named and
    labelled for cleanup; small limits so they are visible."""
    counter = 0

    def make(suffix: str = "", **fields: Any) -> ContainerSpec:
        nonlocal counter
        counter += 1
        labels = {TEST_LABEL: token, **fields.pop("labels", {})}
        values: dict[str, Any] = {
            "name": f"dyc-{token}-{suffix or counter}",
            "image": test_image.tag,
            "container_port": 8080,
            "labels": labels,
            "limits": Limits(memory_mb=96, cpus=0.5, pids=64, tmpfs_mb=16),
        }
        values.update(fields)
        return ContainerSpec(**values)

    return make


@dataclass
class TestImage:
    """The session's busybox image: tag, what the build returned, the build arg it got."""

    tag: str
    built: BuiltImage
    greeting: str
    context: Path
    name: str  # repository name without registry, as in build-container names

    __test__ = False  # not a test class


@pytest.fixture(scope="session")
def test_image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestImage]:
    """One image per engine and session, built through the runtime under test."""
    suffix = uuid.uuid4().hex[:10]
    name = f"dockyard-contract-{suffix}"
    tag = f"localhost/{name}:v1"
    greeting = f"hello-{suffix}"
    context = make_context(tmp_path_factory.mktemp("image"))

    async def build() -> BuiltImage:
        rt = engine.make_runtime()
        await rt.open()
        try:
            return await rt.build(
                BuildRequest(
                    context=str(context),
                    tag=tag,
                    build_args={"GREETING": greeting},
                    labels={TEST_LABEL: "image"},
                    timeout_s=120,
                )
            )
        finally:
            await rt.close()

    async def remove() -> None:
        rt = engine.make_runtime()
        await rt.open()
        try:
            await rt.remove_image(tag, force=True)
        finally:
            await rt.close()

    built = asyncio.run(build())
    try:
        yield TestImage(tag=tag, built=built, greeting=greeting, context=context, name=name)
    finally:
        asyncio.run(remove())
