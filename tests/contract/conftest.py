"""Real engines for the runtime contract suite (``dockyard.testing.runtime_contract``, run
by ``test_runtime.py``): this conftest gives dockyard.testing its runtime under contract
(``dockyard_runtime_factory``) and engine probe, so the repository runs the same suite a
plugin author runs with ``--dockyard-runtime``.

Every test that asks for ``engine`` (or ``runtime``, ``test_image``) runs once per entry of
:data:`RUNTIMES`. Engines are private to the test session, started on first use, shared by
every module that uses them (:data:`ENGINES`) and stopped when the session ends:

- ``podman-rootful``: a ``podman system service`` started here, as root, on a socket in a
  temp dir;
- ``podman-rootless``: the same, started as the unprivileged user ``dockyard-test`` (created
  by ``contrib/ci/setup-podman.sh``) through ``runuser``; the root test process connects to
  its socket;
- ``docker``: a private ``dockerd`` (``tests/dockerd.py``: own socket, data and exec roots,
  containerd namespace and bridge network; no iptables), installed by
  ``contrib/ci/setup-docker.sh``.

An engine that cannot run here is skipped with the checked reason, except on CI
(``CI=true``), where it fails: CI must run every engine. To add a runtime, append its name
to :data:`RUNTIMES` and teach :func:`_start_engine` to start it.

Each :class:`Engine` also looks at its engine *without* going through the runtime under test
(the Podman CLI, the Docker API): containers by label, image labels, mounts, builds and
build leftovers. The end-to-end tests use those probes, so they stay engine-neutral.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dockyard.backends.docker import DockerRuntime
from dockyard.backends.podman import PodmanRuntime, PodmanService
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.router import Router
from dockyard.core.runtime import ContainerSpec, Runtime
from dockyard.testing.harness import (
    ON_CI,
    TEST_LABEL,
    TestImage,
    busybox_path,
    make_context,
    unavailable,
)
from tests.dockerd import DockerDaemon
from tests.proxies import PROXIES, proxy_settings, require

__all__ = ["ON_CI", "TEST_LABEL", "TestImage", "busybox_path", "make_context", "unavailable"]

TEST_USER = os.environ.get("DOCKYARD_TEST_USER", "dockyard-test")

PODMAN_RUNTIMES = [
    pytest.param("podman-rootful", marks=[pytest.mark.podman]),
    pytest.param("podman-rootless", marks=[pytest.mark.podman, pytest.mark.rootless]),
]
DOCKER_RUNTIMES = [pytest.param("docker", marks=[pytest.mark.docker])]
RUNTIMES = [*PODMAN_RUNTIMES, *DOCKER_RUNTIMES]


@dataclass
class Engine:
    """One running engine and how to reach it, plus engine-specific probes that look at it
    without going through the runtime under test."""

    kind: str
    url: str

    @property
    def rootless(self) -> bool:
        return False

    def make_runtime(self) -> Runtime:
        """A new, unopened runtime connected to this engine."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """``Settings`` fields that make a dockyard use this engine."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop what ``_start_engine`` started."""

    # ---- probes
    def container_names(self, labels: Mapping[str, str]) -> list[str]:
        """Names of all containers (running or not) carrying all of ``labels``, sorted."""
        raise NotImplementedError

    def image_labels(self, ref: str) -> dict[str, str]:
        """The labels of image ``ref``."""
        raise NotImplementedError

    def container_mounts(self, name: str) -> list[dict[str, Any]]:
        """The container's mounts as the engine's inspect shows them (``Destination``,
        ``RW``, ...)."""
        raise NotImplementedError

    def build_image(self, context: Path, tag: str) -> None:
        """Build ``context`` into ``tag`` with the engine itself, without network."""
        raise NotImplementedError

    def build_containers(self, name_part: str) -> list[str]:
        """Build containers left on the engine that belong to a build of ``name_part``."""
        raise NotImplementedError

    def build_container_lines(self) -> list[str]:
        """One line (name, image, ...) per build container left on the engine."""
        raise NotImplementedError


