"""The build egress proxy end to end: real rootful Podman (dockyard's private service),
real squid, the real build firewall, a real git server and a PEP 503 index on loopback.

One dockyard with ``build_proxy = "squid"``, the index's address as the only allowlisted
host and ``python:3.11-slim`` aliased to the offline base image:

* a repository whose Dockerfile runs ``pip install -r requirements.txt`` builds (its
  package comes from the index, through the proxy) and serves; the same build tries to
  reach a host that is not allowlisted, the host's other loopback service (both through
  the proxy), a service of the host on another address and a private address (both
  bypassing it) and another container, and every one fails; the build log carries the
  proxy's record; the proxy variables are in neither the image's config nor its history;
* a download over the per-build cap is stopped, plain HTTP and inside a ``CONNECT``
  tunnel alike;
* a ``FROM`` that maps to no local image fails before building, naming the image;
* a build that fails after its proxy refused a host carries ``host:port`` as data;
* two concurrent builds each reach their own proxy only;
* pointing an alias at another image (or rebuilding the one it names) builds again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.conftest import AUTH, TEST_SETTINGS
from tests.contract import conftest as contract
from tests.gitserver import GitDaemon, RepoBuilder

pytestmark = [pytest.mark.slow, pytest.mark.podman]

PACKAGE = "dockyardprobe"
VALUE = "served-through-the-build-proxy"
CAP = 4 * 1024 * 1024
BIG = 4 * CAP
#: The data directory of the module's dockyard (its build proxies' pid files).
DATA: dict[str, Path] = {}
HEALTH = {"interval_s": 0.3, "timeout_s": 2, "deadline_s": 40}


def wheel() -> tuple[str, bytes]:
    """A pure-Python wheel made here (no network): ``dockyardprobe`` with ``VALUE``."""
    name = f"{PACKAGE}-1.0-py3-none-any.whl"
    info = f"{PACKAGE}-1.0.dist-info"
    files = {
        f"{PACKAGE}.py": f"VALUE = {VALUE!r}\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return name, buffer.getvalue()


def pip_wheel() -> Path:
    """The pip wheel this Python bundles (``ensurepip``): the offline base image has no
    pip, so the build fetches it through the proxy as well."""
    import ensurepip

    found = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not found:
        pytest.fail(f"no bundled pip wheel next to {ensurepip.__file__}")
    return found[-1]


class Index(http.server.ThreadingHTTPServer):
    """A PEP 503 simple index with one wheel, pip's wheel under ``/files/``, and
    ``/big.bin`` (:data:`BIG` bytes)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.wheel_name, self.wheel = wheel()
        self.pip = pip_wheel()
        self.hits: list[str] = []
        super().__init__((host, 0), IndexHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class IndexHandler(http.server.BaseHTTPRequestHandler):
    server: Index

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        digest = hashlib.sha256(self.server.wheel).hexdigest()
        pages = {
            f"/simple/{PACKAGE}/": (
                f'<a href="/files/{self.server.wheel_name}#sha256={digest}">'
                f"{self.server.wheel_name}</a>"
            ).encode(),
            f"/files/{self.server.wheel_name}": self.server.wheel,
            f"/files/{self.server.pip.name}": self.server.pip.read_bytes(),
            "/big.bin": b"x" * BIG,
            "/": b"other service\n",
        }
        body = pages.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        html = self.path.startswith("/simple/")
        self.send_header("Content-Type", "text/html" if html else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Index]]:
    """The index (allowlisted), another loopback service, and a service of the host bound
    to every address (neither allowlisted)."""
    found = {"index": Index(), "other": Index(), "host": Index("0.0.0.0")}
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in found.values()]
    for thread in threads:
        thread.start()
    try:
        yield found
    finally:
        for server in found.values():
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def client(
    servers: dict[str, Index], offline_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient[Any]]:
    """One dockyard on rootful Podman with the build proxy on."""
    from dockyard.api.app import create_app
    from dockyard.core.config import Settings

    if shutil.which("squid") is None:
        pytest.fail("squid is not installed: run contrib/ci/setup-podman.sh")
    data = DATA["dir"] = tmp_path_factory.mktemp("data")
    settings = Settings(
        **TEST_SETTINGS,
        data_dir=str(data),
        insecure_sources=True,
        port_range_start=62900,
        port_range_end=62920,
        build_timeout_s=240,
        build_proxy="squid",
        build_proxy_allow=[f"127.0.0.1:{servers['index'].port}"],
        build_proxy_max_bytes=CAP,
        base_image_aliases={"python:3.11-slim": offline_base_image},
    )
    with TestClient(create_app(settings), timeout=300) as c:
        c.headers.update(AUTH)
        yield c
        # What the tests deployed: nothing may stay.
        for name in ("cap", "app", "nobase", "refused", "holder", "prober"):
            assert c.delete(f"/v1/repos/{name}").status_code in (200, 404)


