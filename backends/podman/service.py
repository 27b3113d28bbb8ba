"""A private ``podman system service`` for :class:`dockyard.backends.podman.PodmanRuntime`
and the tests (:class:`PodmanService`, kept as one unit)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from podman import PodmanClient

from dockyard.backends.engine.network import unix_path
from dockyard.backends.podman.processes import _group_members, _proc_pids
from dockyard.core import children
from dockyard.core.children import PidFile
from dockyard.core.errors import RuntimeUnavailable

INSTALL_HINT = (
    "Podman is not installed: apt-get install podman runc uidmap slirp4netns catatonit "
    "(or run contrib/ci/setup-podman.sh as root), or point settings.podman_socket at a "
    "running Podman service"
)


def socket_answers(url: str, timeout_s: float = 5.0) -> bool:
    """Whether a Podman service answers ``/_ping`` at ``url``."""
    path = unix_path(url)
    if path is not None and not os.path.exists(path):
        return False
    try:
        with PodmanClient(base_url=url, timeout=timeout_s) as client:
            return bool(client.ping())
    except Exception:
        return False


class PodmanService:
    """A private ``podman system service`` on a socket in a fresh temp dir.

    Rootful by default; with ``user`` (needs root) it runs as that unprivileged user, i.e.
    rootless Podman (``XDG_RUNTIME_DIR`` defaults to ``/run/user/<uid>``, created when
    missing). Stopping it stops the service process group; containers
    it started keep running (conmon owns them). Used by :class:`PodmanRuntime` when no
    socket answers, and by the tests to get engines of their own.

    With ``pid_path`` it records itself there (``core/children.py``), so :meth:`reap`
    stops a service a killed dockyard left; it always gets SIGKILL when its parent dies.
    """

    def __init__(
        self,
        podman_path: str = "podman",
        *,
        user: str | None = None,
        runtime_dir: str | None = None,
        start_timeout_s: float = 20.0,
        pid_path: Path | None = None,
    ) -> None:
        self.podman_path = podman_path
        self.pid_file = PidFile(pid_path, "the private Podman service") if pid_path else None
        self.user = user
        self.runtime_dir = runtime_dir
        self.start_timeout_s = start_timeout_s
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._pause_pid_before: int | None = None

    @property
    def socket_path(self) -> Path:
        if self.dir is None:
            raise RuntimeError("service not started")
        return self.dir / "podman.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _log_tail(self, lines: int = 20) -> str:
        if self.dir is None:
            return ""
        try:
            text = (self.dir / "service.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _popen_args(self) -> dict[str, Any]:
        binary = shutil.which(self.podman_path)
        if binary is None:
            raise RuntimeUnavailable(INSTALL_HINT)
        args: dict[str, Any] = {"args": [binary, "system", "service", "--time=0", self.url]}
        if self.user is None:
            # With these set, podman acts as a remote client instead of serving.
            remote = ("CONTAINER_HOST", "CONTAINER_CONNECTION")
            args["env"] = {k: v for k, v in os.environ.items() if k not in remote}
            return args
        # Switch user in the child itself (not through runuser/su): the service stays our
        # direct child, so it is waited for and never left as an orphan or a zombie.
        entry = pwd.getpwnam(self.user)
        runtime_dir = self.runtime_dir or f"/run/user/{entry.pw_uid}"
        self.runtime_dir = runtime_dir
        if not os.path.isdir(runtime_dir):
            os.makedirs(runtime_dir, mode=0o700)
            os.chown(runtime_dir, entry.pw_uid, entry.pw_gid)
        args.update(
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
            cwd=entry.pw_dir,
            env={
                "HOME": entry.pw_dir,
                "USER": entry.pw_name,
                "LOGNAME": entry.pw_name,
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "XDG_RUNTIME_DIR": runtime_dir,
            },
        )
        return args

    def _pause_pid(self) -> int | None:
        if self.runtime_dir is None:
            return None
        try:
            pid = int(Path(self.runtime_dir, "libpod", "tmp", "pause.pid").read_text().strip())
            alive = b"catatonit" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if alive else None

    def start(self) -> str:
        """Start the service and wait (bounded) until it answers; returns its URL."""
        self.dir = Path(tempfile.mkdtemp(prefix="dockyard-podman-"))
        try:
            popen_args = self._popen_args()
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                os.chown(self.dir, entry.pw_uid, entry.pw_gid)
                self._pause_pid_before = self._pause_pid()
            with open(self.dir / "service.log", "wb") as out:
                self.process = children.popen(
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                    **popen_args,
                )
            if self.pid_file is not None:
                self.pid_file.record(self.process.pid, popen_args["args"][0], dir=str(self.dir))
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeUnavailable(
                        f"podman system service exited with {self.process.returncode}: "
                        f"{self._log_tail()}"
                    )
                if socket_answers(self.url, timeout_s=2.0):
                    return self.url
                time.sleep(0.1)
            raise RuntimeUnavailable(
                f"podman system service did not answer within {self.start_timeout_s:.0f}s: "
                f"{self._log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the service (SIGTERM, then SIGKILL) and remove its socket dir."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            # The whole group: rootless podman re-executes itself into the user namespace.
            while (proc.poll() is None or _group_members(proc.pid)) and (
                time.monotonic() < deadline
            ):
                time.sleep(0.05)
            if proc.poll() is None or _group_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout_s)
        if self.user is not None:
            self._stop_idle_pause_process()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self.pid_file is not None:
            self.pid_file.clear()

    @staticmethod
    def pid_path_in(state_dir: str | None) -> Path | None:
        """Where the private service's pid file lives in dockyard's data directory."""
        return Path(state_dir) / "podman-service.pid" if state_dir else None

    @staticmethod
    def reap(pid_path: Path) -> bool:
        """Stop the service a killed dockyard left (recorded in ``pid_path``, still the same
        process) and remove its socket directory; True when there was one."""
        record = PidFile(pid_path, "the private Podman service").reap()
        if record is None:
            return False
        leftover = Path(str(record.get("dir") or ""))
        if leftover.name.startswith("dockyard-podman-"):
            shutil.rmtree(leftover, ignore_errors=True)
        return True

    def _stop_idle_pause_process(self) -> None:
        """Stop the rootless pause process this service started, once nothing else uses it."""
        pid = self._pause_pid()
        if pid is None or pid == self._pause_pid_before or self.user is None:
            return
        uid = pwd.getpwnam(self.user).pw_uid
        for other in _proc_pids():
            if other == pid:
                continue
            try:
                if os.stat(f"/proc/{other}").st_uid != uid:
                    continue
                state = Path(f"/proc/{other}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                return  # another Podman process (or anything) of this user still runs
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


__all__ = ["INSTALL_HINT", "PodmanService", "socket_answers"]
