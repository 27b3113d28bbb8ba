"""HTTP health probes sent by dockyard itself (aiohttp).

Container healthchecks need systemd timers under Podman, so dockyard probes on its own:
``wait_healthy`` gates a promotion; ``probe_once`` feeds the monitor of promoted slots.

A new container is probed right away (after ``startup_delay_s``), then after pauses that
start at :data:`FIRST_PAUSE_S` and grow by :data:`BACKOFF` up to ``interval_s``
(:func:`probe_pauses`): an agent that is ready a quarter of a second after its start is
promoted then, not at the first full interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp

from dockyard.core.metrics import observe_probe
from dockyard.core.models import HealthCheck, Model

#: The pause after the first probe of a new container.
FIRST_PAUSE_S = 0.02
#: Each pause is this many times the previous one, up to ``interval_s``.
BACKOFF = 1.5
#: ``still_running`` is asked at most this often (and at most every ``interval_s``).
RUNNING_CHECK_S = 0.25


def probe_pauses(interval_s: float) -> Iterator[float]:
    """The pauses between probes of a new container: :data:`FIRST_PAUSE_S`, growing by
    :data:`BACKOFF`, then ``interval_s`` for good (never more than ``interval_s``)."""
    pause = min(FIRST_PAUSE_S, interval_s)
    while True:
        yield pause
        pause = min(pause * BACKOFF, interval_s)


class ProbeResult(Model):
    ok: bool
    status: int | None = None
    latency_ms: float | None = None
    error: str | None = None


class HealthOutcome(Model):
    healthy: bool
    probes: int
    reason: str | None = None
    last: ProbeResult | None = None


async def probe_once(session: aiohttp.ClientSession, url: str, timeout_s: float) -> ProbeResult:
    """One GET; healthy means a status below 400 within ``timeout_s``."""
    started = time.monotonic()
    result = await _probe(session, url, timeout_s, started)
    observe_probe(result.ok, time.monotonic() - started)
    return result


async def _probe(
    session: aiohttp.ClientSession, url: str, timeout_s: float, started: float
) -> ProbeResult:
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as response:
            await response.content.read(64 * 1024)
            latency = (time.monotonic() - started) * 1000
            return ProbeResult(
                ok=response.status < 400, status=response.status, latency_ms=round(latency, 2)
            )
    except TimeoutError:
        return ProbeResult(ok=False, error=f"no answer within {timeout_s:g} s")
    except aiohttp.ClientError as exc:
        return ProbeResult(ok=False, error=str(exc) or type(exc).__name__)


async def wait_healthy(
    url: str,
    check: HealthCheck,
    *,
    still_running: Callable[[], Awaitable[bool]] | None = None,
    on_probe: Callable[[ProbeResult], None] | None = None,
    probe: Callable[[aiohttp.ClientSession, str, float], Awaitable[ProbeResult]] = probe_once,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> HealthOutcome:
    """Probe ``url`` until ``healthy_threshold`` consecutive successes, or until
    ``deadline_s`` passes (counted from the call, startup delay included): first right after
    ``startup_delay_s``, then after the pauses of :func:`probe_pauses`.

    ``still_running`` (asked after a failed probe, at most every :data:`RUNNING_CHECK_S`)
    lets the caller stop early when the container has exited. ``probe``, ``clock`` and
    ``sleep`` are replaceable for tests.
    """
    deadline = clock() + check.deadline_s
    await sleep(min(check.startup_delay_s, check.deadline_s))
    streak = probes = 0
    last: ProbeResult | None = None
    pauses = probe_pauses(check.interval_s)
    every = min(RUNNING_CHECK_S, check.interval_s)
    checked_at: float | None = None
    async with aiohttp.ClientSession() as session:
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                break
            last = await probe(session, url, min(check.timeout_s, remaining))
            probes += 1
            if on_probe:
                on_probe(last)
            streak = streak + 1 if last.ok else 0
            if streak >= check.healthy_threshold:
                return HealthOutcome(healthy=True, probes=probes, last=last)
            if (
                still_running is not None
                and not last.ok
                and (checked_at is None or clock() - checked_at >= every)
            ):
                checked_at = clock()
                if not await still_running():
                    return HealthOutcome(
                        healthy=False,
                        probes=probes,
                        last=last,
                        reason="container exited before it became healthy",
                    )
            await sleep(max(0.0, min(next(pauses), deadline - clock())))
    detail = last.error or f"HTTP {last.status}" if last else "no probe was sent"
    return HealthOutcome(
        healthy=False,
        probes=probes,
        last=last,
        reason=f"not healthy within {check.deadline_s:g} s (last probe: {detail})",
    )
