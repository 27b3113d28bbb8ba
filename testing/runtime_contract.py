"""The container-runtime contract: every runtime plugin passes this one suite.

A test module runs it with ``from dockyard.testing.runtime_contract import *`` and
``pytest --dockyard-runtime=NAME`` (see :mod:`dockyard.testing.plugin`); dockyard's own
tests run it against real engines (``tests/contract/conftest.py``). Never mocks: build a
tiny busybox image, run it hardened, probe it over HTTP on 127.0.0.1, read logs, stop,
remove, list by label; builds that fail or hang; and the hardening read back from the
engine (``runtime.inspect()``) *and* from inside the container (a CGI reporting its own
capabilities, no_new_privs flag, ulimits and writable paths).

Conventions the suite pins beyond the ABC's signatures:

- containers carry ``io.dockyard.managed=true`` on top of the spec's labels;
- ``host_port=None`` lets the engine choose a port, reported by ``run()``/``inspect()``;
- stop/remove/remove_image of something missing are no-ops, ``inspect`` returns None, and
  ``logs`` of a missing container raises NotFound;
- a name in use is a Conflict; a failing build is BuildFailed with ``detail['log_tail']``;
  a build past its timeout is BuildTimeout and leaves no build container or process;
- builds have no network unless asked (only ``lo`` inside ``RUN``);
- resource limits are read back when ``info().limits_enforced``; when not, the runtime says
  why (``limits_note``) and ``inspect()`` reports no memory/CPU/pids limit at all.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.core.errors import BuildFailed, BuildTimeout, Conflict, NotFound
from dockyard.core.runtime import (
    LABEL_MANAGED,
    BuildRequest,
    ContainerInfo,
    ContainerSpec,
    Limits,
    Runtime,
)
from dockyard.testing.harness import TEST_LABEL, EngineProbe, TestImage, make_context
from dockyard.testing.plugin import ENGINE_MARKER

MakeSpec = Callable[..., ContainerSpec]
#: Tests that need containers that really run (see :mod:`dockyard.testing`).
engine_only = getattr(pytest.mark, ENGINE_MARKER)


# ----------------------------------------------------------------- the suite's fixtures
@pytest.fixture
def runtime(dockyard_runtime: Runtime) -> Runtime:
    """The open runtime under contract."""
    return dockyard_runtime


@pytest.fixture
def engine_probe(dockyard_engine_probe: EngineProbe | None) -> EngineProbe | None:
    """The engine seen without the runtime under test, when the run has a probe."""
    return dockyard_engine_probe


@pytest.fixture
def token(dockyard_token: str) -> str:
    return dockyard_token


@pytest.fixture
def test_image(dockyard_test_image: TestImage) -> TestImage:
    return dockyard_test_image


@pytest.fixture
def make_spec(dockyard_make_spec: MakeSpec) -> MakeSpec:
    return dockyard_make_spec


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-readable directory the engine's user (rootless too) can bind-mount; pytest's
    own tmp dirs are private to root."""
    with tempfile.TemporaryDirectory(prefix="dyc-mount-") as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


async def http_get(port: int, path: str, *, deadline_s: float = 10.0) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path, retrying (bounded) while the server starts."""

    def once() -> tuple[int, str]:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    end = time.monotonic() + deadline_s
    while True:
        try:
            return await asyncio.to_thread(once)
        except (ConnectionError, urllib.error.URLError, TimeoutError):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


async def probe(port: int) -> dict[str, str]:
    """What the container says about itself (the probe CGI), as a dict."""
    status, body = await http_get(port, "/cgi-bin/probe")
    assert status == 200, body
    return dict(line.split("=", 1) for line in body.splitlines() if "=" in line)


def processes_with(text: str) -> list[int]:
    """PIDs on this host whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


async def started(runtime: Runtime, spec: ContainerSpec) -> ContainerInfo:
    info = await runtime.run(spec)
    assert info.running, info
    assert info.host_port is not None
    status, body = await http_get(info.host_port, "/health")
    assert status == 200 and "ok" in body
    return info


