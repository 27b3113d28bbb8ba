"""What the host itself says about a container's processes and sockets (``/proc`` and
cgroup files), so engine tests check hardening without asking the engine under test."""

from __future__ import annotations

import socket
from pathlib import Path


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def proc_limit(pid: int, title: str) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(title):
            soft, hard = line[len(title) :].split()[:2]
            return soft, hard
    raise AssertionError(f"no {title!r} in /proc/{pid}/limits")


def cgroup_v1_file(pid: int, controller: str, filename: str) -> str | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            candidate = Path(f"/sys/fs/cgroup/{controllers}{path}/{filename}")
            if candidate.exists():
                return candidate.read_text().strip()
    return None


def assert_unprivileged(pids: list[int], *, nofile: int, nproc: int) -> None:
    """Every process in ``pids``, as ``/proc`` shows it: no capabilities (bounding or
    effective), ``no_new_privs``, and ``nofile``/``nproc`` as both soft and hard limits."""
    for pid in pids:
        status = proc_status(pid)
        assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        assert proc_limit(pid, "Max open files") == (str(nofile), str(nofile))
        assert proc_limit(pid, "Max processes") == (str(nproc), str(nproc))


def assert_cgroup_v1_limits(pid: int, *, memory_bytes: int, pids: int, cfs_quota_us: int) -> None:
    """The kernel's own view of a container's limits on a cgroup v1 host (memory+swap may be
    absent: no swap accounting on that kernel)."""
    assert cgroup_v1_file(pid, "memory", "memory.limit_in_bytes") == str(memory_bytes)
    swap = cgroup_v1_file(pid, "memory", "memory.memsw.limit_in_bytes")
    assert swap in (None, str(memory_bytes))
    assert cgroup_v1_file(pid, "pids", "pids.max") == str(pids)
    assert cgroup_v1_file(pid, "cpu", "cpu.cfs_quota_us") == str(cfs_quota_us)


def listeners(port: int) -> list[str]:
    """Local addresses of host TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # /proc/net/tcp stores each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found
