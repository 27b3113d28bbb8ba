"""The warm fetch children of the git source (``WarmWorkers``): a fetch takes a child that
started ahead of time, each child serves one fetch and is gone afterwards, a dead spare is
replaced, and the caps, the timeout and the kill on overrun hold exactly as before.

Real ``git daemon`` and stalling servers on 127.0.0.1 (``tests/gitserver.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.core.errors import SourceError
from dockyard.core.source import SourceLimits, SourceRequest
from dockyard.plugins import git_source
from dockyard.plugins.git_source import GitSource, WarmWorkers
from tests.gitserver import GitDaemon, RepoBuilder, StallServer


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitDaemon]:
    builder = RepoBuilder(tmp_path_factory.mktemp("srv"))
    app = builder.new("app")
    app.write("Dockerfile", "FROM scratch\n").write("README", "hello\n").commit("first")
    big = builder.new("big")
    big.write("blob", os.urandom(1024 * 1024)).commit()
    many = builder.new("many")
    for i in range(30):
        many.write(f"f/{i}.txt", f"{i}\n")
    many.commit()
    with GitDaemon(builder.root) as served:
        yield served


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[WarmWorkers]:
    """A private pool for each test, closed afterwards."""
    pool = WarmWorkers()
    monkeypatch.setattr(git_source, "WORKERS", pool)
    yield pool
    pool.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (collected later by whoever waits for it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def ready_spare(pool: WarmWorkers, timeout_s: float = 60) -> int:
    """Wait until a spare has said it is ready; its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with pool._changed:
            if pool._ready:
                return pool._ready[0].pid
        await asyncio.sleep(0.05)
    raise AssertionError("no spare became ready")


def source(cache: Path, **limits: float) -> GitSource:
    return GitSource(cache, insecure=True, limits=SourceLimits(**limits))  # type: ignore[arg-type]


async def test_a_fetch_takes_the_warm_child_which_serves_once(
    daemon: GitDaemon, workers: WarmWorkers, tmp_path: Path
) -> None:
    git = source(tmp_path / "cache")  # warms a spare
    spare = await ready_spare(workers)
    assert workers.started == 1
    got = await git.fetch(SourceRequest(repo=f"{daemon.url}/app.git"))
    assert len(got.commit) == 40 and Path(got.checkout, "README").read_text() == "hello\n"
    assert not alive(spare)  # it served this fetch and exited
    # The next fetch's child was started after this one, and is not the used one.
    assert await ready_spare(workers) != spare
    assert workers.started == 2


async def test_a_dead_spare_is_replaced(
    daemon: GitDaemon, workers: WarmWorkers, tmp_path: Path
) -> None:
    git = source(tmp_path / "cache")
    spare = await ready_spare(workers)
    os.killpg(spare, signal.SIGKILL)  # crashed (or killed) while waiting
    while alive(spare):
        await asyncio.sleep(0.01)
    got = await git.fetch(SourceRequest(repo=f"{daemon.url}/app.git"))
    assert len(got.commit) == 40
    assert workers.started >= 2


async def test_caps_still_hold_in_a_warm_child(
    daemon: GitDaemon, workers: WarmWorkers, tmp_path: Path
) -> None:
    git = source(tmp_path / "cache", max_bytes=256 * 1024)
    await ready_spare(workers)
    with pytest.raises(SourceError) as big:
        await git.fetch(SourceRequest(repo=f"{daemon.url}/big.git", dockerfile=None))
    assert big.value.reason == "repo_too_large"
    many = source(tmp_path / "cache2", max_files=10)
    await ready_spare(workers)
    with pytest.raises(SourceError) as files:
        await many.fetch(SourceRequest(repo=f"{daemon.url}/many.git", dockerfile=None))
    assert files.value.reason == "repo_too_large" and files.value.detail["max_files"] == 10


async def test_timeout_kills_the_child(workers: WarmWorkers, tmp_path: Path) -> None:
    git = source(tmp_path / "cache", timeout_s=1.0)
    spare = await ready_spare(workers)
    with StallServer() as stall:
        started = time.monotonic()
        with pytest.raises(SourceError) as info:
            await git.fetch(SourceRequest(repo=f"git://127.0.0.1:{stall.port}/r.git"))
        elapsed = time.monotonic() - started
        assert stall.connections >= 1  # the warm child connected at once, then stalled
    assert info.value.reason == "fetch_timeout"
    assert 1.0 <= elapsed < 2.0, elapsed
    assert not alive(spare), "the overrunning child was not killed"


async def test_a_cancelled_fetch_kills_the_child(workers: WarmWorkers, tmp_path: Path) -> None:
    git = source(tmp_path / "cache", timeout_s=30.0)
    spare = await ready_spare(workers)
    with StallServer() as stall:
        task = asyncio.create_task(
            git.fetch(SourceRequest(repo=f"git://127.0.0.1:{stall.port}/r.git"))
        )
        while stall.connections < 1:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not alive(spare)


def test_a_spare_that_never_gets_ready_does_not_hold_a_fetch(workers: WarmWorkers) -> None:
    """A spare stuck starting (it never says ready) delays a fetch by the bounded wait
    only; the fetch then gets a child of its own."""
    with workers._changed:
        workers._starting += 1  # as if a refill thread hung on a spare's start
    started = time.monotonic()
    process = workers.take(wait_s=0.3)
    try:
        assert 0.3 <= time.monotonic() - started < 5
        assert process.poll() is None
    finally:
        git_source._reap(process)
        with workers._changed:
            workers._starting -= 1
