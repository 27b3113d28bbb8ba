"""Long-lived child processes of dockyard (the managed proxies, the private Podman service):
proving a process is the one dockyard started, and stopping what a killed dockyard left.

Each such child has a pid file in the data directory (:class:`PidFile`) that records its pid
and its start time (field 22 of ``/proc/<pid>/stat``, in clock ticks since boot): a pid the
kernel recycled for another program has another start time, so :meth:`PidFile.reap` never
kills a stranger. The next dockyard on the same data directory reaps the leftover before it
starts its own.

Where Linux allows, children also die with dockyard: :func:`die_with_parent` is a
``preexec_fn`` that sets ``PR_SET_PDEATHSIG`` (SIGKILL) in the child. The signal follows
the *thread* that forked the child, so a child started from a short-lived worker thread
must be started through :func:`popen` (a dedicated thread that lives as long as the
process), never straight from ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc: Any = None
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc


def pdeathsig_supported() -> bool:
    """Whether this OS offers ``prctl(PR_SET_PDEATHSIG)`` (Linux)."""
    return os.uname().sysname == "Linux" and bool(_load_libc())


_load_libc()  # before any fork: the preexec_fn must not load a library in the child


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the thread that forked it ends (for a
    process's main thread or :func:`popen`'s thread: when dockyard dies, even by SIGKILL).

    Runs after ``setsid``/``setpgid`` and the user switch of ``subprocess`` (a change of
    credentials clears the setting, so it must come last). A no-op where unsupported.
    """
    libc = _libc
    if libc:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def popen(**kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(**kwargs)`` from one thread that lives as long as this process,
    with :func:`die_with_parent`, so the child outlives neither dockyard nor the caller's
    thread pool. ``wait``/``poll`` work from any thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dockyard-children")
    kwargs.setdefault("preexec_fn", die_with_parent)
    return _spawner.submit(lambda: subprocess.Popen(**kwargs)).result()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when it does not exist
    (or is a zombie, which holds nothing but its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


class PidFile:
    """Where dockyard records a child it runs, so that the next start can stop it.

    The file holds JSON: ``pid``, ``start_time``, ``exe`` and any ``extra`` the owner
    records (e.g. a directory to remove with the process). Older proxy pid files held the
    bare pid; those are honoured when the process's executable matches ``exe``.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name

    def record(self, pid: int, exe: str, **extra: Any) -> None:
        """Write the record (atomically: a crash leaves the old file or the new one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"pid": pid, "start_time": start_time(pid), "exe": exe, **extra}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(body) + "\n")
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any] | None:
        """The record, or None when there is none (or it cannot be read)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        if text.isdigit():
            return {"pid": int(text), "start_time": None, "exe": None}
        try:
            body = json.loads(text)
        except ValueError:
            return None
        return body if isinstance(body, dict) and isinstance(body.get("pid"), int) else None

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def alive(self, record: dict[str, Any], exe: str | None = None) -> bool:
        """Whether the recorded process still runs and is provably the one recorded: same
        start time, or (an old file without one) same executable as ``exe``."""
        pid = record["pid"]
        started = start_time(pid)
        if started is None or pid == os.getpid():
            return False
        if record.get("start_time") is not None:
            return bool(started == record["start_time"])
        if exe is None:
            return False
        try:
            real = os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            return False
        return real == os.path.realpath(exe)

    def reap(self, exe: str | None = None, *, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """Stop the recorded process if it is still the one recorded (SIGKILL to its
        process group when it leads one, else to it), wait (bounded) until it is gone, and
        remove the file. Returns the record of what was stopped, or None."""
        record = self.read()
        if record is None:
            self.clear()
            return None
        pid = record["pid"]
        if not self.alive(record, exe):
            self.clear()
            return None
        log.warning("stopping %s left behind by a previous dockyard (pid %s)", self.name, pid)
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while start_time(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.clear()
        return record
