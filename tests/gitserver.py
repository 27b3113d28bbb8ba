"""Loopback git servers and repository builders for the git source tests.

Everything here listens on 127.0.0.1 only and stops when its context manager exits:

- :class:`GitDaemon` runs ``git daemon`` (the ``git://`` protocol);
- :class:`SmartHttpServer` serves smart HTTP by running ``git http-backend`` as a CGI program
  per request (closest to GitHub's https), and can instead answer every request with a
  redirect;
- :class:`StallServer` accepts TCP connections and never answers (timeouts), and counts the
  connections it saw (a sentinel nobody should contact);
- :class:`RepoBuilder` makes bare repositories with commits, branches, tags, symlinks,
  submodule entries and big incompressible files, without any network.

The ``git`` commands the tests run are isolated from the host's configuration
(:data:`GIT_ENV`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

#: Environment for test-side git commands: no user or system configuration, fixed identity
#: and dates, so repositories are reproducible and the host cannot change their content.
GIT_ENV: dict[str, str] = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "LANG": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_TERMINAL_PROMPT": "0",
}

#: Server-side configuration of every served repository: GitHub lets clients fetch any
#: commit reachable from a ref by its SHA, and so do these servers.
SERVED_CONFIG: dict[str, str] = {
    "uploadpack.allowReachableSHA1InWant": "true",
    "uploadpack.allowTipSHA1InWant": "true",
    "http.uploadpack": "true",
    "http.receivepack": "false",
}


def git(*args: str, cwd: str | os.PathLike[str] | None = None, input: bytes | None = None) -> str:
    """Run ``git`` with :data:`GIT_ENV` and return its stripped stdout; raise on failure."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=GIT_ENV,
        input=input,
        capture_output=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode().strip()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def tree_size(path: Path) -> int:
    """Total size in bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------------------- repositories
class Repo:
    """A bare repository served from ``RepoBuilder.root`` plus a private work tree to
    commit from. Paths in the methods are relative to the work tree."""

    def __init__(self, git_dir: Path, work: Path, branch: str = "main") -> None:
        self.git_dir = git_dir
        self.work = work
        self.name = git_dir.name
        git("init", "--quiet", "--bare", f"--initial-branch={branch}", str(git_dir))
        for key, value in SERVED_CONFIG.items():
            git("--git-dir", str(git_dir), "config", key, value)
        work.mkdir(parents=True)

    def git(self, *args: str, input: bytes | None = None) -> str:
        """Run git on this repository and its work tree."""
        return git(
            "--git-dir", str(self.git_dir), "--work-tree", str(self.work), *args, input=input
        )

    def write(self, path: str, content: str | bytes, *, mode: int | None = None) -> Self:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        if mode is not None:
            target.chmod(mode)
        return self

    def symlink(self, path: str, points_to: str) -> Self:
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(points_to, target)
        return self

    def remove(self, path: str) -> Self:
        target = self.work / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        return self

    def submodule(self, path: str, url: str, commit: str) -> Self:
        """Record a submodule entry (a gitlink plus ``.gitmodules``) without cloning it."""
        modules = self.work / ".gitmodules"
        existing = modules.read_text() if modules.exists() else ""
        modules.write_text(existing + f'[submodule "{path}"]\n\tpath = {path}\n\turl = {url}\n')
        (self.work / path).mkdir(parents=True, exist_ok=True)  # "not initialized", as git does
        self.git("add", ".gitmodules")
        self.git("update-index", "--add", "--cacheinfo", f"160000,{commit},{path}")
        return self

    def commit(self, message: str = "commit") -> str:
        """Commit everything in the work tree on the current branch; return the SHA."""
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def branch(self, name: str, *, checkout: bool = True) -> Self:
        """Create branch ``name`` at HEAD; with ``checkout``, further commits go there."""
        self.git("branch", name)
        if checkout:
            self.git("symbolic-ref", "HEAD", f"refs/heads/{name}")
        return self

    def switch(self, name: str) -> Self:
        """Point HEAD at an existing branch (the work tree is left alone)."""
        self.git("symbolic-ref", "HEAD", f"refs/heads/{name}")
        self.git("reset", "--quiet", "--hard")
        return self

    def tag(self, name: str, *, annotated: bool = False, commit: str = "HEAD") -> str:
        """Tag ``commit``; return the SHA of the tag ref (the tag object when annotated)."""
        if annotated:
            self.git("tag", "-a", "-m", f"tag {name}", name, commit)
        else:
            self.git("tag", name, commit)
        return self.git("rev-parse", f"refs/tags/{name}")

    def dangling_commit(self, message: str = "unreachable") -> str:
        """A commit that exists in the repository but no ref reaches."""
        tree = self.git("write-tree")
        return self.git("commit-tree", tree, "-m", message)


class RepoBuilder:
    """Creates served repositories under ``root`` (``root/<name>.git``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._work = root.parent / f"{root.name}-work"
        root.mkdir(parents=True, exist_ok=True)

    def new(self, name: str, *, branch: str = "main") -> Repo:
        return Repo(self.root / f"{name}.git", self._work / name, branch=branch)


# ---------------------------------------------------------------------------- servers
class _Server:
    """Context-manager plumbing shared by the servers."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class GitDaemon(_Server):
    """``git daemon`` exporting every repository under ``base`` on 127.0.0.1."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"git://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._proc = subprocess.Popen(
            [
                "git",
                "daemon",
                "--export-all",
                "--reuseaddr",
                "--informative-errors",
                f"--base-path={self.base}",
                "--listen=127.0.0.1",
                f"--port={self.port}",
                "--enable=upload-pack",
                "--forbid-override=upload-pack",
                "--disable=receive-pack",
                "--disable=upload-archive",
                str(self.base),
            ],
            env=GIT_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None


class _CgiHandler(BaseHTTPRequestHandler):
    """Runs ``git http-backend`` for each request and streams its answer back chunked."""

    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests are recorded in ``server.requests`` instead."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        body = self._read_body() if self.command == "POST" else b""
        if self.server.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {
            **GIT_ENV,
            "GIT_PROJECT_ROOT": str(self.server.base),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        for header in ("Git-Protocol", "Content-Encoding"):
            if header in self.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        proc = subprocess.Popen(
            ["git", "http-backend"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(body)
            proc.stdin.close()
            status, headers = 200, []
            while True:
                line = proc.stdout.readline().rstrip(b"\r\n")
                if not line:
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                else:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            stdout = cast(io.BufferedReader, proc.stdout)  # read1: what has arrived
            while chunk := stdout.read1(64 * 1024):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. over the byte cap)
        finally:
            proc.kill()
            proc.wait()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    base: Path
    redirect_to: str | None
    requests: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (a fetch aborted over its byte cap) are not errors."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class SmartHttpServer(_Server):
    """Smart HTTP on 127.0.0.1 over ``git http-backend``; with ``redirect_to``, answers every
    request with a 302 to ``redirect_to`` + the request path instead."""

    def __init__(self, base: Path, *, redirect_to: str | None = None) -> None:
        self.base = base
        self.redirect_to = redirect_to
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[str]:
        """``"METHOD /path"`` of every request received so far."""
        return self._httpd.requests if self._httpd else []

    def start(self) -> Self:
        httpd = _HttpServer(("127.0.0.1", 0), _CgiHandler)
        httpd.base = self.base
        httpd.redirect_to = self.redirect_to
        httpd.requests = []
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class StallServer(_Server):
    """Accepts TCP connections on 127.0.0.1, reads nothing, answers nothing, and keeps them
    open until stopped. ``connections`` counts the clients it saw."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[socket.socket] = []
        self._stopping = threading.Event()
        self.port = 0
        self.connections = 0

    def start(self) -> Self:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.settimeout(0.1)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._clients.append(client)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.close()
        if self._sock is not None:
            self._sock.close()


@contextlib.contextmanager
def servers(base: Path) -> Iterator[Mapping[str, Any]]:
    """A git daemon and a smart-HTTP server over ``base``, stopped on exit."""
    with GitDaemon(base) as daemon, SmartHttpServer(base) as http:
        yield {"git": daemon, "http": http}


@contextlib.contextmanager
def daemon_with_repos(root: Path) -> Iterator[tuple[GitDaemon, RepoBuilder]]:
    """A git daemon serving ``root`` and the builder that makes repositories in it (it
    creates the directory, so it comes first), the daemon stopped on exit."""
    builder = RepoBuilder(root)
    with GitDaemon(root) as daemon:
        yield daemon, builder