@pytest.fixture(scope="module")
def git(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GitDaemon, RepoBuilder]]:
    root = tmp_path_factory.mktemp("repos") / "served"
    builder = RepoBuilder(root)
    with GitDaemon(root) as daemon:
        yield daemon, builder


@pytest.fixture(scope="module")
def neighbour() -> Iterator[str]:
    """Another container (on Podman's default network: each build has a network of its
    own), listening: its address."""
    name = f"dockyard-test-neighbour-{uuid.uuid4().hex[:8]}"
    holder: dict[str, str] = {}

    def start(image: str) -> str:
        subprocess.run(
            ["podman", "run", "-d", "--name", name, "--network", "podman", image,
             "python3", "-m", "http.server", "8080"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        out = subprocess.run(
            ["podman", "inspect", name], check=True, capture_output=True, timeout=60
        ).stdout
        networks = json.loads(out)[0]["NetworkSettings"]["Networks"]
        holder["ip"] = networks["podman"]["IPAddress"]
        return holder["ip"]

    try:
        yield start  # type: ignore[misc]
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=120)


PROBE = """\
import os, socket, sys, urllib.request, urllib.error

proxy = os.environ["HTTP_PROXY"]
gateway = proxy.split("//")[1].split(":")[0]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
reached = []

def through_proxy(name, url):
    try:
        opener.open(url, timeout=10).read()
        reached.append(name)
        print(f"probe {name}: REACHED", flush=True)
    except urllib.error.HTTPError as exc:
        print(f"probe {name}: blocked (proxy said {exc.code})", flush=True)
    except OSError as exc:
        print(f"probe {name}: blocked ({exc})", flush=True)

def direct(name, host, port):
    try:
        socket.create_connection((host, port), timeout=4).close()
        reached.append(name)
        print(f"probe {name}: REACHED", flush=True)
    except OSError as exc:
        print(f"probe {name}: blocked ({exc})", flush=True)

through_proxy("not-allowlisted", "http://pypi.org/simple/")
through_proxy("host-loopback", "http://127.0.0.1:%(other)d/")
direct("host-service", gateway, %(host)d)
direct("private-address", "192.0.2.1", 80)
direct("other-container", "%(neighbour)s", 8080)
print("probe env:", sorted(k for k in os.environ if "proxy" in k.lower()), flush=True)
sys.exit(1 if reached else 0)
"""

APP_DOCKERFILE = """\
FROM python:3.11-slim
COPY requirements.txt probe.py /app/
RUN python3 /app/probe.py
# The offline base image (Debian's python3) has no pip and is "externally managed": pip
# comes from the index through the proxy too, and may install into the system.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN python3 -c "import urllib.request as u; u.urlretrieve('%(pip_url)s', '/tmp/%(pip)s')" \\
    && python3 /tmp/%(pip)s/pip install --no-cache-dir --no-index /tmp/%(pip)s \\
    && rm /tmp/%(pip)s
RUN pip install --no-cache-dir --disable-pip-version-check -r /app/requirements.txt
RUN mkdir -p /www && echo ok > /www/health \\
    && python3 -c "import dockyardprobe; open('/www/index.html', 'w').write(dockyardprobe.VALUE)"
CMD ["python3", "-m", "http.server", "8000", "--directory", "/www"]
"""

CAP_PROBE = """\
import os, socket, urllib.request
proxy = os.environ["HTTP_PROXY"]
host, port = proxy.split("//")[1].split(":")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
try:
    got = len(opener.open("http://127.0.0.1:%(index)d/big.bin", timeout=20).read())
except Exception as exc:
    got = f"refused ({exc})"
print("cap plain:", got, flush=True)
sock = socket.create_connection((host, int(port)), timeout=20)
sock.sendall(b"CONNECT 127.0.0.1:%(index)d HTTP/1.1\\r\\nHost: 127.0.0.1:%(index)d\\r\\n\\r\\n")
head = sock.recv(4096)
print("cap tunnel:", head.split(b"\\r\\n")[0].decode(), flush=True)
sock.sendall(b"GET /big.bin HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n")
total = 0
try:
    while chunk := sock.recv(65536):
        total += len(chunk)
except OSError as exc:
    print("cap tunnel stopped:", exc, flush=True)
print("cap tunnel bytes:", total, flush=True)
raise SystemExit(1)  # the build fails: its log is the evidence
"""


def _deploy(client: TestClient[Any], **spec: Any) -> dict[str, Any]:
    r = client.post("/v1/repos?wait=true&timeout=280", json={"health": HEALTH, **spec})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _build_log(client: TestClient[Any], dep: str) -> str:
    r = client.get(f"/v1/repos/{dep}/logs?build=true&tail=2000")
    assert r.status_code == 200, r.text
    return "\n".join(r.json()["lines"])


def _slot(body: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in body["slots"] if s["state"] != "EMPTY")


def test_download_over_the_cap_is_stopped(
    client: TestClient[Any], git: tuple[GitDaemon, RepoBuilder], servers: dict[str, Index]
) -> None:
    daemon, builder = git
    repo = builder.new("cap")
    repo.write("probe.py", CAP_PROBE % {"index": servers["index"].port})
    repo.write("Dockerfile", "FROM python:3.11-slim\nCOPY probe.py /\nRUN python3 /probe.py\n")
    repo.commit("cap")
    body = _deploy(client, id="cap", repo=f"{daemon.url}/cap.git")
    log = _build_log(client, "cap")
    # Plain HTTP: squid refuses the reply over the cap (reply_body_max_size).
    assert "cap plain: refused" in log, log
    # Inside a CONNECT tunnel: the build firewall's quota resets the connection.
    assert "cap tunnel: HTTP/1.1 200" in log, log
    tunnel = int(log.split("cap tunnel bytes: ")[1].split()[0])
    assert tunnel < BIG, log
    assert "build proxy: download cap reached" in log, log
    assert "build proxy: allowed CONNECT 127.0.0.1" in log, log
    slot = _slot(body)
    assert (slot["state"], slot["reason"]) == ("FAILED", "build_failed"), slot
    # The failed build's log ends with the proxy's summary (what an evaluation's
    # build_log_tail carries).
    assert log.splitlines()[-1].startswith("dockyard: build_failed"), log[-2000:]
    assert "build proxy: download cap reached" in "\n".join(log.splitlines()[-6:])


def test_a_failed_build_carries_the_hosts_its_proxy_refused(
    client: TestClient[Any], git: tuple[GitDaemon, RepoBuilder]
) -> None:
    """The refused hosts come from the proxy's summary as data: in the deploy's failure
    (``GET /v1/repos/{id}``) and the FAILED slot's event (what an evaluation reads)."""
    daemon, builder = git
    repo = builder.new("refused")
    repo.write(
        "Dockerfile",
        "FROM python:3.11-slim\n"
        "RUN python3 -c \"import urllib.request as u; u.urlopen('http://pypi.org/simple/', "
        'timeout=10)"\n',
    )
    repo.commit("refused")
    body = _deploy(client, id="refused", repo=f"{daemon.url}/refused.git")
    slot = _slot(body)
    assert (slot["state"], slot["reason"]) == ("FAILED", "build_failed"), body
    error = body["operation"]["error"]
    assert error["detail"]["build_refused"] == ["pypi.org:80"], error
    events = client.get("/v1/repos/refused/events").json()
    failed = [e for e in events if e.get("to_state") == "FAILED"]
    assert failed and failed[-1]["data"]["build_refused"] == ["pypi.org:80"], failed
    assert "build proxy refused: pypi.org:80" in _build_log(client, "refused")


def test_pip_install_through_the_proxy_builds_and_serves(
    client: TestClient[Any],
    git: tuple[GitDaemon, RepoBuilder],
    servers: dict[str, Index],
    neighbour: Any,
) -> None:
    daemon, builder = git
    if not any(servers["index"].hits):  # the network is made by dockyard's first build
        test_download_over_the_cap_is_stopped(client, git, servers)
    neighbour_ip = neighbour("localhost/dockyard/base-python:bookworm")
    index = servers["index"].port
    repo = builder.new("app")
    repo.write(
        "requirements.txt",
        f"--index-url http://127.0.0.1:{index}/simple/\n--trusted-host 127.0.0.1\n{PACKAGE}\n",
    )
    repo.write(
        "probe.py",
        PROBE % {"other": servers["other"].port, "host": servers["host"].port,
                 "neighbour": neighbour_ip},
    )  # fmt: skip
    pip = servers["index"].pip.name
    pip_url = f"http://127.0.0.1:{index}/files/{pip}"
    repo.write("Dockerfile", APP_DOCKERFILE % {"pip": pip, "pip_url": pip_url})
    repo.commit("app")
    body = _deploy(client, id="app", repo=f"{daemon.url}/app.git")
    log = _build_log(client, "app")
    slot = _slot(body)
    assert slot["state"] == "PROMOTED", f"{slot}\n{log}"

    # It serves what the package from the index says.
    with urllib.request.urlopen(f"http://127.0.0.1:{slot['host_port']}/", timeout=10) as r:
        assert r.read().decode() == VALUE
    assert any(hit.startswith(f"/simple/{PACKAGE}/") for hit in servers["index"].hits)
    assert servers["other"].hits == [] and servers["host"].hits == []

    # Every way around the proxy failed, each checked.
    for name in ("not-allowlisted", "host-loopback", "host-service", "private-address",
                 "other-container"):  # fmt: skip
        assert f"probe {name}: blocked" in log, (name, log)
    assert "REACHED" not in log
    assert "probe not-allowlisted: blocked (proxy said 403)" in log
    assert "probe host-loopback: blocked (proxy said 403)" in log

    # The proxy's record is in the build log: allowed, refused, bytes, refused hosts.
    assert f"build proxy: allowed GET 127.0.0.1:{index}" in log, log
    assert "build proxy: REFUSED GET pypi.org:80" in log, log
    assert f"build proxy: REFUSED GET 127.0.0.1:{servers['other'].port}" in log, log
    assert "build proxy refused: pypi.org:80" in log, log
    assert "base image python:3.11-slim -> localhost/dockyard/base-python:bookworm" in log

    # The proxy variables were build args: not in the image's config or history.
    image = subprocess.run(
        ["podman", "inspect", "--format", "{{.Image}}", "dockyard-app-" + slot["color"]],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    inspect = subprocess.run(
        ["podman", "image", "inspect", image], check=True, capture_output=True, text=True
    ).stdout
    history = subprocess.run(
        ["podman", "history", "--no-trunc", image], check=True, capture_output=True, text=True
    ).stdout
    for text in (inspect, history):
        assert "proxy" not in text.lower(), text
    # The proxy is gone with its build.
    assert _squids() == []


HOLDER_DOCKERFILE = """\
FROM python:3.11-slim
RUN python3 -c "import time; time.sleep(90)"
"""

PROBER = """\
import os, urllib.request
own = os.environ["HTTP_PROXY"]
gateway = own.split("//")[1].split(":")[0]
index = "http://127.0.0.1:%(index)d/simple/%(package)s/"

def fetch(name, proxy):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        opener.open(index, timeout=10).read()
        print(f"prober {name}: REACHED", flush=True)
    except OSError as exc:
        print(f"prober {name}: blocked ({exc})", flush=True)

fetch("own-proxy", own)
fetch("other-port-own-gateway", f"http://{gateway}:{os.environ['OTHER_PORT']}")
fetch("other-port-other-gateway", f"http://{os.environ['OTHER_GATEWAY']}:{os.environ['OTHER_PORT']}")
"""

PROBER_DOCKERFILE = """\
FROM python:3.11-slim
ARG OTHER_PORT
ARG OTHER_GATEWAY
COPY prober.py /
RUN python3 /prober.py
"""


def test_concurrent_builds_reach_only_their_own_proxy(
    client: TestClient[Any],
    git: tuple[GitDaemon, RepoBuilder],
    servers: dict[str, Index],
) -> None:
    """Two builds at once: each on a network of its own, each admitted to its own proxy
    alone. While one build holds its proxy, the other reaches the allowlisted index
    through its own, and not through the first one's port (neither at its own network's
    address nor at the first one's)."""
    daemon, builder = git
    holder = builder.new("holder")
    holder.write("Dockerfile", HOLDER_DOCKERFILE)
    holder.commit("holder")
    r = client.post("/v1/repos", json={"id": "holder", "repo": f"{daemon.url}/holder.git"})
    assert r.status_code in (200, 201, 202), r.text
    proxies = DATA["dir"] / "build-proxy"
    deadline = time.monotonic() + 120
    found: list[Path] = []
    while not found and time.monotonic() < deadline:
        found = list(proxies.glob("*.pid"))
        time.sleep(0.2)
    assert found, "the holder's build proxy never started"
    record = json.loads(found[0].read_text())
    holder_net = f"dockyard-build-{found[0].stem[:12]}"
    inspect = subprocess.run(
        ["podman", "network", "inspect", holder_net],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    holder_gateway = json.loads(inspect)[0]["subnets"][0]["gateway"]

    prober = builder.new("prober")
    prober.write("prober.py", PROBER % {"index": servers["index"].port, "package": PACKAGE})
    prober.write("Dockerfile", PROBER_DOCKERFILE)
    prober.commit("prober")
    args = {"OTHER_PORT": str(record["port"]), "OTHER_GATEWAY": holder_gateway}
    _deploy(client, id="prober", repo=f"{daemon.url}/prober.git", build_args=args)
    log = _build_log(client, "prober")
    assert "prober own-proxy: REACHED" in log, log
    assert "prober other-port-own-gateway: blocked" in log, log
    assert "prober other-port-other-gateway: blocked" in log, log
    assert f"build proxy: allowed GET 127.0.0.1:{servers['index'].port}" in log, log
    # The holder's build (and its proxy) still ran while the prober's did.
    assert found[0].exists(), "the holder's proxy ended before the prober's build"
    assert client.delete("/v1/repos/holder").status_code in (200, 202, 404)


def _squids() -> list[str]:
    """Command lines of the build proxies running on this host (any dockyard's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "squid" in cmd and "dockyard-build-proxy-" in cmd:
            found.append(cmd)
    return found


def test_from_without_a_local_image_fails_before_building(
    client: TestClient[Any], git: tuple[GitDaemon, RepoBuilder]
) -> None:
    daemon, builder = git
    repo = builder.new("nobase")
    repo.write("Dockerfile", "FROM python:3.12-bogus\nRUN exit 0\n")
    repo.commit("nobase")
    started = time.monotonic()
    body = _deploy(client, id="nobase", repo=f"{daemon.url}/nobase.git")
    slot = _slot(body)
    assert slot["state"] == "FAILED", body
    assert "python:3.12-bogus" in str(slot["message"]), body
    assert "base_image_aliases" in str(slot["message"]), body
    assert time.monotonic() - started < 60


# ------------------------------------------------- where the proxy cannot hold: refused
engine = contract.engine_fixture([*contract.PODMAN_RUNTIMES, *contract.DOCKER_RUNTIMES])


async def test_a_build_proxy_that_cannot_hold_refuses_the_build(
    engine: contract.Engine, tmp_path: Path
) -> None:
    """Rootless Podman (its bridges are out of the host firewall's reach), Docker (not
    supported), and rootful Podman without ``nft``: the build is refused before it starts,
    with ``network_policy_failed`` and the reason; no squid is left."""
    from dockyard.backends.engine.build_egress import BuildEgressConfig
    from dockyard.core.build_egress import parse_allowlist
    from dockyard.core.errors import BuildFailed
    from dockyard.core.runtime import BuildRequest

    runtime: Any = engine.make_runtime()
    runtime.build_egress = BuildEgressConfig(mode="squid", allow=parse_allowlist(["127.0.0.1:9"]))
    rootful_podman = engine.kind.startswith("podman") and not engine.rootless
    if rootful_podman:
        runtime.options.nft_path = "/nonexistent/nft"
        runtime.options.state_dir = str(tmp_path / "state")
    context = tmp_path / "ctx"
    context.mkdir()
    shutil.copy2(contract.busybox_path(), context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /busybox\nRUN ["/busybox", "true"]\n'
    )
    await runtime.open()
    try:
        with pytest.raises(BuildFailed) as refused:
            await runtime.build(
                BuildRequest(
                    context=str(context), tag=f"localhost/dockyard-test/bp:{uuid.uuid4().hex[:8]}"
                )
            )
    finally:
        await runtime.close()
    assert refused.value.reason == "network_policy_failed", refused.value.message
    message = refused.value.message
    if rootful_podman:
        assert "nft" in message and "not started" in message, message
    elif engine.kind == "docker":
        assert "cannot hold builds to their proxy" in message, message
    else:
        assert "rootless" in message, message
    assert _squids() == []


test_image = contract.test_image


async def test_base_image_aliases_on_every_engine(
    engine: contract.Engine, test_image: contract.TestImage, tmp_path: Path
) -> None:
    """``FROM`` and ``COPY --from`` an aliased name build from the local image it maps to
    (the checkout's Dockerfile untouched); a name that maps to nothing is refused before
    the build, naming it."""
    from dockyard.backends.engine.build_egress import BuildEgressConfig
    from dockyard.core.errors import BuildFailed
    from dockyard.core.runtime import BuildRequest

    runtime: Any = engine.make_runtime()
    runtime.build_egress = BuildEgressConfig(aliases={"python:3.11-slim": test_image.tag})
    context = tmp_path / "ctx"
    context.mkdir()
    dockerfile = (
        "FROM docker.io/library/python:3.11-slim AS base\n"
        "COPY --from=python:3.11-slim /www/health /copied\n"
        'RUN ["/bin/busybox", "cat", "/copied"]\n'
    )
    (context / "Dockerfile").write_text(dockerfile)
    tag = f"localhost/dockyard-test/alias:{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    await runtime.open()
    try:
        built = await runtime.build(BuildRequest(context=str(context), tag=tag), lines.append)
        assert built.id
        note = f"base image docker.io/library/python:3.11-slim -> {test_image.tag}"
        assert any(line.startswith(note) for line in lines), lines
        assert any('{"status": "ok"}' in line for line in lines), lines
        await runtime.remove_image(tag)
        (context / "Dockerfile").write_text("FROM python:3.12-bogus\n")
        with pytest.raises(BuildFailed, match=r"python:3.12-bogus.*base_image_aliases"):
            await runtime.build(BuildRequest(context=str(context), tag=tag))
    finally:
        await runtime.close()
    assert (context / "Dockerfile").read_text() == "FROM python:3.12-bogus\n"


async def test_an_alias_pointed_elsewhere_builds_again(
    engine: contract.Engine, test_image: contract.TestImage, tmp_path: Path
) -> None:
    """The local image an alias maps to (name and id) is a build input: rebuilding that
    image, or mapping the alias to another one, never reuses an image built from the old
    base; the same mapping does."""
    from dockyard.backends.engine.build_egress import BuildEgressConfig
    from dockyard.core.builds import Builder
    from dockyard.core.models import DeploymentSpec
    from dockyard.core.runtime import BuildRequest
    from dockyard.core.source import FetchedSource

    runtime: Any = engine.make_runtime()
    suffix = uuid.uuid4().hex[:8]
    target = f"localhost/dockyard-test/alias-base:{suffix}"
    base_ctx, app = tmp_path / "base", tmp_path / "app"
    base_ctx.mkdir()
    app.mkdir()
    (app / "Dockerfile").write_text("FROM python:3.11-slim\nLABEL app=alias\n")
    source = FetchedSource(
        repo="https://example.test/acme/alias", ref=None, resolved_ref=None,
        commit="b" * 40, checkout=str(app), context=str(app),
        dockerfile=str(app / "Dockerfile"),
    )  # fmt: skip
    spec = DeploymentSpec(id="alias", repo=source.repo)
    made: list[str] = []

    async def base(version: str) -> None:
        (base_ctx / "Dockerfile").write_text(f"FROM {test_image.tag}\nLABEL v={version}\n")
        built = await runtime.build(BuildRequest(context=str(base_ctx), tag=target))
        made.append(built.id)

    await runtime.open()
    try:
        await base("1")
        builder = Builder(runtime=runtime, base_image_aliases={"python:3.11-slim": target})
        runtime.build_egress = BuildEgressConfig(aliases=builder.base_image_aliases)
        first = await builder.build(spec, source)
        made.append(first.image)
        assert (await builder.build(spec, source)).reused is True
        await base("2")  # the same name, another image
        rebuilt = await builder.build(spec, source)
        made.append(rebuilt.image)
        assert rebuilt.reused is False and rebuilt.image != first.image
        elsewhere = Builder(
            runtime=runtime, base_image_aliases={"python:3.11-slim": test_image.tag}
        )
        runtime.build_egress = BuildEgressConfig(aliases=elsewhere.base_image_aliases)
        other = await elsewhere.build(spec, source)
        made.append(other.image)
        assert other.reused is False and other.image not in (first.image, rebuilt.image)
    finally:
        for ref in reversed([*made, target]):
            with contextlib.suppress(Exception):
                await runtime.remove_image(ref, force=True)
        await runtime.close()


# ------------------------------------------- build_proxy = "attach": the operator's proxy
ATTACHED_PROBE = """\
import os, socket, urllib.request, urllib.error
proxy = os.environ["HTTP_PROXY"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
def through_proxy(name, url):
    try:
        opener.open(url, timeout=10).read()
        print(f"attached {name}: REACHED", flush=True)
    except urllib.error.HTTPError as exc:
        print(f"attached {name}: blocked (proxy said {exc.code})", flush=True)
    except OSError as exc:
        print(f"attached {name}: blocked ({exc})", flush=True)
def direct(name, host, port):
    try:
        socket.create_connection((host, port), timeout=4).close()
        print(f"attached {name}: REACHED", flush=True)
    except OSError as exc:
        print(f"attached {name}: blocked ({exc})", flush=True)
print("attached proxy:", proxy, flush=True)
through_proxy("index", "http://127.0.0.1:%(index)d/simple/%(package)s/")
through_proxy("not-allowlisted", "http://pypi.org/simple/")
direct("host-service", "%(address)s", %(host)d)
"""

ATTACHED_DOCKERFILE = """\
FROM python:3.11-slim
COPY probe.py /
RUN python3 /probe.py
RUN mkdir -p /www && echo ok > /www/health
CMD ["python3", "-m", "http.server", "8000", "--directory", "/www"]
"""


def _host_address() -> str:
    """An IPv4 address of this host outside loopback and container bridges (where an
    operator's proxy listens for the builds)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        name, address = line.split()[1], line.split()[3].split("/")[0]
        if not name.startswith(("dy", "cni", "podman", "veth", "docker", "br-")):
            return address
    pytest.skip(f"no IPv4 address outside loopback and container bridges: {out}")


def test_attach_gives_builds_the_operators_proxy_and_nothing_else(
    servers: dict[str, Index],
    offline_base_image: str,
    git: tuple[GitDaemon, RepoBuilder],
    tmp_path: Path,
) -> None:
    """``build_proxy = "attach"``: the build reaches the operator's proxy (a squid the
    test runs on the host's address, allowing the index) and nothing else; the operator's
    policy refuses the rest; the build log says dockyard keeps no record of its own."""
    from dockyard.api.app import create_app
    from dockyard.backends.engine.build_proxy import SquidProxy
    from dockyard.core.build_egress import parse_allowlist
    from dockyard.core.config import Settings

    address = _host_address()
    index = servers["index"].port
    operator = SquidProxy(
        "squid", tmp_path / "operator.pid", parse_allowlist([f"127.0.0.1:{index}"]), CAP
    )
    operator.start()
    settings = Settings(
        **TEST_SETTINGS,
        data_dir=str(tmp_path / "data"),
        insecure_sources=True,
        port_range_start=62921,
        port_range_end=62925,
        build_timeout_s=240,
        build_proxy="attach",
        build_proxy_url=f"http://{address}:{operator.port}",
        base_image_aliases={"python:3.11-slim": offline_base_image},
    )
    daemon, builder = git
    repo = builder.new("attached")
    probe = {"index": index, "package": PACKAGE, "address": address,
             "host": servers["host"].port}  # fmt: skip
    repo.write("probe.py", ATTACHED_PROBE % probe)
    repo.write("Dockerfile", ATTACHED_DOCKERFILE)
    repo.commit("attached")
    try:
        with TestClient(create_app(settings), timeout=300) as c:
            c.headers.update(AUTH)
            try:
                body = _deploy(c, id="attached", repo=f"{daemon.url}/attached.git")
                log = _build_log(c, "attached")
                assert _slot(body)["state"] == "PROMOTED", f"{body}\n{log}"
            finally:
                assert c.delete("/v1/repos/attached").status_code in (200, 202, 404)
    finally:
        operator.stop()
        records = operator.records()
        operator.remove()
    assert f"attached proxy: http://{address}:{operator.port}" in log, log
    assert "attached index: REACHED" in log, log
    assert "attached not-allowlisted: blocked (proxy said 403)" in log, log
    assert "attached host-service: blocked" in log, log
    assert "through the operator's proxy" in log, log
    assert any(r.allowed and r.port == index for r in records), records
