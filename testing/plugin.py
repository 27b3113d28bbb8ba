"""dockyard.testing's pytest plugin (entry point ``pytest11``, loaded by any pytest run where
dockyard is installed): the options choosing the plugins under contract, and the fixtures
the contract suites and plugin tests build on.

Options (each may be repeated; the suites then run once per name):

- ``--dockyard-runtime=NAME``: the runtime the runtime contract checks;
- ``--dockyard-store=NAME``: the store the store contract checks;
- ``--dockyard-router=NAME``: the router the router contract checks.

Without them, the ini options ``dockyard_runtimes`` / ``dockyard_stores`` /
``dockyard_routers`` (a project's
``[tool.pytest.ini_options]``) name the defaults.

A name is resolved like ``dockyard serve`` resolves ``runtime = "..."``: through a plugin
manager that loads every entry point of the group ``dockyard``, so a plugin installed into
the test venv is found by the name it registers. Settings a plugin needs (``[plugins.x]``
options, a socket) come from the ``dockyard_settings`` fixture, which a ``conftest.py``
overrides. A repository that starts its engines itself (dockyard's own tests) overrides
``dockyard_runtime_factory`` / ``dockyard_store_factory`` instead of passing an option.

Fixtures (all prefixed ``dockyard_``, so they never shadow a project's own):
``dockyard_plugin_manager``, ``dockyard_settings``, ``dockyard_runtime_factory``,
``dockyard_runtime``, ``dockyard_engine_probe``, ``dockyard_test_image``,
``dockyard_make_spec``, ``dockyard_token``, ``dockyard_store_factory``,
``dockyard_router_factory`` and ``dockyard_app``
(a running dockyard, as a Litestar test client, with a given plugin set).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

try:
    import pytest_asyncio

    async_fixture: Any = pytest_asyncio.fixture
except ImportError:  # pip install 'dockyard[testing]': the suites need pytest-asyncio, but
    async_fixture = pytest.fixture  # a pytest run that uses none of them must still start

from dockyard.core.config import Settings
from dockyard.core.plugins import DockyardPluginManager, build_plugin_manager
from dockyard.core.router import Router
from dockyard.core.runtime import BuildRequest, BuiltImage, ContainerSpec, Limits, Runtime
from dockyard.core.store import StateStore
from dockyard.testing.harness import TEST_LABEL, EngineProbe, TestImage, make_context

#: ``(directory, (first port, last port))`` -> an unopened store; two stores made on one
#: directory share their state.
StoreFactory = Callable[[Path, tuple[int, int]], StateStore]
#: ``data_dir`` -> an unopened router (its proxy on free loopback ports, state in data_dir).
RouterFactory = Callable[[Path], Router]
#: The marker of runtime-contract tests that need containers that really run.
ENGINE_MARKER = "dockyard_engine"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dockyard", "dockyard plugin contracts (dockyard.testing)")
    group.addoption(
        "--dockyard-runtime",
        action="append",
        default=[],
        metavar="NAME",
        help="run the runtime contract against the runtime plugin NAME (repeatable)",
    )
    group.addoption(
        "--dockyard-store",
        action="append",
        default=[],
        metavar="NAME",
        help="run the store contract against the store plugin NAME (repeatable)",
    )

    group.addoption(
        "--dockyard-router",
        action="append",
        default=[],
        metavar="NAME",
        help="run the router contract against the router plugin NAME (repeatable)",
    )
    parser.addini(
        "dockyard_routers",
        "routers the router contract checks when --dockyard-router is not given",
        type="linelist",
        default=[],
    )
    parser.addini(
        "dockyard_runtimes",
        "runtimes the runtime contract checks when --dockyard-runtime is not given",
        type="linelist",
        default=[],
    )
    parser.addini(
        "dockyard_stores",
        "stores the store contract checks when --dockyard-store is not given",
        type="linelist",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line(
        "markers",
        f"{ENGINE_MARKER}: a runtime-contract test that needs containers that really run "
        '(deselect with -m "not dockyard_engine" for a runtime that runs nothing)',
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, option, ini in (
        ("dockyard_runtime_name", "dockyard_runtime", "dockyard_runtimes"),
        ("dockyard_store_name", "dockyard_store", "dockyard_stores"),
        ("dockyard_router_name", "dockyard_router", "dockyard_routers"),
    ):
        names = metafunc.config.getoption(option) or metafunc.config.getini(ini)
        if fixture in metafunc.fixturenames and names:
            metafunc.parametrize(fixture, names, scope="session")


def _no_option(kind: str) -> Any:
    pytest.fail(
        f"no {kind} under contract: pass --dockyard-{kind}=NAME (the name its plugin "
        f"registers), or override dockyard_{kind}_factory in a conftest.py",
        pytrace=False,
    )


# ------------------------------------------------------------------ plugins, settings
@pytest.fixture(scope="session")
def dockyard_plugin_manager() -> DockyardPluginManager:
    """The built-in plugins plus every installed entry point of the group ``dockyard``."""
    return build_plugin_manager()


@pytest.fixture(scope="session")
def dockyard_settings() -> dict[str, Any]:
    """Extra :class:`~dockyard.core.config.Settings` fields for the plugins under contract
    (e.g. ``{"plugins": {"myengine": {"socket": ...}}}``); override in a conftest.py."""
    return {}


@pytest.fixture(scope="session")
def dockyard_runtime_name() -> str:
    """The runtime under contract (``--dockyard-runtime``)."""
    return _no_option("runtime")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def dockyard_store_name() -> str:
    """The store under contract (``--dockyard-store``)."""
    return _no_option("store")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- runtime
@pytest.fixture(scope="module")
def dockyard_runtime_factory(
    dockyard_runtime_name: str,
    dockyard_plugin_manager: DockyardPluginManager,
    dockyard_settings: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[], Runtime]:
    """Makes new, unopened runtimes of the one under contract, as ``dockyard serve`` would."""
    factory = dockyard_plugin_manager.registries.runtimes.get(dockyard_runtime_name)
    data_dir = tmp_path_factory.mktemp("dockyard-runtime")
    fields = {"data_dir": str(data_dir), **dockyard_settings, "runtime": dockyard_runtime_name}

    def make() -> Runtime:
        runtime: Runtime = factory(Settings(**fields))
        return runtime

    return make


@pytest.fixture(scope="module")
def dockyard_engine_probe() -> EngineProbe | None:
    """Looks at the engine without the runtime under test; None: no such checks."""
    return None


@pytest.fixture
def dockyard_token() -> str:
    """A short unique id for names and labels of one test."""
    return uuid.uuid4().hex[:10]


@async_fixture
async def dockyard_runtime(
    dockyard_runtime_factory: Callable[[], Runtime], dockyard_token: str
) -> AsyncIterator[Runtime]:
    """An open runtime under contract; containers labelled with the test's token are
    removed afterwards."""
    runtime = dockyard_runtime_factory()
    await runtime.open()
    try:
        yield runtime
    finally:
        try:
            for info in await runtime.list({TEST_LABEL: dockyard_token}):
                await runtime.remove(info.id)
        finally:
            await runtime.close()


@pytest.fixture(scope="module")
def dockyard_test_image(
    dockyard_runtime_factory: Callable[[], Runtime], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestImage]:
    """One busybox image per runtime and test module, built through the runtime under
    test (module-scoped like the factory: a module may choose its own engines)."""
    suffix = uuid.uuid4().hex[:10]
    name = f"dockyard-contract-{suffix}"
    tag = f"localhost/{name}:v1"
    greeting = f"hello-{suffix}"
    context = make_context(tmp_path_factory.mktemp("image"))

    async def build() -> BuiltImage:
        runtime = dockyard_runtime_factory()
        await runtime.open()
        try:
            request = BuildRequest(
                context=str(context),
                tag=tag,
                build_args={"GREETING": greeting},
                labels={TEST_LABEL: "image"},
                timeout_s=120,
            )
            return await runtime.build(request)
        finally:
            await runtime.close()

    async def remove() -> None:
        runtime = dockyard_runtime_factory()
        await runtime.open()
        try:
            await runtime.remove_image(tag, force=True)
        finally:
            await runtime.close()

    built = asyncio.run(build())
    try:
        yield TestImage(tag=tag, built=built, greeting=greeting, context=context, name=name)
    finally:
        asyncio.run(remove())


@pytest.fixture
def dockyard_make_spec(
    dockyard_token: str, dockyard_test_image: TestImage
) -> Callable[..., ContainerSpec]:
    """``make_spec(suffix, **fields)``: a ContainerSpec of the test image, uniquely named and
    labelled for cleanup; small limits so they are visible."""
    counter = 0

    def make(suffix: str = "", **fields: Any) -> ContainerSpec:
        nonlocal counter
        counter += 1
        labels = {TEST_LABEL: dockyard_token, **fields.pop("labels", {})}
        values: dict[str, Any] = {
            "name": f"dyc-{dockyard_token}-{suffix or counter}",
            "image": dockyard_test_image.tag,
            "container_port": 8080,
            "labels": labels,
            "limits": Limits(memory_mb=96, cpus=0.5, pids=64, tmpfs_mb=16),
        }
        values.update(fields)
        return ContainerSpec(**values)

    return make


# ----------------------------------------------------------------------------- store
@pytest.fixture(scope="session")
def dockyard_store_factory(
    dockyard_store_name: str,
    dockyard_plugin_manager: DockyardPluginManager,
    dockyard_settings: dict[str, Any],
) -> StoreFactory:
    """Makes unopened stores of the one under contract on a directory and a port pool."""
    factory = dockyard_plugin_manager.registries.stores.get(dockyard_store_name)

    def make(directory: Path, port_range: tuple[int, int]) -> StateStore:
        fields = {
            **dockyard_settings,
            "data_dir": str(directory),
            "store": dockyard_store_name,
            "port_range_start": port_range[0],
            "port_range_end": port_range[1],
        }
        store: StateStore = factory(Settings(**fields))
        return store

    return make


# ---------------------------------------------------------------------------- router
@pytest.fixture(scope="session")
def dockyard_router_name() -> str:
    """The router under contract (``--dockyard-router``)."""
    return _no_option("router")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def dockyard_router_factory(
    dockyard_router_name: str,
    dockyard_plugin_manager: DockyardPluginManager,
    dockyard_settings: dict[str, Any],
) -> RouterFactory:
    """Makes unopened routers of the one under contract on a data directory; its proxy
    options (listen addresses, ...) come from ``dockyard_settings``."""
    factory = dockyard_plugin_manager.registries.routers.get(dockyard_router_name)

    def make(data_dir: Path) -> Router:
        fields = {**dockyard_settings, "data_dir": str(data_dir), "router": dockyard_router_name}
        router: Router = factory(Settings(**fields))
        return router

    return make


# ------------------------------------------------------------------ a running dockyard
@pytest.fixture
def dockyard_app(tmp_path: Path) -> Any:
    """``with dockyard_app(extra_plugins=[...], **settings) as client``: a running dockyard
    (its lifespan started) as a Litestar test client authenticated as an admin.

    ``extra_plugins``: ``(name, module or object)`` pairs registered on top of the built-ins;
    ``entry_points``: also load the installed ``dockyard`` entry points (default True);
    ``settings``: :class:`~dockyard.core.config.Settings` fields (``runtime="example"``,
    ``plugins={"example": {...}}`` for plugin options).
    The data directory is the test's own; rate limits and the health monitor are off.
    """
    from litestar.testing import TestClient

    from dockyard.api.app import create_app
    from dockyard.core.services import Services

    @contextlib.contextmanager
    def make(
        extra_plugins: Sequence[tuple[str, object]] = (),
        *,
        entry_points: bool = True,
        **settings: Any,
    ) -> Iterator[TestClient[Any]]:
        token_id = secrets.token_hex(4)
        token = f"dy_{token_id}_{secrets.token_urlsafe(32)[:43]}"
        digest = hashlib.sha256(token.encode()).hexdigest()
        fields: dict[str, Any] = {
            "data_dir": str(tmp_path / "dockyard"),
            "api_tokens": [
                {"id": token_id, "name": "tests", "scopes": ["admin"], "sha256": digest}
            ],
            "rate_limit_per_ip": 0,
            "rate_limit_per_token": 0,
            "monitor_interval_s": 0,
            **settings,
        }
        cfg = Settings(**fields)
        pm = build_plugin_manager(load_entry_points=entry_points, extra_plugins=list(extra_plugins))
        services = Services.build(cfg, pm)
        with TestClient(create_app(cfg, services=services)) as client:
            client.headers.update({"Authorization": f"Bearer {token}"})
            yield client

    return make
