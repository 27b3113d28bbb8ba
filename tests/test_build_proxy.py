"""The build proxy's parts, without an engine: the settings (allowlist, aliases), the
Dockerfile rewrite of aliased base images, squid's configuration and log, a real squid on
loopback (deny by default, host *and* port, no private address behind a name), and the
build firewall's tables in real nftables (a scratch table name).

End to end with Podman: ``tests/test_build_proxy_e2e.py`` and ``test_build_proxy_stop.py``.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockyard.backends.engine.build_firewall import BuildFirewall, BuildGrant
from dockyard.backends.engine.build_proxy import (
    SquidProxy,
    read_access_log,
    reap_leftovers,
    refused_hosts,
    squid_config,
)
from dockyard.core.build_egress import AllowedHost, parse_allowlist, resolve_alias
from dockyard.core.config import load_settings
from dockyard.core.dockerfile import rewrite_images
from dockyard.core.errors import ConfigError
from tests.conftest import ON_CI


# ------------------------------------------------------------------------------ settings
def test_allowlist_entries_are_host_and_port() -> None:
    assert parse_allowlist(["Index.Example:443", "10.0.0.5:8080", "index.example:443"]) == [
        AllowedHost("index.example", 443),
        AllowedHost("10.0.0.5", 8080),
    ]
    for bad in ("index.example", "index.example:0", "index.example:99999", "a b:80", ":80"):
        with pytest.raises(ValueError, match="build_proxy_allow entry"):
            parse_allowlist([bad])


def test_settings_name_a_bad_allowlist_entry_and_read_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="build_proxy_allow entry 'pypi'"):
        load_settings(environ={}, build_proxy_allow=["pypi"], data_dir=str(tmp_path))
    settings = load_settings(
        environ={
            "DOCKYARD_BUILD_PROXY": "squid",
            "DOCKYARD_BUILD_PROXY_ALLOW": "index.example:443, 127.0.0.1:8000",
            "DOCKYARD_BASE_IMAGE_ALIASES": "python:3.11-slim=localhost/base:1,node=localhost/n",
        }
    )
    assert settings.build_proxy == "squid"
    assert settings.build_proxy_allow == ["index.example:443", "127.0.0.1:8000"]
    assert settings.base_image_aliases == {
        "python:3.11-slim": "localhost/base:1",
        "node": "localhost/n",
    }
    with pytest.raises(ConfigError, match="build_proxy"):
        load_settings(environ={"DOCKYARD_BUILD_PROXY": "tinyproxy"})


def test_aliases_match_docker_hub_spellings() -> None:
    aliases = {"python:3.11-slim": "localhost/base:1", "debian": "localhost/debian:12"}
    assert resolve_alias("docker.io/library/python:3.11-slim", aliases) == "localhost/base:1"
    assert resolve_alias("python:3.11-slim", aliases) == "localhost/base:1"
    assert resolve_alias("debian:latest", aliases) == "localhost/debian:12"
    assert resolve_alias("python:3.12-slim", aliases) is None
    assert resolve_alias("registry.example:5000/python:3.11-slim", aliases) is None


def test_rewrite_replaces_only_the_aliased_images() -> None:
    text = (
        "# escape=\\\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM --platform=linux/amd64 ${BASE} AS build\n"
        "RUN echo python:3.11-slim\n"
        "FROM python:3.11-slim\n"
        "COPY --from=build /a /a\n"
        "COPY --from=python:3.11-slim /b /b\n"
        "FROM other:1\n"
    )
    out = rewrite_images(text, {"python:3.11-slim": "localhost/base:1"})
    assert out.splitlines() == [
        "# escape=\\",
        "ARG BASE=python:3.11-slim",
        "FROM --platform=linux/amd64 localhost/base:1 AS build",
        "RUN echo python:3.11-slim",
        "FROM localhost/base:1",
        "COPY --from=build /a /a",
        "COPY --from=localhost/base:1 /b /b",
        "FROM other:1",
    ]


# --------------------------------------------------------------------------------- squid
def test_squid_config_denies_by_default_and_guards_names() -> None:
    allow = parse_allowlist(["index.example:443", "127.0.0.1:8000"])
    text = squid_config(Path("/w"), 3199, allow, 1000)
    lines = text.splitlines()
    assert "http_port 0.0.0.0:3199" in lines
    assert "http_access allow allow_0_host allow_0_port !private_dst" in lines
    assert "http_access allow allow_1_host allow_1_port" in lines  # named by address
    assert "acl allow_0_host dstdomain -n index.example" in lines
    access = [line for line in lines if line.startswith("http_access")]
    assert access[-1] == "http_access deny all"
    assert "reply_body_max_size 1000 bytes" in lines
    assert "127.0.0.0/8" in text and "10.0.0.0/8" in text and "fe80::/10" in text


def test_access_log_records_and_refused_hosts(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(
        "1 GET 127.0.0.1 8000 868 TCP_MISS/200 127.0.0.1\n"
        "2 CONNECT pypi.org 443 3432 TCP_DENIED/403 -\n"
        "3 GET 127.0.0.1 8000 3647 TCP_DENIED_REPLY/403 127.0.0.1\n"
        "4 CONNECT pypi.org 443 3432 TCP_DENIED/403 -\n"
        "garbage\n"
    )
    records = read_access_log(log)
    assert [(r.host, r.port, r.bytes, r.allowed) for r in records] == [
        ("127.0.0.1", 8000, 868, True),
        ("pypi.org", 443, 3432, False),
        ("127.0.0.1", 8000, 3647, False),
        ("pypi.org", 443, 3432, False),
    ]
    assert refused_hosts(records) == ["pypi.org:443"]  # a reply too large is not a host
    assert "reply over build_proxy_max_bytes" in records[2].line()


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def hello() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _squid_required() -> None:
    if shutil.which("squid") is None:
        if ON_CI:
            pytest.fail("squid is not installed (CI=true: never skipped)")
        pytest.skip("squid is not installed: contrib/ci/setup-podman.sh")


def _through(proxy: int, url: str) -> int:
    handler = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{proxy}"})
    try:
        with urllib.request.build_opener(handler).open(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_real_squid_allows_host_and_port_only(tmp_path: Path, hello: int) -> None:
    """No firewall here, so the test reaches squid on loopback; ``localhost`` resolves to
    127.0.0.1, which only an entry naming the address may reach."""
    _squid_required()
    allow = parse_allowlist([f"127.0.0.1:{hello}", f"localhost:{hello}"])
    proxy = SquidProxy("squid", tmp_path / "state" / "b.pid", allow, 1_000_000)
    proxy.start()
    try:
        assert (tmp_path / "state" / "b.pid").exists()
        assert _through(proxy.port, f"http://127.0.0.1:{hello}/") == 200
        assert _through(proxy.port, f"http://localhost:{hello}/") == 403  # private behind a name
        assert _through(proxy.port, f"http://127.0.0.1:{hello + 1}/") == 403  # other port
        assert _through(proxy.port, "http://index.example/") == 403  # not allowlisted
    finally:
        proxy.stop()
    records = proxy.records()
    proxy.remove()
    assert [(r.host, r.allowed) for r in records] == [
        ("127.0.0.1", True),
        ("localhost", False),
        ("127.0.0.1", False),
        ("index.example", False),
    ]
    assert proxy.process is not None and proxy.process.poll() is not None
    assert not proxy.workdir.exists() and not (tmp_path / "state" / "b.pid").exists()


def test_leftover_proxies_are_reaped(tmp_path: Path) -> None:
    _squid_required()
    proxy = SquidProxy("squid", tmp_path / "build-proxy" / "x.pid", [], 1000)
    proxy.start()
    assert proxy.process is not None
    assert reap_leftovers(tmp_path) == 1
    assert proxy.process.wait(10) is not None
    assert not proxy.workdir.exists()
    assert not list((tmp_path / "build-proxy").glob("*.pid"))


# ------------------------------------------------------------------------------ firewall
def test_build_firewall_tables_in_real_nftables() -> None:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        if ON_CI:
            pytest.fail("the build firewall test needs root and nft (CI=true)")
        pytest.skip("the build firewall test needs root and nft")
    table = f"dyb_test_{uuid.uuid4().hex[:8]}"
    firewall = BuildFirewall(table=table)
    try:
        firewall.apply()
        firewall.apply()  # idempotent
        grant = BuildGrant("dybtest0", "10.254.77.1", "10.254.77.0/24", 40111)
        firewall.grant(grant, 5000)
        assert firewall.used(40111) == 0
        listed = firewall.run(["list", "table", "inet", table], None)[1]
        assert '"dybtest0" . 10.254.77.1 . 40111' in listed and 'iifname "dyb*"' in listed
        bridge = firewall.run(["list", "table", "bridge", table], None)[1]
        assert "10.254.77.0/24" in bridge
        firewall.apply()  # re-applied for the next build: the running build's grant stays
        assert (
            '"dybtest0" . 10.254.77.1 . 40111'
            in firewall.run(["list", "table", "inet", table], None)[1]
        )
        # A grant whose dockyard is gone (killed mid-build) is pruned; a live one stays.
        dead = BuildGrant("dybtest1", "10.254.78.1", "10.254.78.0/24", 40112)
        firewall.grant(dead, 5000)
        element = '"dybtest1" . 10.254.78.1 . 40112'
        firewall.run(["-f", "-"], f"delete element inet {table} grants {{ {element} }}\n")
        gone = (
            f'add element inet {table} grants {{ {element} comment "10.254.78.0/24 999999999:1" }}'
        )
        assert firewall.run(["-f", "-"], gone + "\n")[0] == 0
        assert {g.port for g, _, _ in firewall.grants()} == {40111, 40112}
        assert firewall.prune() == 1
        assert [(g, own) for g, _, own in firewall.grants()] == [(grant, True)]
        assert "10.254.78.0/24" not in firewall.run(["list", "table", "bridge", table], None)[1]
        firewall.revoke(40111, grant)
        assert firewall.used(40111) is None
        listed = firewall.run(["list", "table", "inet", table], None)[1]
        assert "40111" not in listed
        assert "10.254.77.0/24" not in firewall.run(["list", "table", "bridge", table], None)[1]
    finally:
        firewall.run(["delete", "table", "inet", table], None)
        firewall.run(["delete", "table", "bridge", table], None)


async def test_a_build_refused_by_the_firewall_leaves_no_proxy_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nft`` failing refuses the build before its proxy starts; the directory made for
    the proxy goes too."""
    import tempfile

    from dockyard.backends.engine.build_egress import (
        BuildEgressConfig,
        BuildNetwork,
        egress_session,
    )
    from dockyard.core.errors import BuildFailed

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    def refusing(args: Any, stdin: str | None) -> tuple[int, str, str]:
        return 1, "", "Operation not permitted"

    firewall = BuildFirewall(runner=refusing, table="unused")
    network = BuildNetwork("dockyard-build-x", "dybx", "10.254.1.1", "10.254.1.0/24")
    with pytest.raises(BuildFailed, match=r"cannot be enforced.*Operation not permitted"):
        async with egress_session(
            BuildEgressConfig(mode="squid"), firewall, network, str(tmp_path), "x", print
        ):
            pass
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "IPv4 address"),
        ("http://proxy.example:3128", "IPv4 address"),
        ("http://127.0.0.1:3128", "loopback"),
        ("http://0.0.0.0:3128", "loopback"),
        ("https://10.0.0.5:3128", "http://<IPv4 address>:<port>"),
        ("http://10.0.0.5", "http://<IPv4 address>:<port>"),
        ("http://10.0.0.5:70000", "1-65535"),
    ],
)
def test_an_attached_proxy_url_is_checked(url: str, why: str) -> None:
    from dockyard.core.build_egress import parse_proxy_url

    with pytest.raises(ValueError, match="build_proxy_url") as refused:
        parse_proxy_url(url)
    assert why in str(refused.value)
    assert str(parse_proxy_url("http://10.0.0.5:3128/")) == "10.0.0.5:3128"


def test_attach_without_a_url_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "dockyard.toml"
    config.write_text('build_proxy = "attach"\n')
    with pytest.raises(ConfigError, match="build_proxy_url"):
        load_settings(config)
    config.write_text('build_proxy = "attach"\nbuild_proxy_url = "http://10.0.0.5:3128"\n')
    assert load_settings(config).build_proxy_url == "http://10.0.0.5:3128"
