"""The router contract, run against real proxies: each router plugin runs (or attaches to)
its proxy on loopback (a new router per test, closed afterwards).

Create, switch, verify, remove, concurrent edits, requests in flight during a switch, drain
tracking, health, and restore after the proxy process is killed or loses its
configuration. A test module runs it with ``from dockyard.testing.router_contract import *``
and ``pytest --dockyard-router=NAME`` (see :mod:`dockyard.testing.plugin`); dockyard's own
tests run it against Traefik and Caddy (``caddy`` twice: switching by file and through the
admin API), configured by ``tests/contract/conftest.py``.

Conventions beyond the ABC: the router under test exposes ``probe_url`` (the entrypoint
clients use); a router that runs its proxy itself exposes it as ``process`` (with
``pid``), which the kill-and-revive test kills; the lost-configuration test knows how to
make ``traefik`` and ``caddy`` lose theirs and is skipped, saying so, for others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dockyard.core.router import ROUTE_HEADER, Route, Router, Upstream, route_prefix
from dockyard.testing.plugin import RouterFactory
from dockyard.testing.upstream import Upstream as Server


@pytest.fixture
async def router(dockyard_router_factory: RouterFactory, tmp_path: Path) -> AsyncIterator[Router]:
    """A new, open router under contract on a private data directory; closed afterwards,
    and the proxy process it started (if any) must be gone then."""
    router = dockyard_router_factory(tmp_path / "data")
    name = router.name
    await router.open()
    try:
        yield router
    finally:
        process = getattr(router, "process", None)
        pid = process.pid if process else None
        await router.close()
        if pid:  # the proxy a test started is gone when the test ends
            assert not _alive(pid), f"{name} (pid {pid}) survived close()"


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started = [await Server(name).start() for name in ("blue", "green", "red")]
    yield started
    for server in started:
        await server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1]
    return not status.startswith("Z")


def route(deployment_id: str, server: Server, **fields: Any) -> Route:
    return Route(
        deployment_id=deployment_id,
        prefix=route_prefix(deployment_id),
        upstream=Upstream(port=server.port),
        probe_path="/health",
        tag=server.name,
        **fields,
    )


def base(router: Router) -> str:
    return str(router.probe_url)  # type: ignore[attr-defined]


async def get(router: Router, path: str, **headers: str) -> tuple[int, str, str | None]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base(router) + path, headers=headers) as response,
    ):
        return response.status, await response.text(), response.headers.get(ROUTE_HEADER)


async def wait_status(router: Router, path: str, status: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while (got := (await get(router, path))[0]) != status:
        assert time.monotonic() < deadline, f"{path}: still {got}, wanted {status}"
        await asyncio.sleep(0.02)


async def test_create_serves_the_prefix_stripped(router: Router, servers: list[Server]) -> None:
    blue = route("app", servers[0])
    await router.apply(blue)
    assert await router.verify(blue, timeout_s=5)
    assert await get(router, "/apps/app/") == (200, "blue", router.stamp(blue))
    assert (await get(router, "/apps/app"))[:2] == (200, "blue")
    status, body, _ = await get(router, "/apps/app/echo/a/b?x=1")
    assert (status, body) == (200, "blue /echo/a/b?x=1 /apps/app")
    assert (await get(router, "/apps/appx/"))[0] == 404  # a prefix, not a string prefix
    assert (await get(router, "/apps/other/"))[0] == 404
    assert await router.served() == {"app": blue.token}
    assert router.url_for("app") == f"{base(router)}/apps/app/"


async def test_switch_is_one_verified_write(router: Router, servers: list[Server]) -> None:
    blue, green = route("app", servers[0]), route("app", servers[1])
    await router.apply(blue)
    assert await router.verify(blue, timeout_s=5)
    for target in (green, blue, green):
        started = time.monotonic()
        await router.apply(target)
        assert await router.verify(target, timeout_s=5)
        took = time.monotonic() - started
        # Once verified, every request goes to the new upstream.
        answers = await asyncio.gather(*(get(router, "/apps/app/") for _ in range(30)))
        assert {a[1] for a in answers} == {target.tag}, took
        assert (await router.served() or {}).get("app") == target.token
    assert not await router.verify(blue, timeout_s=0.2)  # verify tells the upstreams apart


async def test_verify_fails_for_a_route_never_applied(
    router: Router, servers: list[Server]
) -> None:
    assert not await router.verify(route("ghost", servers[0]), timeout_s=0.3)


async def test_remove(router: Router, servers: list[Server]) -> None:
    one, two = route("one", servers[0]), route("two", servers[1])
    for r in (one, two):
        await router.apply(r)
    assert await router.verify(two, timeout_s=5)
    await router.remove("one")
    await wait_status(router, "/apps/one/", 404)
    assert (await get(router, "/apps/two/"))[:2] == (200, "green")
    assert await router.served() == {"two": two.token}
    await router.remove("one")  # a missing route is not an error


async def test_concurrent_edits_all_land(router: Router, servers: list[Server]) -> None:
    routes = [route(f"app{i}", servers[i % 3]) for i in range(8)]
    await asyncio.gather(*(router.apply(r) for r in routes))
    assert all(await asyncio.gather(*(router.verify(r, timeout_s=5) for r in routes)))
    assert await router.served() == {r.deployment_id: r.token for r in routes}


async def test_host_rule(router: Router, servers: list[Server]) -> None:
    hosted = route("app", servers[0], host="agents.test")
    await router.apply(hosted)
    assert await router.verify(hosted, timeout_s=5)
    assert (await get(router, "/apps/app/", Host="agents.test"))[:2] == (200, "blue")
    assert (await get(router, "/apps/app/", Host="other.test"))[0] == 404


async def test_requests_in_flight_finish_on_the_old_upstream(
    router: Router, servers: list[Server]
) -> None:
    blue, green = route("app", servers[0]), route("app", servers[1])
    await router.apply(blue)
    assert await router.verify(blue, timeout_s=5)

    async def stream() -> tuple[int, list[str]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(base(router) + "/apps/app/stream?n=6") as response,
        ):
            return response.status, [line.decode().strip() async for line in response.content]

    slow = asyncio.create_task(get(router, "/apps/app/slow?s=1"))
    streaming = asyncio.create_task(stream())
    await asyncio.sleep(0.3)
    inflight = await router.inflight(blue.upstream)
    await router.apply(green)
    assert await router.verify(green, timeout_s=5)
    assert (await get(router, "/apps/app/"))[1] == "green"
    assert (await slow)[:2] == (200, "blue")
    assert await streaming == (200, [f"blue {i}" for i in range(6)])
    if inflight is not None:  # drain tracking, where the proxy can tell
        assert inflight == 2
        assert await router.inflight(green.upstream) == 0


async def test_health(router: Router) -> None:
    health = await router.health()
    assert health.ok, health.detail
    assert health.name == router.name and health.managed
    assert health.version and health.entrypoint == base(router)


async def test_restore_after_the_proxy_is_killed(router: Router, servers: list[Server]) -> None:
    routes = [route("one", servers[0]), route("two", servers[1])]
    for r in routes:
        await router.apply(r)
    assert await router.verify(routes[1], timeout_s=5)
    process = getattr(router, "process", None)
    if process is None:
        pytest.skip(f"router {router.name!r} runs no proxy process of its own to kill")
    os.kill(process.pid, signal.SIGKILL)
    await asyncio.wait_for(process.process.wait(), 5)
    assert await router.served() is None
    assert not (await router.health()).ok
    assert await router.revive()
    assert not await router.revive()  # running again: nothing to do
    await router.restore(routes)
    for r in routes:
        assert await router.verify(r, timeout_s=5)
    assert await router.served() == {r.deployment_id: r.token for r in routes}
    assert (await router.health()).ok


async def test_restore_after_the_proxy_lost_its_config(
    router: Router, servers: list[Server]
) -> None:
    routes = [route("one", servers[0]), route("two", servers[1])]
    for r in routes:
        await router.apply(r)
    assert await router.verify(routes[1], timeout_s=5)
    await lose_config(router)
    await wait_status(router, "/apps/one/", 404)
    assert await router.served() == {}
    assert sorted(await router.restore(routes)) == ["one", "two"]
    for r in routes:
        assert await router.verify(r, timeout_s=5)
    assert await router.restore(routes) == []  # nothing lost: nothing written


async def lose_config(router: Router) -> None:
    """What an operator's reload or a wiped directory does to dockyard's routes."""
    if router.name == "traefik":
        for path in router.directory.glob("*.yml"):  # type: ignore[attr-defined]
            path.unlink()
        deadline = time.monotonic() + 5
        while await router.served():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    elif router.name == "caddy":
        status, body, _ = await router._call("DELETE", "/id/dockyard-routes")  # type: ignore[attr-defined]
        assert status == 200, body
    else:
        pytest.skip(f"the suite does not know how to make router {router.name!r} lose its config")
