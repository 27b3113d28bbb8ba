"""Children of dockyard (``core/children.py``), on real processes: a pid file reaps the
process it names and nothing else, and a child started through ``children.popen`` dies
with its parent even when the parent is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dockyard.backends.podman import PodmanService
from dockyard.core.children import PidFile, pdeathsig_supported, start_time


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if start_time(pid) is None:
            return True
        time.sleep(0.02)
    return False


def _sleeper() -> subprocess.Popen[bytes]:
    """A process that would outlive the test: ``sleep`` leading its own process group."""
    return subprocess.Popen(["sleep", "300"], process_group=0)


def test_a_pid_file_reaps_the_process_it_names(tmp_path: Path) -> None:
    leftover = _sleeper()
    try:
        pid_file = PidFile(tmp_path / "proxy.pid", "a proxy")
        pid_file.record(leftover.pid, "/usr/bin/sleep")
        assert json.loads(pid_file.path.read_text())["start_time"] == start_time(leftover.pid)
        record = pid_file.reap()
        assert record is not None and record["pid"] == leftover.pid
        assert leftover.wait(5) == -signal.SIGKILL
        assert not pid_file.path.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_a_recycled_pid_is_never_killed(tmp_path: Path) -> None:
    """The pid is alive but its start time is not the recorded one: another program got
    the pid; it is left alone and the stale file removed."""
    stranger = _sleeper()
    try:
        path = tmp_path / "proxy.pid"
        started = start_time(stranger.pid)
        assert started is not None
        path.write_text(json.dumps({"pid": stranger.pid, "start_time": started - 1, "exe": "x"}))
        assert PidFile(path, "a proxy").reap() is None
        time.sleep(0.2)
        assert stranger.poll() is None
        assert not path.exists()
        # An old pid file (a bare pid) only counts when the executable matches.
        path.write_text(f"{stranger.pid}\n")
        assert PidFile(path, "a proxy").reap("/usr/bin/caddy") is None
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_podman_service_reap_stops_a_leftover_and_removes_its_dir(tmp_path: Path) -> None:
    leftover = _sleeper()
    socket_dir = Path(tempfile.mkdtemp(prefix="dockyard-podman-"))
    try:
        pid_path = tmp_path / "podman-service.pid"
        PidFile(pid_path, "svc").record(leftover.pid, "/usr/bin/podman", dir=str(socket_dir))
        assert PodmanService.reap(pid_path) is True
        assert leftover.wait(5) == -signal.SIGKILL
        assert not socket_dir.exists() and not pid_path.exists()
        assert PodmanService.reap(pid_path) is False  # nothing recorded any more
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


PARENT = """
import sys, time
from dockyard.core import children
child = children.popen(args=["sleep", "300"], process_group=0)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_child_dies_with_its_parent_even_on_sigkill() -> None:
    if not pdeathsig_supported():
        assert sys.platform != "linux", "Linux offers PR_SET_PDEATHSIG"
        pytest.skip("this OS has no parent-death signal")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, env={**os.environ}
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert start_time(child) is not None
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert _gone(child), f"child {child} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
