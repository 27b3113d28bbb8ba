"""``dockyard serve`` as a real child process, for the stop and crash tests.

:class:`Served` writes a TOML configuration (the test token, a port range, the Caddy router on
a free loopback port), starts ``dockyard serve`` on a data directory and a free port, and
offers what the tests need around it: JSON requests to its API, requests through its proxy,
the processes it started (its descendants), and its state database read-only.

A test plugin is loaded the way an operator's would be, through an entry point: the plugin
directory is put on the child's ``PYTHONPATH`` with a ``*.dist-info`` declaring the
``dockyard`` entry point, so nothing is installed into the venv.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import TEST_TOKEN, TEST_TOKENS, free_port


def wait_for_healthz(proc: subprocess.Popen[str], port: int, timeout_s: float = 60) -> Any:
    """The ``/v1/healthz`` answer of the ``dockyard serve`` child ``proc`` on ``port`` once
    it gives one; fails with the child's output when it exits or stays silent too long."""
    body = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/healthz", timeout=2) as r:
                body = json.load(r)
                break
        except OSError:
            time.sleep(0.3)
    assert body is not None, proc.stdout.read() if proc.stdout else ""
    return body


def install_plugin(where: Path, module: str, source: str) -> Path:
    """Write ``module`` (``source``) and a dist-info declaring it as a ``dockyard`` entry
    point under ``where``; the directory to put on ``PYTHONPATH``."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{module}.py").write_text(source)
    info = where / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dockyard]\n{module} = {module}\n")
    return where


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(processes: dict[int, tuple[int | None, str]]) -> dict[int, str]:
    """Which of ``{pid: (start time, cmdline)}`` still run (same pid AND start time)."""
    return {
        pid: cmd
        for pid, (started, cmd) in processes.items()
        if started is not None and start_time(pid) == started
    }


class Served:
    """One ``dockyard serve`` child on ``data_dir``; restartable on the same directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port_range: tuple[int, int],
        plugin_path: Path | None = None,
        env: dict[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proxy_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.plugin_path = plugin_path
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.config = data_dir.parent / f"{data_dir.name}.toml"
        values = {
            "data_dir": str(data_dir),
            "host": "127.0.0.1",
            "port": self.port,
            "router": "caddy",
            "insecure_sources": True,
            "port_range_start": port_range[0],
            "port_range_end": port_range[1],
            "rate_limit_per_ip": 0,
            "rate_limit_per_token": 0,
            "monitor_interval_s": 0,
            "router_watch_interval_s": 0.5,
            "build_timeout_s": 60,
            "log_level": "INFO",
            **settings,
        }
        lines = [f"{k} = {_toml(v)}" for k, v in values.items()]
        for token in TEST_TOKENS:
            lines.append("[[api_tokens]]")
            lines += [f"{k} = {_toml(v)}" for k, v in token.items()]
        lines += ["[plugins.caddy]", f"listen = {_toml(f'127.0.0.1:{self.proxy_port}')}"]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = data_dir.parent / f"{data_dir.name}.log"

    # -- the process ---------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> Served:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_")}
        env.update(self.env)
        if self.plugin_path is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.plugin_path), env.get("PYTHONPATH", "")) if p
            )
        argv = [
            sys.executable,
            "-c",
            "import sys; from dockyard.api.cli import main; sys.exit(main())",
            "--config",
            str(self.config),
            "serve",
        ]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"dockyard exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                if self.get("/v1/healthz", timeout=2) is not None:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"dockyard did not answer within {timeout_s} s: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def descendants(self) -> dict[int, tuple[int | None, str]]:
        """Every process below dockyard now: ``{pid: (start time, cmdline)}``."""
        assert self.process is not None
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[-1].split()[1])
        found: dict[int, tuple[int | None, str]] = {}
        frontier = [self.process.pid]
        while frontier:
            pid = frontier.pop()
            for child, parent in parents.items():
                if parent == pid and child not in found:
                    try:
                        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                    except OSError:
                        continue
                    found[child] = (start_time(child), cmd.decode(errors="replace").strip())
                    frontier.append(child)
        return found

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self, timeout_s: float = 90) -> int:
        """SIGTERM and wait; the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"dockyard did not stop within {timeout_s} s") from None

    # -- HTTP ----------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 30
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def get(self, path: str, *, timeout: float = 30) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        return body if status == 200 else None

    def through_proxy(self, path: str) -> int:
        """The status of a GET through dockyard's proxy (0: no answer)."""
        try:
            with urllib.request.urlopen(self.proxy_url + path, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    # -- state ---------------------------------------------------------------------------
    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.data_dir / 'dockyard.db'}?mode=ro", uri=True)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()
