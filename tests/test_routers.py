"""Routers inside dockyard: blue/green switches through real Traefik and Caddy under load
with zero failed requests, the controller restoring routes a proxy lost, switches rolled
back when the proxy does not show them, drain tracking, and choosing a router.

Upstreams are the fake runtime's "containers" (real HTTP servers on loopback ports); the
proxies are real, run by their router plugins and stopped at the end of each test.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.core.config import Settings, load_settings
from dockyard.core.controller import Controller
from dockyard.core.models import Color, DeploymentSpec, HealthCheck, SlotState
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.router import Route, Router, RouterError, Upstream
from dockyard.core.services import Services
from dockyard.routers.none import NoRouter
from tests.fakes import FakeRuntime, FakeSource
from tests.proxies import PROXIES, proxy_settings, require

S = SlotState
PORTS = {"port_range_start": 47600, "port_range_end": 47640}


def spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec(
        id="app",
        repo="https://github.com/acme/agent",
        ref="v1",
        grace_period_s=fields.pop("grace_period_s", 0.2),
        health=HealthCheck(interval_s=0.02, timeout_s=0.5, deadline_s=3),
        **fields,
    )


async def start(settings: Settings, tmp_path: Path) -> tuple[Services, Controller]:
    services = Services.build(
        settings,
        build_plugin_manager(load_entry_points=False),
        runtime=FakeRuntime(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    await services.start()
    controller = Controller.from_services(services)
    await controller.start()
    return services, controller


async def stop(services: Services, controller: Controller) -> None:
    await controller.stop()
    await services.runtime.close()
    await services.close()


@pytest.fixture
async def dockyard(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """``await dockyard(router_name, **settings)`` -> (services, controller); stopped after."""
    started: list[tuple[Services, Controller]] = []

    async def make(name: str, **settings: Any) -> tuple[Services, Controller]:
        require(name)
        fields = {"monitor_interval_s": 0, "router_watch_interval_s": 0, **PORTS, **settings}
        pair = await start(proxy_settings(name, tmp_path / "data", **fields), tmp_path)
        started.append(pair)
        return pair

    yield make
    for services, controller in started:
        await stop(services, controller)


async def promoted_revision(services: Services) -> str:
    slot = next(s for s in await services.store.list_slots("app") if s.state is S.PROMOTED)
    return slot.revision_id or ""


# -- zero downtime -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PROXIES)
async def test_zero_failed_requests_while_ten_redeploys_switch_colours(
    name: str, dockyard: Any
) -> None:
    """20 clients request through the proxy without pause while 10 redeploys switch
    blue/green: no request fails, and once a switch is verified no response comes from
    an older revision. Half the clients keep their connection, half open one per request
    (what a config reload that rebinds listeners would drop)."""
    services, controller = await dockyard(name)
    router = services.router
    switches: list[tuple[float, str]] = []  # (verified at, revision)
    verify = router.verify

    async def recording_verify(route: Route, *, timeout_s: float = 5.0) -> bool:
        ok = await verify(route, timeout_s=timeout_s)
        if ok:
            switches.append((time.monotonic(), route.tag.split(":", 1)[1]))
        return ok

    router.verify = recording_verify  # type: ignore[method-assign]
    await controller.create(spec())
    assert await controller.wait("app", 20)
    url = router.url_for("app")
    assert url and url.endswith("/apps/app/")

    answers: list[tuple[float, str]] = []  # (sent at, revision that answered)
    failures: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    async def client(keep_alive: bool) -> None:
        connector = aiohttp.TCPConnector(force_close=not keep_alive)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not done.is_set():
                sent = time.monotonic()
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        body = await r.text()
                        if r.status == 200:
                            answers.append((sent, body))
                        else:
                            failures[f"HTTP {r.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures[type(exc).__name__] += 1

    clients = [asyncio.create_task(client(i % 2 == 0)) for i in range(20)]
    try:
        await asyncio.sleep(0.3)
        for i in range(10):
            await controller.redeploy("app", {"ref": f"v{i + 2}"})
            assert await controller.wait("app", 20)
            op = controller.operation("app")
            assert op is not None and op.error is None, op.error
            await asyncio.sleep(0.3)
    finally:
        done.set()
        await asyncio.gather(*clients)

    assert not failures, f"{sum(failures.values())} failed requests: {dict(failures)}"
    assert len(switches) == 11 and len(answers) > 500
    assert switches[-1][1] == await promoted_revision(services)
    order = {revision: i for i, (_, revision) in enumerate(switches)}
    for sent, revision in answers:
        current = max(i for i, (verified, _) in enumerate(switches) if verified <= sent)
        assert order[revision] >= current, f"{revision} answered after switch {current}"
    events = await services.store.list_events("app")
    promoted = [e for e in events if e.to_state is S.PROMOTED]
    assert all("switch_ms" in e.data for e in promoted)


# -- restore -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROXIES)
async def test_the_controller_restores_routes_after_the_proxy_is_killed(
    name: str, dockyard: Any
) -> None:
    services, controller = await dockyard(name, router_watch_interval_s=0.2)
    await controller.create(spec(grace_period_s=30))
    assert await controller.wait("app", 20)
    router = services.router
    url = router.url_for("app")
    revision = await promoted_revision(services)
    os.kill(router.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]

    deadline = time.monotonic() + 15
    body = ""
    async with aiohttp.ClientSession() as session:
        while body != revision:
            assert time.monotonic() < deadline, "the route was not restored"
            await asyncio.sleep(0.1)
            try:
                async with session.get(url) as response:
                    body = await response.text()
            except aiohttp.ClientError:
                continue
    assert router.process.starts == 2  # type: ignore[attr-defined]
    if name == "caddy":  # Caddy restarts empty: dockyard wrote the route again
        kinds = [e.kind for e in await services.store.list_events("app")]
        assert "route_restored" in kinds


async def test_resume_restores_routes_into_a_new_proxy(tmp_path: Path) -> None:
    """A dockyard restart with its managed Caddy: the new proxy starts empty, resume puts
    the promoted slot's route back."""
    require("caddy")
    settings = proxy_settings("caddy", tmp_path / "data", monitor_interval_s=0, **PORTS)
    services, controller = await start(settings, tmp_path)
    runtime = services.runtime
    try:
        await controller.create(spec(grace_period_s=30))
        assert await controller.wait("app", 20)
        revision = await promoted_revision(services)
        await controller.stop()
        await services.router.close()  # the proxy goes, the "containers" stay
        services2 = Services.build(
            settings,
            build_plugin_manager(load_entry_points=False),
            runtime=runtime,
            sources=services.sources,
        )
        await services2.start()
        controller2 = Controller.from_services(services2)
        await controller2.start()
        try:
            url = services2.router.url_for("app")
            assert url is not None
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert (response.status, await response.text()) == (200, revision)
        finally:
            await controller2.stop()
            await services2.close()
    finally:
        await runtime.close()
        await services.store.close()


