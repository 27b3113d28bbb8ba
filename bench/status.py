"""Status benchmark: ``GET /v1/status`` latency at 1, 100 and 1000 stored deployments, and
dockyard's resident memory idle, after deploy-delete cycles and with 1000 deployments.

    python bench/status.py [--requests 300] [--check] [--json]

A real dockyard app (Litestar served by uvicorn on 127.0.0.1, SQLite state, the ``none``
router, the fake runtime whose "containers" are HTTP servers) answers an aiohttp client one
request at a time; the timed client runs in a process of its own, as a real one does (in
dockyard's process it would add its own parsing of every answer to the figure).
Deployments are written straight into the store, a third of them with a PROMOTED slot on a
revision. The baseline is the same list rendered as before (one store
read per deployment, slot and revision), timed in the same process. Targets: p99 ≤ 10 ms
for the default page and for a full page of 1000 at 1000 deployments; RSS ≤ 80 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, add_report_options, median, pct, rss_mib, run_benchmark, spread

from dockyard.api.app import create_app
from dockyard.api.deployments import render
from dockyard.core.config import Settings
from dockyard.core.models import Color, DeploymentSpec, Event, Revision, SlotState
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from dockyard.core.states import transition
from tests.fakes import FakeRuntime, FakeSource

TOKEN = "dy_be4c0000_" + "b" * 43
TARGET_MS = 10.0
TARGET_RSS_MIB = 80.0
SIZES = (1, 100, 1000)
CYCLES = 51


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def populate(services: Services, start: int, end: int) -> None:
    """Deployments ``start``..``end - 1``; every third has a PROMOTED blue slot."""
    store = services.store
    for i in range(start, end):
        deployment_id = f"app-{i:04}"
        await store.create_deployment(
            DeploymentSpec(
                id=deployment_id,
                repo=f"https://github.com/bench/agent-{i}",
                ref="main",
                env={"A": "1"},
                labels={"dockyard_evaluation": f"ev-{i}"} if i % 5 == 0 else {},
            )
        )
        if i % 3:
            continue
        commit = hashlib.sha1(str(i).encode()).hexdigest()
        await store.add_revision(
            Revision(
                id=f"rev-{i}",
                deployment_id=deployment_id,
                repo=f"https://github.com/bench/agent-{i}",
                commit=commit,
            )
        )
        slot = await store.get_slot(deployment_id, Color.BLUE)
        for step in (SlotState.BUILDING, SlotState.STAGING, SlotState.HEALTHY, SlotState.PROMOTED):
            changes: dict[str, Any] = {"revision_id": f"rev-{i}"}
            if step is SlotState.STAGING:
                changes |= {"host_port": 42000 + i, "container_name": f"c-{i}"}
            new = transition(slot, step, **changes)
            event = Event(
                deployment_id=deployment_id,
                kind="slot_transition",
                color=slot.color,
                from_state=slot.state,
                to_state=step,
            )
            slot = await store.save_slot(new, event)


async def timed_gets(session: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.get(url) as response:
            await response.read()
            assert response.status == 200, response.status
        out.append((time.perf_counter() - started) * 1000)
    return out


def _client(url: str, n: int, out: Any) -> None:
    """The timed client's process: ``n`` GETs of ``url``, one at a time, after a few
    untimed ones (its connection and imports warm)."""

    async def run() -> list[float]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
            await timed_gets(s, url, 5)
            return await timed_gets(s, url, n)

    out.put(asyncio.run(run()))


async def timed_gets_apart(url: str, n: int) -> list[float]:
    """:func:`timed_gets` from a client process of its own."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    process = ctx.Process(target=_client, args=(url, n, out))
    process.start()
    try:
        return list(await asyncio.to_thread(out.get, True, 600))
    finally:
        await asyncio.to_thread(process.join, 10)
        if process.is_alive():
            process.kill()


async def measure(args: argparse.Namespace) -> list[Row]:
    import uvicorn

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-status-") as tmp:
        settings = Settings(
            data_dir=str(Path(tmp) / "data"),
            api_tokens=[
                {
                    "id": "be4c0000",
                    "name": "bench",
                    "scopes": ["admin"],
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                }
            ],
            rate_limit_per_ip=0,
            rate_limit_per_token=0,
            monitor_interval_s=0,
            router="none",
            port_range_start=48300,
            port_range_end=48399,
        )
        services = Services.build(
            settings,
            build_plugin_manager(load_entry_points=False),
            runtime=FakeRuntime(),
            sources={"fake": FakeSource(Path(tmp) / "src")},
        )
        await services.start()
        app = create_app(settings, services=services)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            async with aiohttp.ClientSession(headers=headers) as session:
                await timed_gets(session, f"{base}/v1/status", 20)  # warm up
                idle = rss_mib()
                rows.append(
                    Row("status", "RSS idle", idle, "MiB", target=TARGET_RSS_MIB, samples=1)
                )
                spec = {
                    "id": "cycle",
                    "repo": "https://github.com/bench/cycle",
                    "health": {"interval_s": 0.05, "timeout_s": 1, "deadline_s": 5},
                }
                for i in range(CYCLES):
                    async with session.post(
                        f"{base}/v1/repos?wait=true", json={**spec, "ref": f"v{i}"}
                    ) as r:
                        assert r.status == 200, await r.text()
                    async with session.delete(f"{base}/v1/repos/cycle") as r:
                        assert r.status == 200, await r.text()
                rows.append(
                    Row(
                        "status",
                        f"RSS after {CYCLES} deploy-delete cycles",
                        rss_mib(),
                        "MiB",
                        target=TARGET_RSS_MIB,
                        baseline=idle,
                        baseline_name="idle",
                        samples=1,
                    )
                )
                controller = app.state.controller
                stored = 0
                for size in SIZES:
                    await populate(services, stored, size)
                    stored = size
                    queries = [("default page", "")]
                    if size == SIZES[-1]:
                        queries.append(("limit=1000", "?limit=1000"))
                    for label, query in queries:
                        times = await timed_gets_apart(f"{base}/v1/status{query}", args.requests)
                        if size == SIZES[-1] and not query:
                            # Before the bigger page and the baseline's own allocations.
                            stored_rss = rss_mib()
                        # The old rendering: one store round trip per deployment and slot.
                        old = []
                        for _ in range(max(3, min(args.requests, 3000 // size))):
                            started = time.perf_counter()
                            deployments = await services.store.list_deployments()
                            if query == "":
                                deployments = deployments[:100]
                            [await render(controller, d) for d in deployments]
                            old.append((time.perf_counter() - started) * 1000)
                        rows.append(
                            Row(
                                "status",
                                f"GET /v1/status p99, {size} stored, {label}",
                                pct(times, 0.99),
                                "ms",
                                spread=spread(times),
                                baseline=median(old),
                                baseline_name="per-item reads, median, no HTTP",
                                target=TARGET_MS,
                                samples=len(times),
                                note=(
                                    f"median {median(times):.2f} ms" if size == SIZES[-1] else ""
                                ),
                                raw={"ms": [round(t, 3) for t in times]},
                            )
                        )
                rows.append(
                    Row(
                        "status",
                        f"RSS with {stored} deployments stored, serving the default page",
                        stored_rss,
                        "MiB",
                        target=TARGET_RSS_MIB,
                        baseline=idle,
                        baseline_name="idle",
                        samples=1,
                    )
                )
        finally:
            server.should_exit = True
            await serving
            await services.runtime.close()
            await services.close()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per figure")
    add_report_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(measure, args, "dockyard status benchmark")


if __name__ == "__main__":
    sys.exit(main())