@dataclass
class PodmanEngine(Engine):
    """Podman, rootful or rootless; probed with the ``podman`` CLI as the engine's user.
    Without ``service`` (``url=""``) it only probes the local storage."""

    user: str | None = None
    service: PodmanService | None = None
    runtime_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def make_runtime(self) -> Runtime:
        return PodmanRuntime(socket=self.url, **self.runtime_kwargs)

    def settings(self) -> dict[str, Any]:
        # Without a service of its own, dockyard starts its private one (the production path).
        return {"runtime": "podman", "podman_socket": self.url or None}

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the engine's own CLI locally (not through the API), as the engine's user."""
        podman = shutil.which("podman") or "podman"
        if self.user is None:
            cmd = [podman, *args]
            cwd = None
        else:
            entry = pwd.getpwnam(self.user)
            runtime_dir = (self.service.runtime_dir if self.service else None) or (
                f"/run/user/{entry.pw_uid}"
            )
            cmd = [
                "runuser", "-u", self.user, "--", "env", "-i",
                f"HOME={entry.pw_dir}", f"XDG_RUNTIME_DIR={runtime_dir}",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                podman, *args,
            ]  # fmt: skip
            cwd = entry.pw_dir
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=cwd, timeout=60)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args).stdout or "null")

    def container_names(self, labels: Mapping[str, str]) -> list[str]:
        filters = [arg for k, v in labels.items() for arg in ("--filter", f"label={k}={v}")]
        out = self.cli("ps", "-a", *filters, "--format", "{{.Names}}").stdout
        return sorted(out.split())

    def image_labels(self, ref: str) -> dict[str, str]:
        return dict(
            json.loads(self.cli("image", "inspect", "--format", "{{json .Labels}}", ref).stdout)
        )

    def container_mounts(self, name: str) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("inspect", "--format", "{{json .Mounts}}", name).stdout))

    def build_image(self, context: Path, tag: str) -> None:
        self.cli("build", "--network", "none", "-t", tag, str(context))

    def build_containers(self, name_part: str) -> list[str]:
        rows = self.cli_json("ps", "--all", "--external", "--format", "json") or []
        names = [str(n) for row in rows for n in (row.get("Names") or [])]
        return [n for n in names if name_part in n]

    def build_container_lines(self) -> list[str]:
        out = self.cli("ps", "-a", "--external", "--format", "{{.Names}} {{.Image}}").stdout
        return out.splitlines()


@dataclass
class DockerEngine(Engine):
    """A private dockerd (rootful), probed through its API with the standard library."""

    daemon: DockerDaemon | None = None

    @property
    def _daemon(self) -> DockerDaemon:
        assert self.daemon is not None
        return self.daemon

    def make_runtime(self) -> Runtime:
        return DockerRuntime(socket=self.url, network=self._daemon.network)

    def settings(self) -> dict[str, Any]:
        options = {"socket": self.url, "network": self._daemon.network}
        return {"runtime": "docker", "plugins": {"docker": options}}

    def stop(self) -> None:
        self._daemon.stop()

    def container_names(self, labels: Mapping[str, str]) -> list[str]:
        found = self._daemon.api.containers(dict(labels))
        return sorted(str(c["Names"][0]).lstrip("/") for c in found)

    def image_labels(self, ref: str) -> dict[str, str]:
        image = self._daemon.api.json("GET", f"/images/{ref}/json")
        return dict((image.get("Config") or {}).get("Labels") or {})

    def container_mounts(self, name: str) -> list[dict[str, Any]]:
        return list(self._daemon.api.json("GET", f"/containers/{name}/json").get("Mounts") or [])

    def build_image(self, context: Path, tag: str) -> None:
        self._daemon.api.build(context, tag)

    def _build_rows(self) -> list[dict[str, Any]]:
        # The legacy builder runs each RUN step in a container created from the image id of
        # the previous step (never from a name), with a random name and no labels of ours.
        return [c for c in self._daemon.api.containers() if _is_image_id(str(c.get("Image")))]

    def build_containers(self, name_part: str) -> list[str]:
        # Build containers carry nothing of the image being built: on a private daemon any
        # build container is a leftover.
        return [str(c["Names"][0]).lstrip("/") for c in self._build_rows()]

    def build_container_lines(self) -> list[str]:
        return [
            f"{str(c['Names'][0]).lstrip('/')} {str(c['Id'])[:12]} {c['Image']} {c['Command']}"
            for c in self._build_rows()
        ]


def _is_image_id(value: str) -> bool:
    value = value.removeprefix("sha256:")
    return 12 <= len(value) <= 64 and all(ch in "0123456789abcdef" for ch in value)


def _check_root(kind: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{kind}: the test engines are started by root (rootful, and runuser)")


def _start_engine(kind: str) -> Engine:
    if kind == "docker":
        return _start_docker()
    if shutil.which("podman") is None:
        unavailable("podman is not installed: run contrib/ci/setup-podman.sh as root")
    _check_root(kind)
    if kind == "podman-rootful":
        service = PodmanService()
        url = service.start()
        return PodmanEngine(kind=kind, url=url, service=service)
    if kind == "podman-rootless":
        if shutil.which("runuser") is None:
            unavailable("runuser (util-linux) is missing: cannot run podman as another user")
        try:
            pwd.getpwnam(TEST_USER)
        except KeyError:
            unavailable(
                f"user {TEST_USER!r} does not exist: run contrib/ci/setup-podman.sh as root"
            )
        for path in ("/etc/subuid", "/etc/subgid"):
            try:
                entries = Path(path).read_text().splitlines()
            except OSError:
                entries = []
            if not any(line.split(":", 1)[0] == TEST_USER for line in entries):
                unavailable(f"{TEST_USER!r} has no range in {path}: run setup-podman.sh")
        tun = Path("/dev/net/tun")
        if tun.exists() and (tun.stat().st_mode & 0o666) != 0o666:
            mode = stat.filemode(tun.stat().st_mode)
            unavailable(f"/dev/net/tun is {mode}: slirp4netns needs chmod 666 (setup-podman.sh)")
        service = PodmanService(user=TEST_USER)
        url = service.start()
        return PodmanEngine(kind=kind, url=url, user=TEST_USER, service=service)
    raise AssertionError(f"unknown runtime {kind!r}")


def _start_docker() -> Engine:
    if shutil.which("dockerd") is None:
        unavailable("dockerd is not installed: run contrib/ci/setup-docker.sh as root")
    if importlib.util.find_spec("aiodocker") is None:
        unavailable("aiodocker is not installed: pip install -e '.[docker]'")
    _check_root("docker")
    daemon = DockerDaemon()
    try:
        url = daemon.start()
    except RuntimeError as exc:
        unavailable(f"a private dockerd did not start: {exc}")
    return DockerEngine(kind="docker", url=url, daemon=daemon)


class EnginePool:
    """Engines started on first use and stopped when the test session ends, so the
    contract suite, the backend tests and the end-to-end tests share one dockerd and one
    Podman service of each kind."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._sessions: set[int] = set()

    def get(self, kind: str, session: pytest.Session) -> Engine:
        if id(session) not in self._sessions:
            self._sessions.add(id(session))
            session.addfinalizer(self.stop_all)
        if kind not in self._engines:
            self._engines[kind] = _start_engine(kind)
        return self._engines[kind]

    def stop_all(self) -> None:
        engines, self._engines = self._engines, {}
        for started in engines.values():
            started.stop()


