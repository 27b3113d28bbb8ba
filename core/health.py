"""HTTP health probes sent by dockyard itself (aiohttp).

Container healthchecks need systemd timers under Podman, so dockyard probes on its own:
``wait_healthy`` gates a promotion; ``probe_once`` feeds the monitor of promoted slots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from dockyard.core.metrics import observe_probe
from dockyard.core.models import HealthCheck, Model


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
) -> HealthOutcome:
    """Probe ``url`` every ``interval_s`` until ``healthy_threshold`` consecutive successes,
    or until ``deadline_s`` passes (counted from the call, startup delay included).

    ``still_running`` lets the caller stop early when the container has exited.
    """
    deadline = time.monotonic() + check.deadline_s
    await asyncio.sleep(min(check.startup_delay_s, check.deadline_s))
    streak = probes = 0
    last: ProbeResult | None = None
    async with aiohttp.ClientSession() as session:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            last = await probe_once(session, url, min(check.timeout_s, remaining))
            probes += 1
            if on_probe:
                on_probe(last)
            streak = streak + 1 if last.ok else 0
            if streak >= check.healthy_threshold:
                return HealthOutcome(healthy=True, probes=probes, last=last)
            if still_running is not None and not await still_running():
                return HealthOutcome(
                    healthy=False,
                    probes=probes,
                    last=last,
                    reason="container exited before it became healthy",
                )
            await asyncio.sleep(max(0.0, min(check.interval_s, deadline - time.monotonic())))
    detail = last.error or f"HTTP {last.status}" if last else "no probe was sent"
    return HealthOutcome(
        healthy=False,
        probes=probes,
        last=last,
        reason=f"not healthy within {check.deadline_s:g} s (last probe: {detail})",
    )
