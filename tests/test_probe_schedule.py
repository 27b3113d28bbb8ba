"""The health-probe schedule of a new container, on a fake clock: right after start (or
after ``startup_delay_s``), then short pauses backing off to ``interval_s``; the deadline
and the container-exited check still hold. One test probes a real HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dockyard.core.health import (
    BACKOFF,
    FIRST_PAUSE_S,
    RUNNING_CHECK_S,
    ProbeResult,
    probe_pauses,
    wait_healthy,
)
from dockyard.core.models import HealthCheck


class FakeClock:
    """Time that moves only when the code under test sleeps; a probe takes ``probe_s``."""

    def __init__(self, ready_at: float | None, probe_s: float = 0.0) -> None:
        self.now = 0.0
        self.ready_at = ready_at
        self.probe_s = probe_s
        self.probes: list[float] = []
        self.sleeps: list[float] = []
        self.running_checks: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    async def probe(self, session: aiohttp.ClientSession, url: str, timeout_s: float) -> Any:
        self.probes.append(round(self.now, 6))
        self.now += self.probe_s
        ok = self.ready_at is not None and self.now >= self.ready_at
        return ProbeResult(ok=ok, status=200 if ok else None, error=None if ok else "refused")

    async def still_running(self) -> bool:
        self.running_checks.append(self.now)
        return True


async def run(check: HealthCheck, clock: FakeClock, **kwargs: Any) -> Any:
    return await wait_healthy(
        "http://127.0.0.1:9/health",
        check,
        probe=clock.probe,
        clock=clock.clock,
        sleep=clock.sleep,
        **kwargs,
    )


def expected_probe_times(interval_s: float, start: float, count: int) -> list[float]:
    times, at = [start], start
    pause = min(FIRST_PAUSE_S, interval_s)
    while len(times) < count:
        at += pause
        times.append(round(at, 6))
        pause = min(pause * BACKOFF, interval_s)
    return times


def test_pauses_start_short_and_back_off_to_the_interval() -> None:
    pauses = probe_pauses(1.0)
    first = [next(pauses) for _ in range(20)]
    assert first[0] == FIRST_PAUSE_S
    assert all(b == min(a * BACKOFF, 1.0) for a, b in itertools.pairwise(first))
    assert first[-1] == 1.0 and max(first) == 1.0
    assert sum(1 for p in first if p < 1.0) < 12  # the full interval comes soon
    tiny = probe_pauses(0.01)  # an interval below the first pause: never more than it
    assert [next(tiny) for _ in range(3)] == [0.01, 0.01, 0.01]


async def test_first_probe_at_once_then_backed_off_until_ready() -> None:
    clock = FakeClock(ready_at=0.25)
    outcome = await run(HealthCheck(interval_s=1.0, deadline_s=60), clock)
    assert outcome.healthy
    assert clock.probes[0] == 0.0  # right after start, not after interval_s
    assert clock.probes == expected_probe_times(1.0, 0.0, len(clock.probes))
    # Ready at 0.25 s: seen within one (short) pause of it, not at 1 s.
    assert 0.25 <= clock.probes[-1] < 0.25 + 0.15
    assert outcome.probes == len(clock.probes)


async def test_startup_delay_is_respected() -> None:
    clock = FakeClock(ready_at=0.0)
    outcome = await run(HealthCheck(interval_s=1.0, startup_delay_s=2.5), clock)
    assert outcome.healthy and clock.probes == [2.5]
    assert clock.sleeps[0] == 2.5


async def test_probes_reach_the_interval_and_stay_there() -> None:
    clock = FakeClock(ready_at=None)
    outcome = await run(
        HealthCheck(interval_s=0.5, deadline_s=8), clock, still_running=clock.still_running
    )
    assert not outcome.healthy
    assert "not healthy within 8 s" in (outcome.reason or "")
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(clock.probes)]
    assert gaps[0] == FIRST_PAUSE_S
    assert gaps == sorted(gaps)  # never shorter again
    assert max(gaps) == 0.5 and gaps[-1] <= 0.5
    assert clock.probes[-1] < 8.0 and clock.now <= 8.0 + 1e-9  # the deadline bounds it
    # The container check is rate-limited, not sent after every early probe.
    checks = clock.running_checks
    assert all(b - a >= RUNNING_CHECK_S - 1e-9 for a, b in itertools.pairwise(checks))
    assert 2 < len(checks) < len(clock.probes)


async def test_healthy_threshold_counts_consecutive_successes() -> None:
    clock = FakeClock(ready_at=0.1)
    outcome = await run(HealthCheck(interval_s=1.0, healthy_threshold=3), clock)
    assert outcome.healthy and outcome.probes == len(clock.probes)
    assert sum(1 for t in clock.probes if t >= 0.1) == 3


async def test_an_exited_container_ends_the_wait_early() -> None:
    clock = FakeClock(ready_at=None)

    async def exited() -> bool:
        return False

    outcome = await run(HealthCheck(interval_s=1.0, deadline_s=60), clock, still_running=exited)
    assert not outcome.healthy and outcome.reason == "container exited before it became healthy"
    assert clock.probes == [0.0]


@pytest.mark.slow
async def test_a_real_server_that_starts_late_is_seen_soon_after() -> None:
    """A loopback server that starts listening 0.3 s after the wait began is seen as
    healthy well before the 1 s interval would have probed it again."""
    sock_port = 0
    app = web.Application()

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        sock_port = s.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", sock_port)

    async def start_late() -> None:
        await asyncio.sleep(0.3)
        await site.start()

    starter = asyncio.create_task(start_late())
    try:
        started = time.monotonic()
        outcome = await wait_healthy(
            f"http://127.0.0.1:{sock_port}/health", HealthCheck(interval_s=1.0, deadline_s=10)
        )
        took = time.monotonic() - started
        assert outcome.healthy and outcome.probes > 2
        assert took < 0.9, f"seen after {took:.2f} s"
    finally:
        await starter
        await runner.cleanup()