#: The session's engines.
ENGINES = EnginePool()


def engine_fixture(params: list[Any]) -> Any:
    """A session-scoped ``engine`` fixture over ``params`` (a subset of :data:`RUNTIMES`),
    for modules that test one engine family."""

    @pytest.fixture(scope="session", params=params)
    def engine(request: pytest.FixtureRequest) -> Engine:
        """A private engine for the session, one per param."""
        return ENGINES.get(str(request.param), request.session)

    return engine


engine = engine_fixture(RUNTIMES)


# The fixtures other engine test modules take from here (``contract.runtime`` ...) are
# dockyard.testing's, over the engine of the module's ``engine`` fixture (through
# ``dockyard_runtime_factory`` in ``tests/conftest.py``).
@pytest.fixture
def token(dockyard_token: str) -> str:
    """A short unique id for names and labels of one test."""
    return dockyard_token


@pytest.fixture
def runtime(dockyard_runtime: Runtime) -> Runtime:
    """An open runtime on ``engine``; containers labelled with ``token`` are removed after."""
    return dockyard_runtime


@pytest.fixture
def make_spec(dockyard_make_spec: Callable[..., ContainerSpec]) -> Callable[..., ContainerSpec]:
    """``make_spec(suffix, **fields)``: a ContainerSpec of the test image (dockyard.testing)."""
    return dockyard_make_spec


@pytest.fixture(scope="module")
def test_image(dockyard_test_image: TestImage) -> TestImage:
    """One image per engine and module, built through the runtime under test."""
    return dockyard_test_image


#: The built-in routers the router contract checks: ``caddy`` switches by rewriting an
#: upstream file, ``caddy-admin`` (the caddy router) through the admin API.
ROUTERS = [*PROXIES, "caddy-admin"]


@pytest.fixture(scope="session", params=ROUTERS)
def dockyard_router_factory(request: pytest.FixtureRequest) -> Callable[[Path], Router]:
    """dockyard.testing's router under contract: each built-in router running its own
    proxy on free loopback ports (skipped, or failed on CI, when the proxy is missing)."""
    name = str(request.param)
    require(name)
    pm = build_plugin_manager(load_entry_points=False)
    factory = pm.registries.routers.get(name.split("-")[0])

    def make(data_dir: Path) -> Router:
        router: Router = factory(proxy_settings(name, data_dir))
        return router

    return make
