"""A test run that gets SIGTERM tears its fixtures down (``tests/sigterm.py``), so what a
fixture started (here a real ``sleep`` child standing for a proxy or a Podman service) does
not outlive the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

SAMPLE = """
import subprocess, time
from pathlib import Path
import pytest

@pytest.fixture
def child(tmp_path_factory):
    proc = subprocess.Popen(["sleep", "300"])
    Path({pidfile!r}).write_text(str(proc.pid))
    yield proc
    proc.terminate()
    proc.wait()
    Path({marker!r}).write_text("torn down")

def test_waits(child):
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_a_sigterm_tears_the_running_test_s_fixtures_down(tmp_path: Path) -> None:
    pidfile, marker = tmp_path / "child.pid", tmp_path / "torn-down"
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE.format(pidfile=str(pidfile), marker=str(marker)))
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.sigterm",
            "-p",
            "no:cacheprovider",
            str(sample),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "the sample test never started"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert marker.read_text() == "torn down", out
    assert not _alive(child), out
    assert run.returncode != 0 and "SIGTERM" in out, out
