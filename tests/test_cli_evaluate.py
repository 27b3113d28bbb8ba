"""``dockyard evaluate``: the real command (a subprocess) against a live dockyard on the fast
fakes: live progress, a results table, the sandbox image by default, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.core.config import Settings
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from tests.conftest import ROOT, TEST_TOKEN
from tests.fakes import FakeSource
from tests.test_evaluation import REPO, TEST_SETTINGS, AgentRuntime, commit_of
from tests.test_evaluation_client import live_dockyard

SANDBOX = "localhost/dockyard-test/agent-sandbox:cli"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, AgentRuntime]]:
    values = {**TEST_SETTINGS, "port_range_start": 48500, "port_range_end": 48520}
    cfg = Settings(data_dir=str(tmp_path / "data"), eval_sandbox_image=SANDBOX, **values)
    runtime = AgentRuntime()
    runtime.images[SANDBOX] = {}
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=runtime,
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    with live_dockyard(cfg, services) as (url, _):
        yield url, runtime


def evaluate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockyard.api.cli", "evaluate", "--url", url, *args],
        env={**os.environ, "DOCKYARD_TOKEN": TEST_TOKEN},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_waits_with_progress_and_prints_the_results(
    served: tuple[str, AgentRuntime], tmp_path: Path
) -> None:
    url, runtime = served
    tasks = tmp_path / "tasks.json"
    tasks.write_text(
        json.dumps(
            [
                {"id": "t-one", "prompt": "open one", "url": "http://site.test/1"},
                {"id": "t-two", "prompt": "open two", "url": "http://site.test/2"},
            ]
        )
    )
    done = evaluate(
        url, REPO, "--ref", "v1", "--tasks", str(tasks), "--protocol", "solve_task",
        "--uid", "7", "--wait", "--poll", "0.1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    clock = re.compile(r"^  \d\d:\d\d:\d\d (.+)$")  # progress: HH:MM:SS <what>
    lines = [m.group(1) for m in map(clock.match, out.splitlines()) if m]
    assert lines[0] == "deploying" and lines[-1] == "finished", out
    assert {"task t-one ok in 0.0 s [1/2]", "task t-two ok in 0.0 s [2/2]"} <= set(lines), out
    commit = commit_of(REPO, "v1")[:12]
    summary = [line for line in out.splitlines() if line.startswith("ev-")][-1]
    assert " finished ok " in summary and f"commit={commit}" in summary, out
    assert f"image={SANDBOX}" in summary, out  # image mode, the server's sandbox image
    rows = [line.split() for line in out.splitlines() if line.startswith("  t-")]
    assert [row[:3] for row in rows] == [["t-one", "ok", "1"], ["t-two", "ok", "1"]], out
    assert "NavigateAction" in out
    spec = runtime.specs[-1]
    assert spec.image == SANDBOX and spec.workdir == "/app" and "/app/logs" in spec.tmpfs
    assert spec.env["SANDBOX_AGENT_UID"] == "7"


def test_evaluate_without_wait_answers_at_once(served: tuple[str, AgentRuntime]) -> None:
    url, _ = served
    done = evaluate(url, REPO, "--prompt", "p", "--task-url", "http://site.test/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ev-") and f"evaluating {REPO}" in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give tasks (--tasks FILE, or --prompt and --task-url) or --session"),
        (["--tasks", "/nonexistent.json"], 2, "--tasks: cannot read /nonexistent.json"),
        (["--prompt", "p", "--protocol", "nope"], 1, "protocol: unknown 'nope'"),
        (["--prompt", "p", "--build", "dockerfile", "--image", "x"], 0, ""),
    ],
)
def test_evaluate_errors_are_one_line(
    served: tuple[str, AgentRuntime], args: list[str], code: int, message: str
) -> None:
    url, _ = served
    done = evaluate(url, REPO, *args)
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if message:
        [line] = done.stderr.splitlines()
        assert line.startswith("dockyard: error: ") and message in line, line


def test_evaluate_opens_a_session(served: tuple[str, AgentRuntime]) -> None:
    url, _ = served
    done = evaluate(url, REPO, "--session", "--poll", "0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "POST steps to http://127.0.0.1:" in done.stdout and "/step" in done.stdout
    assert "/finish" in done.stdout


def test_ctrl_c_cancels_the_evaluation(served: tuple[str, AgentRuntime]) -> None:
    """An interrupted ``--wait`` cancels the evaluation (cleaned up) and says so."""
    import signal
    import time

    url, runtime = served
    runtime.images[SANDBOX] = {"AGENT": "slow", "DELAY": "60"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dockyard.api.cli", "evaluate", "--url", url, REPO,
         "--prompt", "p", "--protocol", "solve_task", "--wait", "--poll", "0.1"],
        env={**os.environ, "DOCKYARD_TOKEN": TEST_TOKEN},
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not runtime.specs and time.monotonic() < deadline:  # the agent is running
            time.sleep(0.1)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, out + err
    assert "Traceback" not in err, err
    assert "interrupted: cancelling ev-" in out, out
    summary = [line for line in out.splitlines() if line.startswith("ev-")][-1]
    assert " cancelled cancelled " in summary, out