async def test_check_routes_removes_routes_of_unknown_deployments(tmp_path: Path) -> None:
    services, controller = await start(
        Settings(data_dir=str(tmp_path), monitor_interval_s=0, router_watch_interval_s=0, **PORTS),
        tmp_path,
    )
    try:
        await controller.create(spec(grace_period_s=30))
        assert await controller.wait("app", 10)
        router: NoRouter = services.router  # type: ignore[assignment]
        stale = router.routes["app"]
        await router.apply(
            Route(deployment_id="gone", prefix="/apps/gone", upstream=stale.upstream)
        )
        router.routes["app"] = Route(
            deployment_id="app", prefix="/apps/app", upstream=stale.upstream, tag="old"
        )
        assert await controller.check_routes() == ["app"]
        assert router.routes == {"app": stale}
        assert await controller.check_routes() == []
    finally:
        await stop(services, controller)


# -- switches that do not show -----------------------------------------------------------
class StuckRouter(NoRouter):
    """Takes writes, but the proxy never shows the second upstream."""

    async def verify(self, route: Route, *, timeout_s: float = 5.0) -> bool:
        return route.tag.startswith("blue")


async def test_a_switch_the_proxy_does_not_show_is_rolled_back(tmp_path: Path) -> None:
    services = Services.build(
        Settings(data_dir=str(tmp_path), monitor_interval_s=0, router_watch_interval_s=0, **PORTS),
        build_plugin_manager(load_entry_points=False),
        runtime=FakeRuntime(),
        router=StuckRouter(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    await services.start()
    controller = Controller.from_services(services)
    await controller.start()
    try:
        await controller.create(spec(grace_period_s=30))
        assert await controller.wait("app", 10)
        blue = services.router.routes["app"]  # type: ignore[attr-defined]
        await controller.redeploy("app", {"ref": "v2"})
        assert await controller.wait("app", 30)
        op = controller.operation("app")
        assert op is not None and op.error and op.error["reason"] == "switch_failed"
        slots = {s.color: s for s in await services.store.list_slots("app")}
        assert slots[Color.BLUE].state is S.PROMOTED and slots[Color.GREEN].state is S.FAILED
        assert services.router.routes["app"] == blue  # type: ignore[attr-defined]
    finally:
        await stop(services, controller)


# -- drain tracking ----------------------------------------------------------------------
async def test_a_drain_records_requests_still_in_flight(dockyard: Any) -> None:
    services, controller = await dockyard("caddy-admin")
    await controller.create(spec(grace_period_s=0.2))
    assert await controller.wait("app", 20)
    await controller.redeploy("app", {"ref": "v2"})
    assert await controller.wait("app", 20)
    deadline = time.monotonic() + 10
    while True:
        events = await services.store.list_events("app")
        ended = [e for e in events if e.kind == "drain_ended"]
        if ended:
            break
        assert time.monotonic() < deadline, "no drain_ended event"
        await asyncio.sleep(0.05)
    assert ended[0].color is Color.BLUE
    assert ended[0].data == {"inflight": 0, "router": "caddy"}


# -- caddy -------------------------------------------------------------------------------
async def test_a_caddy_file_switch_loads_no_configuration(dockyard: Any) -> None:
    """Caddy rebinds its listeners on every config load; a file switch leaves the config
    alone (its ETag does not change)."""
    services, controller = await dockyard("caddy")
    await controller.create(spec(grace_period_s=30))
    assert await controller.wait("app", 20)
    router = services.router
    _, _, before = await router._call("GET", "/config/")  # type: ignore[attr-defined]
    await controller.redeploy("app", {"ref": "v2"})
    assert await controller.wait("app", 20)
    _, _, after = await router._call("GET", "/config/")  # type: ignore[attr-defined]
    assert before == after
    url = router.url_for("app")
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert await response.text() == await promoted_revision(services)


async def test_two_writers_on_one_caddy_never_lose_a_route(tmp_path: Path) -> None:
    """dockyard's Caddy plus a second writer attached to the same admin API. Every edit is
    guarded by If-Match: when the other writer changes the routes between a read and a
    write, the write gets 412, reads again, and both routes land."""
    require("caddy")
    from dockyard.routers.caddy import CaddyRouter
    from tests.proxies import Upstream as Server

    settings = proxy_settings("caddy-admin", tmp_path / "one")
    first = CaddyRouter(settings)
    await first.open()
    upstream = await Server("up").start()

    def route(name: str) -> Route:
        return Route(
            deployment_id=name, prefix=f"/apps/{name}", upstream=Upstream(port=upstream.port)
        )

    try:
        options = {**settings.plugins["caddy"], "manage": False, "admin": first.admin}
        second = CaddyRouter(Settings(data_dir=str(tmp_path / "two"), plugins={"caddy": options}))
        await second.open()
        statuses: list[int] = []
        call = second._call

        async def interleaved(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
            result = await call(method, path, *args, **kwargs)
            statuses.append(result[0])
            if method == "GET" and path.endswith("/routes") and len(statuses) == 1:
                await first.apply(route("theirs"))  # lands between our read and our write
            return result

        second._call = interleaved  # type: ignore[method-assign]
        await second.apply(route("ours"))
        assert statuses[:3] == [200, 412, 200]  # read, refused write, read again
        assert set(await first.served() or {}) == {"theirs", "ours"}
        await second.close()
    finally:
        await upstream.stop()
        await first.close()


# -- choosing a router -------------------------------------------------------------------
def _held_port(reuse_port: bool) -> socket.socket:
    """A loopback port another process would hold: listening, with SO_REUSEPORT when
    ``reuse_port`` (how a second Caddy silently shared one with the first)."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse_port:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", 0))
    held.listen(8)
    return held


@pytest.mark.parametrize("name", ["caddy", "traefik"])
@pytest.mark.parametrize("which", ["listen", "api_listen"])
async def test_a_managed_proxy_refuses_a_port_another_process_holds(
    tmp_path: Path, name: str, which: str
) -> None:
    require(name)
    if name == "caddy" and which == "api_listen":
        which = "admin"
    with _held_port(reuse_port=True) as held:
        address = f"127.0.0.1:{held.getsockname()[1]}"
        settings = proxy_settings(name, tmp_path / "data", **PORTS)
        settings.plugins[name][which] = address
        router = build_plugin_manager(load_entry_points=False).registries.routers.get(name)(
            settings
        )
        try:
            with pytest.raises(RouterError) as info:
                await router.open()
            assert router.process is None or not router.process.running
        finally:
            await router.close()  # stops a proxy that did start (the bug this catches)
        message = str(info.value)
        assert f"{name} cannot listen on {address}: another process already uses" in message
        # The holder kept its port: nothing else listens beside it.
        held.settimeout(0.2)
        with pytest.raises(TimeoutError):
            held.accept()
    pid_file = tmp_path / "data" / name / f"{name}.pid"
    assert not pid_file.exists()


def test_a_plain_listener_is_refused_too(tmp_path: Path) -> None:
    from dockyard.routers.proxy import refuse_busy_ports

    with _held_port(reuse_port=False) as held:
        address = f"127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(RouterError, match="another process already uses that port"):
            refuse_busy_ports("caddy", [f"http://{address}"])
    refuse_busy_ports("caddy", [address, "unix//tmp/x.sock", ":0"])  # free now: no error


def test_router_is_chosen_by_configuration(tmp_path: Path) -> None:
    pm = build_plugin_manager(load_entry_points=False)
    assert {"none", "traefik", "caddy"} <= set(pm.registries.routers.names())
    config = tmp_path / "dockyard.toml"
    config.write_text('router = "caddy"\n[plugins.caddy]\nlisten = "127.0.0.1:9999"\n')
    settings = load_settings(config, environ={})
    router: Router = pm.registries.routers.get(settings.router)(settings)
    assert router.name == "caddy" and router.managed
    assert load_settings(config, environ={"DOCKYARD_ROUTER": "traefik"}).router == "traefik"
    bad = Settings(plugins={"traefik": {"lisen": ":80"}})
    with pytest.raises(Exception, match="lisen"):
        pm.registries.routers.get("traefik")(bad)


def test_serve_takes_a_router_flag() -> None:
    from dockyard.api.cli import _parser

    args = _parser().parse_args(["serve", "--router", "traefik"])
    assert args.router == "traefik"
