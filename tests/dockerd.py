"""A private Docker daemon for the tests, and a small synchronous client for its API.

:class:`DockerDaemon` starts ``dockerd`` (root only) with everything in a fresh temp dir:
its socket, ``--data-root``, ``--exec-root``, pid file, an empty ``daemon.json`` (the host's
``/etc/docker/daemon.json`` is not read) and its own containerd namespace, so it shares
nothing with a Docker the host may run. It leaves the host's firewall and bridges alone:
``--iptables=false --ip-masq=false --bridge=none`` (no ``docker0``, no NAT, no rules), and
containers join a user-defined bridge network created here (its own interface name). Ports
published on 127.0.0.1 work through Docker's userland proxy (``docker-proxy``), which needs
no iptables. Stopping it removes what it ran, the network and its interface, the daemon and
its containerd, and the temp dir.

:class:`DockerAPI` talks HTTP over the daemon's unix socket with the standard library: the
tests use it to look at the engine independently of the runtime under test.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class DockerAPIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class DockerAPI:
    """The Docker Engine API over a unix socket, synchronously (tests only)."""

    def __init__(self, socket_path: str | Path) -> None:
        self.socket_path = str(socket_path)

    def request(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 60.0,
    ) -> tuple[int, bytes]:
        query = ""
        if params:
            encoded = {
                k: (json.dumps(v) if isinstance(v, dict | list) else str(v))
                for k, v in params.items()
            }
            query = "?" + urlencode(encoded)
        conn = UnixHTTPConnection(self.socket_path, timeout=timeout)
        try:
            headers = {"Content-Type": content_type} if body is not None else {}
            conn.request(method, quote(path, safe="/:@") + query, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        status, data = self.request(method, path, **kwargs)
        if status >= 400:
            try:
                message = json.loads(data).get("message", "")
            except ValueError:
                message = data.decode(errors="replace")
            raise DockerAPIError(status, message)
        return json.loads(data) if data.strip() else None

    def ping(self) -> bool:
        try:
            status, _ = self.request("GET", "/_ping", timeout=2.0)
        except OSError:
            return False
        return status == 200

    def containers(self, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"all": "1"}
        if labels:
            params["filters"] = {"label": [f"{k}={v}" for k, v in labels.items()]}
        return list(self.json("GET", "/containers/json", params=params) or [])

    def build(self, context: Path, tag: str) -> list[str]:
        """Build ``context`` with the legacy builder, no network; the stream's text lines.
        Raises DockerAPIError with the build's error."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(str(context), arcname=".")
        params = {"t": tag, "version": "1", "networkmode": "none", "rm": "1", "forcerm": "1"}
        status, data = self.request(
            "POST",
            "/build",
            params=params,
            body=buffer.getvalue(),
            content_type="application/x-tar",
            timeout=300.0,
        )
        lines: list[str] = []
        for raw in data.splitlines():
            if not raw.strip():
                continue
            message = json.loads(raw)
            if message.get("error") or status >= 400:
                raise DockerAPIError(status, str(message.get("error") or message))
            lines.extend(str(message.get("stream", "")).splitlines())
        return lines


class DockerDaemon:
    """A private ``dockerd`` for one test session (see the module docstring)."""

    def __init__(self, dockerd: str = "dockerd", *, start_timeout_s: float = 60.0) -> None:
        self.dockerd = dockerd
        self.start_timeout_s = start_timeout_s
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        suffix = uuid.uuid4().hex[:8]
        self.namespace = f"dockyard-test-{suffix}"
        self.network = f"dyk-test-{suffix}"
        self.bridge = f"dyk{suffix}"  # an interface name: at most 15 characters

    @property
    def socket_path(self) -> Path:
        if self.dir is None:
            raise RuntimeError("dockerd not started")
        return self.dir / "docker.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def api(self) -> DockerAPI:
        return DockerAPI(self.socket_path)

    def log_tail(self, lines: int = 30) -> str:
        if self.dir is None:
            return ""
        try:
            text = (self.dir / "dockerd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> str:
        """Start dockerd, wait (bounded) until it answers, create the network; its URL."""
        binary = shutil.which(self.dockerd)
        if binary is None:
            raise RuntimeError("dockerd is not installed: apt-get install docker.io")
        # Short: containerd and shim sockets live under --exec-root (108-byte limit).
        self.dir = Path(tempfile.mkdtemp(prefix="dyk-docker-", dir="/tmp"))
        try:
            (self.dir / "daemon.json").write_text("{}\n")
            args = [
                binary,
                f"--host={self.url}",
                f"--data-root={self.dir / 'data'}",
                f"--exec-root={self.dir / 'x'}",
                f"--pidfile={self.dir / 'docker.pid'}",
                f"--config-file={self.dir / 'daemon.json'}",
                f"--containerd-namespace={self.namespace}",
                f"--containerd-plugins-namespace={self.namespace}-plugins",
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--log-level=warn",
            ]
            with open(self.dir / "dockerd.log", "wb") as out:
                self.process = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                )
            deadline = time.monotonic() + self.start_timeout_s
            api = self.api
            while not api.ping():
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dockerd did not answer within {self.start_timeout_s:.0f}s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.1)
            api.json(
                "POST",
                "/networks/create",
                body=json.dumps(
                    {
                        "Name": self.network,
                        "Driver": "bridge",
                        "CheckDuplicate": True,
                        "Options": {
                            "com.docker.network.bridge.name": self.bridge,
                            "com.docker.network.bridge.enable_ip_masquerade": "false",
                        },
                    }
                ).encode(),
            )
            return self.url
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 20.0) -> None:
        """Remove every container and the network, stop dockerd (SIGTERM, then SIGKILL),
        and remove the temp dir (unmounting what the daemon left mounted)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            api = self.api
            with contextlib.suppress(Exception):
                for container in api.containers():
                    api.request("DELETE", f"/containers/{container['Id']}", {"force": "1"})
                api.request("DELETE", f"/networks/{self.network}")
                # The agent networks dockyard made (their bridges would outlive the daemon).
                labelled = {"label": ["io.dockyard.network"]}
                for network in api.json("GET", "/networks", params={"filters": labelled}) or []:
                    api.request("DELETE", f"/networks/{network['Id']}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc is not None:
            # containerd runs in the daemon's process group; make sure none of it is left.
            deadline = time.monotonic() + 10
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "delete", self.bridge], check=False, capture_output=True)
        if self.dir is not None:
            _unmount_below(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unmount_below(directory: Path) -> None:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(directory.resolve()) + "/"
    targets = [
        line.split()[1].encode().decode("unicode_escape")
        for line in mounts
        if len(line.split()) > 1 and line.split()[1].startswith(prefix)
    ]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
