"""The command line: clear one-line errors, and ``dockyard serve`` answering on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.serve import wait_for_healthz

VENV_BIN = str(Path(sys.executable).parent)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dockyard.api.cli", *args],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--runtime", "nope"], {}, "unknown runtime 'nope'; available: "),
        (["serve", "--store", "nope"], {}, "unknown store 'nope'; available: "),
        (["serve"], {"DOCKYARD_PORT": "x"}, "invalid configuration: Expected `int`"),
        (["--config", "/nonexistent.toml", "config"], {}, "does not exist"),
    ],
)
def test_bad_input_gets_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    if args[0] == "serve":
        args = [*args, "--data-dir", str(tmp_path)]
    result = _cli(*args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("dockyard: error: ")


def test_missing_podman_is_a_clear_error(tmp_path: Path) -> None:
    """No podman binary on PATH and no socket answering: one line saying how to install."""
    env = {
        "PATH": VENV_BIN,  # python, dockyard: no podman
        "CONTAINER_HOST": "",
        "XDG_RUNTIME_DIR": str(tmp_path),
        "DOCKYARD_PODMAN_SOCKET": f"unix://{tmp_path}/absent.sock",
    }
    result = _cli(
        "serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()), env=env
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "dockyard: error:" in result.stderr
    assert "podman" in result.stderr.lower()


def test_config_prints_effective_settings() -> None:
    result = _cli("config", env={"DOCKYARD_PORT": "9123"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["port"] == 9123


@pytest.mark.podman
def test_serve_answers_healthz_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dockyard.api.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = wait_for_healthz(proc, port)
        assert body["status"] == "ok"
        assert body["runtime"]["name"] == "podman"
        assert body["store"] == {"name": "sqlite", "ok": True, "error": None}
        assert (tmp_path / "data" / "dockyard.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert f"http://127.0.0.1:{port}/v1/healthz" in out
    # The first start made an admin token, shown once; a second start shows none.
    assert out.count("export DOCKYARD_TOKEN=dy_") == 1
    token = out.split("export DOCKYARD_TOKEN=", 1)[1].split()[0]
    assert token not in (tmp_path / "data" / "tokens.json").read_text()


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"DOCKYARD_TOKEN": "dy_a\ndy_b"}, ["status"], "control characters"),
        ({}, ["status", "--url", "localhost:8800"], "must start with http"),
        ({}, ["status", "--url", f"http://127.0.0.1:{free_port()}"], "cannot reach dockyard"),
        ({}, ["deploy", "https://github.com/a/b", "--env", "NOEQUALS"], "--env wants KEY=VALUE"),
    ],
)
def test_client_commands_fail_in_one_line(
    env: dict[str, str], args: list[str], message: str
) -> None:
    result = _cli(*args, env=env)
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("dockyard: error: ") and message in result.stderr
