"""Switch benchmark: how long a blue/green switch takes to reach clients through each
router, and how many requests fail meanwhile.

    .venv/bin/python bench/switch.py [--switches 20] [--clients 20] [--routers none,caddy,traefik]

For each router, a real dockyard controller (SQLite state; "containers" are HTTP servers,
each a process of its own on a loopback port) deploys one app, then redeploys it ``--switches``
times while ``--clients`` clients request it without pause through the proxy (Traefik and
Caddy run by their router plugins) or, for ``none``, on the promoted slot's host port.

Switch latency is the time from the new slot turning HEALTHY to the first response any
client gets from its revision (the clients run in a process of their own); the ``none``
router (clients move to the new port themselves) is the baseline the others are compared
with. Only 127.0.0.1 is used; everything started stops
at the end. ``--check`` exits 1 when a goal is missed: Caddy p50 < 50 ms, Traefik p50 <
500 ms, 0 failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fakes and tests.proxies, from this checkout

from dockyard.core.controller import Controller  # noqa: E402
from dockyard.core.hookspecs import hookimpl  # noqa: E402
from dockyard.core.models import DeploymentSpec, Event, HealthCheck, SlotState  # noqa: E402
from dockyard.core.plugins import build_plugin_manager  # noqa: E402
from dockyard.core.runtime import LABEL_REVISION, ContainerInfo, ContainerSpec  # noqa: E402
from dockyard.core.services import Services  # noqa: E402
from tests.fakes import FakeRuntime, FakeSource  # noqa: E402
from tests.proxies import binary, proxy_settings  # noqa: E402

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
GOALS_MS = {"caddy": 50.0, "traefik": 500.0}


@dataclass
class Result:
    router: str
    switch_ms: list[float] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)  # route write -> first response
    request_ms: list[float] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: str = ""

    @property
    def requests(self) -> int:
        return len(self.request_ms) + sum(self.failures.values())


class HealthyTimes:
    """A dockyard_event observer: when each slot turned HEALTHY."""

    def __init__(self) -> None:
        self.times: list[float] = []

    @hookimpl
    def dockyard_event(self, event: Event) -> None:
        if event.kind == "slot_transition" and event.to_state is SlotState.HEALTHY:
            self.times.append(time.monotonic())


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
        info = ContainerInfo(
            id=f"{next(self._ids):012x}",
            name=spec.name,
            image=spec.image,
            status="running",
            running=True,
            labels=dict(spec.labels),
            host_port=spec.host_port,
        )
        self.containers[info.id] = info
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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(port: Any, url: str | None, clients: int, stop: Any, out: Any) -> None:
    """The load generator, in its own process so it does not slow dockyard's event loop:
    ``clients`` clients GET the app without pause until ``stop`` is set, half keeping their
    connection, half opening one per request; the URL is ``url``, or the slot port in
    ``port`` (the ``none`` router) read before every request."""

    async def run() -> dict[str, Any]:
        first_seen: dict[str, float] = {}
        request_ms: list[float] = []
        failures: collections.Counter[str] = collections.Counter()

        async def client(keep_alive: bool) -> None:
            timeout = aiohttp.ClientTimeout(total=10)
            connector = aiohttp.TCPConnector(force_close=not keep_alive)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                while not stop.is_set():
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
                        first_seen.setdefault(body, arrived)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        failures[type(exc).__name__] += 1
                    await asyncio.sleep(0)

        await asyncio.gather(*(client(i % 2 == 0) for i in range(clients)))
        return {"first_seen": first_seen, "request_ms": request_ms, "failures": dict(failures)}

    out.put(asyncio.run(run()))


async def run_router(name: str, args: argparse.Namespace, work: Path) -> Result:
    result = Result(name)
    if name != "none" and binary(name.split("-")[0]) is None:
        result.skipped = f"{name} is not installed (pip install -e '.[routers]')"
        return result
    healthy = HealthyTimes()
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
        build_plugin_manager(load_entry_points=False, extra_plugins=[("bench", healthy)]),
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
            grace_period_s=0.5,
            health=HealthCheck(interval_s=0.02, timeout_s=1, deadline_s=10),
        )
        await controller.create(spec)
        if not await controller.wait("app", 30):
            raise RuntimeError("the first deploy did not finish")
        url = None if name == "none" else router.url_for("app")
        process = ctx.Process(target=load, args=(port, url, args.clients, stop, out))
        process.start()
        await asyncio.sleep(1.0)  # the load process is up and busy
        for i in range(args.switches):
            await controller.redeploy("app", {"ref": f"v{i + 1}"})
            if not await controller.wait("app", 30):
                raise RuntimeError(f"redeploy {i + 1} did not finish")
            op = controller.operation("app")
            if op and op.error:
                raise RuntimeError(f"redeploy {i + 1} failed: {op.error}")
            revision = next(
                s.revision_id
                for s in await services.store.list_slots("app")
                if s.state is SlotState.PROMOTED
            )
            switches.append((healthy.times[-1], writes[-1], revision or ""))
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
    for healthy_at, written_at, revision in switches:
        if revision in seen["first_seen"]:
            result.switch_ms.append((seen["first_seen"][revision] - healthy_at) * 1000)
            result.write_ms.append((seen["first_seen"][revision] - written_at) * 1000)
        else:
            result.failures["no response from a new revision"] += 1
    return result


def table(results: list[Result]) -> str:
    base = next((r for r in results if r.router == "none" and r.switch_ms), None)
    head = (
        f"{'router':<12} {'switches':>8} {'switch p50':>11} {'switch p95':>11} {'p50 / none':>11}"
        f" {'write p50':>10}"
        f" {'requests':>9} {'failed':>7} {'request p50':>12} {'p50 / none':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            lines.append(f"{r.router:<12} skipped: {r.skipped}")
            continue
        s50, s95, q50 = pct(r.switch_ms, 0.5), pct(r.switch_ms, 0.95), pct(r.request_ms, 0.5)
        ratio = f"{s50 / pct(base.switch_ms, 0.5):.1f}x" if base else "-"
        qratio = f"{q50 / pct(base.request_ms, 0.5):.1f}x" if base else "-"
        lines.append(
            f"{r.router:<12} {len(r.switch_ms):>8} {s50:>8.1f} ms {s95:>8.1f} ms {ratio:>11}"
            f" {pct(r.write_ms, 0.5):>7.1f} ms"
            f" {r.requests:>9} {sum(r.failures.values()):>7} {q50:>9.2f} ms {qratio:>11}"
        )
    return "\n".join(lines)


def goals(results: list[Result]) -> list[tuple[str, bool]]:
    """Caddy and Traefik p50 under their goal, no failed request; caddy-admin (a config
    load per switch) is measured for comparison only."""
    out = []
    for r in results:
        if r.skipped or r.router == "caddy-admin":
            continue
        if r.router in GOALS_MS:
            limit = GOALS_MS[r.router]
            out.append((f"{r.router} switch p50 < {limit:g} ms", pct(r.switch_ms, 0.5) < limit))
        out.append((f"{r.router}: 0 failed requests", not r.failures))
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
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between switches")
    parser.add_argument(
        "--ports",
        default="48100-48199",
        type=lambda v: tuple(int(p) for p in v.split("-", 1)),
        help="host ports leased to the app's slots",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results = []
    with tempfile.TemporaryDirectory(prefix="dockyard-bench-") as tmp:
        for name in args.routers.split(","):
            results.append(await run_router(name.strip(), args, Path(tmp)))
    checks = goals(results)
    if args.json:
        print(
            json.dumps(
                {
                    r.router: {
                        "skipped": r.skipped or None,
                        "switch_ms": {
                            "p50": pct(r.switch_ms, 0.5),
                            "p95": pct(r.switch_ms, 0.95),
                            "all": [round(x, 2) for x in r.switch_ms],
                        },
                        "write_ms_p50": pct(r.write_ms, 0.5),
                        "requests": r.requests,
                        "failed": dict(r.failures),
                        "request_ms_p50": pct(r.request_ms, 0.5),
                    }
                    for r in results
                },
                indent=1,
            )
        )
    else:
        print(
            f"dockyard switch benchmark: {args.switches} switches per router, {args.clients}"
            " clients without pause (half keep-alive), one process per upstream, all on 127.0.0.1"
        )
        print(table(results))
        print("switch = new slot HEALTHY -> first response from it at a client;")
        print("write = the route's write to the proxy -> that first response;")
        print("request = one GET through the router (none: straight to the slot's port)")
        print("caddy: switch by upstream file (default); caddy-admin: by PATCH, a config load")
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {text}")
    return 1 if args.check and not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