# ------------------------------------------------------------------------------- info
@engine_only
async def test_info_describes_engine_and_limits(
    runtime: Runtime, engine_probe: EngineProbe | None
) -> None:
    info = await runtime.info()
    assert info.name == runtime.name
    assert info.version
    assert info.cgroup_version in ("v1", "v2")
    if engine_probe is not None:
        assert info.rootless is engine_probe.rootless
    if not info.limits_enforced:
        assert info.limits_note, "limits that do not hold must come with a reason"
    if info.rootless and info.cgroup_version == "v1":
        assert info.limits_enforced is False
        assert "cgroup v1" in info.limits_note


# ------------------------------------------------------------------------------ build
@engine_only
async def test_build_produces_image_with_build_args(
    runtime: Runtime, test_image: TestImage
) -> None:
    built = test_image.built
    assert built.tag == test_image.tag
    assert built.id
    assert await runtime.image_exists(test_image.tag)
    assert await runtime.image_exists(built.id)
    assert f"greeting={test_image.greeting}" in built.log  # the build arg reached RUN
    assert len(built.log) <= 2000


@engine_only
async def test_build_has_no_network_by_default(test_image: TestImage) -> None:
    interfaces = [
        line.split("=", 1)[1] for line in test_image.built.log if line.startswith("build-iface=")
    ]
    assert interfaces == ["lo"], f"RUN saw network interfaces {interfaces}"


@engine_only
async def test_build_streams_log_lines(
    runtime: Runtime, test_image: TestImage, tmp_path: Path
) -> None:
    tag = f"localhost/dyc-stream-{uuid.uuid4().hex[:8]}:1"
    context = make_context(tmp_path / "ctx", f"FROM {test_image.tag}\nRUN echo streamed-line\n")
    seen: list[str] = []
    try:
        built = await runtime.build(BuildRequest(context=str(context), tag=tag), on_log=seen.append)
        assert "streamed-line" in seen
        assert seen[-len(built.log) :] == built.log
        assert await runtime.image_exists(tag)
    finally:
        await runtime.remove_image(tag, force=True)
    assert not await runtime.image_exists(tag)


@engine_only
async def test_failed_build_raises_and_leaves_nothing(
    runtime: Runtime, engine_probe: EngineProbe | None, test_image: TestImage, tmp_path: Path
) -> None:
    tag = f"localhost/dyc-fail-{uuid.uuid4().hex[:8]}:1"
    dockerfile = f"FROM {test_image.tag}\nRUN echo about-to-fail && exit 3\n"
    context = make_context(tmp_path / "ctx", dockerfile)
    with pytest.raises(BuildFailed) as caught:
        await runtime.build(BuildRequest(context=str(context), tag=tag))
    assert not isinstance(caught.value, BuildTimeout)
    assert "about-to-fail" in caught.value.detail["log_tail"]
    assert not await runtime.image_exists(tag)
    assert engine_probe is None or engine_probe.build_containers(test_image.name) == []


@engine_only
async def test_dockerfile_outside_context_is_refused(
    runtime: Runtime, test_image: TestImage, tmp_path: Path
) -> None:
    context = make_context(tmp_path / "ctx", f"FROM {test_image.tag}\n")
    (tmp_path / "Outside").write_text(f"FROM {test_image.tag}\n")
    with pytest.raises(BuildFailed):
        await runtime.build(
            BuildRequest(context=str(context), tag="localhost/dyc-x:1", dockerfile="../Outside")
        )


@engine_only
async def test_build_memory_cap(runtime: Runtime, test_image: TestImage, tmp_path: Path) -> None:
    """A RUN step needing 64 MiB fails under a 16 MiB cap where limits hold; where they do
    not, the runtime says so instead."""
    tag = f"localhost/dyc-mem-{uuid.uuid4().hex[:8]}:1"
    dockerfile = f"FROM {test_image.tag}\nRUN dd if=/dev/zero of=/dev/null bs=64M count=1\n"
    context = make_context(tmp_path / "ctx", dockerfile)
    request = BuildRequest(context=str(context), tag=tag, memory_mb=16)
    info = await runtime.info()
    try:
        if info.limits_enforced:
            with pytest.raises(BuildFailed):
                await runtime.build(request)
        else:
            await runtime.build(request)
            assert info.limits_note
    finally:
        await runtime.remove_image(tag, force=True)


@engine_only
@pytest.mark.slow
async def test_build_timeout_stops_the_build(
    runtime: Runtime, engine_probe: EngineProbe | None, test_image: TestImage, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    tag = f"localhost/dyc-hang-{marker[:8]}:1"
    dockerfile = f'FROM {test_image.tag}\nRUN echo hanging && sh -c "sleep 3600; : {marker}"\n'
    context = make_context(tmp_path / "ctx", dockerfile)
    begin = time.monotonic()
    with pytest.raises(BuildTimeout) as caught:
        await runtime.build(BuildRequest(context=str(context), tag=tag, timeout_s=3))
    elapsed = time.monotonic() - begin
    assert elapsed < 20, f"a 3 s build timeout took {elapsed:.1f}s"
    assert caught.value.detail["stopped"] is True
    assert "hanging" in caught.value.detail["log_tail"]
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert processes_with(marker) == [], "the build's RUN process is still running"
    assert engine_probe is None or engine_probe.build_containers(test_image.name) == []
    assert not await runtime.image_exists(tag)


# -------------------------------------------------------------------------------- run
@engine_only
async def test_run_probe_logs_stop_remove(
    runtime: Runtime, make_spec: MakeSpec, test_image: TestImage
) -> None:
    spec = make_spec(
        "life",
        command=["sh", "-c", "echo container-started; exec httpd -f -v -p 8080 -h /www"],
    )
    info = await started(runtime, spec)
    assert info.name == spec.name
    assert info.labels[LABEL_MANAGED] == "true"
    assert info.labels[TEST_LABEL] == spec.labels[TEST_LABEL]
    assert info.status == "running" and info.exit_code is None
    assert info.host_port is not None
    status, body = await http_get(info.host_port, "/greeting.txt")
    assert (status, body.strip()) == (200, test_image.greeting)

    logs = await runtime.logs(spec.name, tail=None)
    assert "container-started" in logs
    assert len(await runtime.logs(spec.name, tail=1)) == 1

    begin = time.monotonic()
    await runtime.stop(spec.name, timeout_s=10)
    assert time.monotonic() - begin < 5, "SIGTERM must reach the app through the init"
    stopped = await runtime.inspect(spec.name)
    assert stopped is not None
    assert not stopped.running and stopped.status == "exited"
    assert stopped.exit_code is not None
    await runtime.stop(spec.name)  # stopping a stopped container is fine

    await runtime.remove(spec.name)
    assert await runtime.inspect(spec.name) is None


async def test_run_inspect_stop_remove(runtime: Runtime, make_spec: MakeSpec) -> None:
    """The lifecycle by name and by id, without looking inside the container."""
    spec = make_spec("cycle")
    info = await runtime.run(spec)
    assert info.running and info.name == spec.name
    assert info.labels[LABEL_MANAGED] == "true"
    seen = await runtime.inspect(spec.name)
    assert seen is not None and seen.id == info.id and seen.running
    await runtime.stop(spec.name, timeout_s=10)
    stopped = await runtime.inspect(info.id)
    assert stopped is not None and not stopped.running and stopped.status == "exited"
    await runtime.stop(spec.name)  # stopping a stopped container is fine
    await runtime.remove(info.id)
    assert await runtime.inspect(spec.name) is None
    assert await runtime.list({TEST_LABEL: spec.labels[TEST_LABEL]}) == []


async def test_missing_things_are_not_errors(runtime: Runtime) -> None:
    missing = f"dyc-missing-{uuid.uuid4().hex[:8]}"
    await runtime.stop(missing)
    await runtime.remove(missing)
    await runtime.remove_image(f"localhost/{missing}:1")
    assert await runtime.inspect(missing) is None
    assert not await runtime.image_exists(f"localhost/{missing}:1")
    with pytest.raises(NotFound):
        await runtime.logs(missing)


async def test_name_in_use_is_a_conflict(runtime: Runtime, make_spec: MakeSpec) -> None:
    spec = make_spec("twice")
    await runtime.run(spec)
    with pytest.raises(Conflict):
        await runtime.run(spec)


async def test_list_filters_by_labels_and_includes_stopped(
    runtime: Runtime, make_spec: MakeSpec, token: str
) -> None:
    group = uuid.uuid4().hex[:8]
    a = await runtime.run(make_spec("a", labels={"io.dockyard.group": group, "x": "1"}))
    b = await runtime.run(make_spec("b", labels={"io.dockyard.group": group, "x": "2"}))
    await runtime.stop(b.id, timeout_s=5)

    both = await runtime.list({"io.dockyard.group": group})
    assert sorted(c.name for c in both) == sorted([a.name, b.name])
    assert {c.name: c.running for c in both} == {a.name: True, b.name: False}
    only_b = await runtime.list({"io.dockyard.group": group, "x": "2"})
    assert [c.name for c in only_b] == [b.name]
    assert await runtime.list({"io.dockyard.group": f"{group}-none"}) == []
    managed = await runtime.list({LABEL_MANAGED: "true", TEST_LABEL: token})
    assert len(managed) == 2


@engine_only
async def test_list_images_by_labels(runtime: Runtime, test_image: TestImage, token: str) -> None:
    """Garbage collection's view of images: the session's image is listed by its labels
    (the managed one the runtime adds too) with its tag, size and creation time; a label it
    lacks filters it out."""
    found = await runtime.list_images({TEST_LABEL: "image", LABEL_MANAGED: "true"})
    ours = [i for i in found if test_image.tag in i.tags]
    assert len(ours) == 1, found
    image = ours[0]
    assert image.size > 0 and image.labels[TEST_LABEL] == "image"
    assert test_image.built.id.removeprefix("sha256:").startswith(image.id[:12])
    assert 0 < time.time() - image.created < 86400
    assert await runtime.list_images({TEST_LABEL: f"none-{token}"}) == []


@engine_only
async def test_fixed_host_port_on_loopback(runtime: Runtime, make_spec: MakeSpec) -> None:
    port = free_port()
    info = await started(runtime, make_spec("port", host_port=port))
    assert info.host_port == port
    assert info.hardening.published == [("127.0.0.1", port, 8080)]


@engine_only
async def test_env_user_command_and_read_only_mounts(
    runtime: Runtime, make_spec: MakeSpec, shared_dir: Path
) -> None:
    data = shared_dir
    (data / "mounted.txt").write_text("from-the-host\n")
    (data / "mounted.txt").chmod(0o644)
    spec = make_spec(
        "env",
        env={"DOCKYARD_TEST_VALUE": "value-42"},
        user="65534:65534",
        mounts=[(str(data), "/data")],
        command=["httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    info = await started(runtime, spec)
    assert info.host_port is not None
    seen = await probe(info.host_port)
    assert seen["uid"] == "65534"
    assert seen["env_value"] == "value-42"
    assert seen["mounted"] == "from-the-host"
    assert seen["mount_writable"] == "no"
    assert not (data / "write-test").exists()


@engine_only
async def test_workdir_and_scratch_tmpfs(runtime: Runtime, make_spec: MakeSpec) -> None:
    """``workdir`` is the process's working directory; ``tmpfs`` adds a writable, size-capped
    scratch mount (rw, nosuid, nodev, noexec) on the read-only root, as the validator's
    ``/app/logs``."""
    script = (
        "pwd; echo scratch > /scratch/logs/x && cat /scratch/logs/x; "
        "grep ' /scratch/logs ' /proc/mounts; "
        "exec httpd -f -p 8080 -h /www"
    )
    spec = make_spec(
        "scratch",
        workdir="/www",
        tmpfs={"/scratch/logs": 8},
        command=["sh", "-c", script],
    )
    info = await started(runtime, spec)
    assert "/scratch/logs" in info.hardening.tmpfs
    lines: list[str] = []
    for _ in range(50):
        lines = await runtime.logs(info.id)
        if any("/scratch/logs" in line for line in lines):
            break
        await asyncio.sleep(0.1)
    assert lines[:2] == ["/www", "scratch"], lines
    mount = next(line for line in lines if " /scratch/logs " in line)
    options = mount.split()[3].split(",")
    for option in ("rw", "nosuid", "nodev", "noexec"):
        assert option in options, mount
    size = next(o for o in options if o.startswith("size="))
    assert size in ("size=8192k", "size=8m"), mount


# ------------------------------------------------------------------------- hardening
@engine_only
async def test_hardening_read_back(runtime: Runtime, make_spec: MakeSpec) -> None:
    limits = Limits(memory_mb=96, cpus=0.5, pids=64, nofile=512, nproc=256, tmpfs_mb=16)
    spec = make_spec("hard", limits=limits)
    info = await started(runtime, spec)
    engine_info = await runtime.info()

    inspected = await runtime.inspect(spec.name)
    assert inspected is not None
    h = inspected.hardening
    assert h.cap_drop_all and h.cap_add == []
    assert h.no_new_privileges
    assert h.read_only
    assert h.ulimits["nofile"] == (512, 512)
    assert h.ulimits["nproc"] == (256, 256)
    assert "size=16m" in h.tmpfs["/tmp"]
    assert set(h.tmpfs) == {"/tmp"}, "no other (unsized) writable tmpfs"
    assert h.published and all(ip == "127.0.0.1" for ip, _, _ in h.published)
    assert h.log_max_size
    if engine_info.limits_enforced:
        assert h.pids_limit == 64
        assert h.memory_bytes == 96 * 1024 * 1024
        assert h.memory_swap_bytes == h.memory_bytes  # no swap on top
        assert h.nano_cpus == 500_000_000
    else:
        assert engine_info.limits_note
        assert (h.pids_limit, h.memory_bytes, h.memory_swap_bytes, h.nano_cpus) == (
            None,
            None,
            None,
            None,
        ), "limits that do not hold must not be reported"

    # ... and from inside: what the process itself has.
    assert info.host_port is not None
    seen = await probe(info.host_port)
    assert int(seen["CapEff"], 16) == 0
    assert int(seen["CapBnd"], 16) == 0
    assert seen["NoNewPrivs"] == "1"
    assert seen["nofile"] == "512"
    assert seen["nproc"] == "256"
    assert seen["root_writable"] == "no"
    assert seen["tmp_writable"] == "yes"
    assert "size=16384k" in seen["tmp_mount"]


@engine_only
async def test_default_limits_pass_through(runtime: Runtime, make_spec: MakeSpec) -> None:
    """The spec's default limits are what the engine gets (when it can enforce them)."""
    spec = make_spec("defaults", limits=Limits())
    await started(runtime, spec)
    inspected = await runtime.inspect(spec.name)
    assert inspected is not None
    defaults = Limits()
    assert inspected.hardening.ulimits["nofile"] == (defaults.nofile, defaults.nofile)
    if (await runtime.info()).limits_enforced:
        expected: Any = defaults.memory_mb * 1024 * 1024
        assert inspected.hardening.memory_bytes == expected
        assert inspected.hardening.pids_limit == defaults.pids
