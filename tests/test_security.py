"""The API's front door: tokens and scopes on every route, rate limits, the IP allowlist
behind trusted proxies, body caps and the audit log."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from dockyard.api.auth import ScopeTable, TokenBook, client_address, hash_token
from tests.conftest import AUTH, free_port

#: A token that lacks each scope (the route's scope -> a token scope not granting it).
LACKING = {"read": "evaluate", "deploy": "read", "evaluate": "deploy", "admin": "deploy"}


def _routes(app: Any) -> list[tuple[str, str, str | None, bool]]:
    """(method, path, scope, public) of every handler, from the OpenAPI schema + opts."""
    schema = app.openapi_schema.to_schema()
    found = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            for method in sorted(getattr(handler, "http_methods", []) or []):
                path = route.path_format
                if path not in schema["paths"] or method.lower() not in schema["paths"][path]:
                    continue
                found.append(
                    (method, path, handler.opt.get("scope"), bool(handler.opt.get("public")))
                )
    return found


def test_every_route_but_healthz_needs_a_token_of_its_scope(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        # The app's scopes: the core's and the loaded plugins' (the evaluation's evaluate).
        table: ScopeTable = client.app.state.scopes
        SCOPES, IMPLIES = table.names, {scope: table.implied(scope) for scope in table.names}
        book: TokenBook = TokenBook.from_settings(client.app.state.services.settings, table)
        tokens = {scope: book.create(f"only-{scope}", [scope])[1] for scope in SCOPES}
        client.headers.pop("Authorization")
        routes = _routes(client.app)
        assert len(routes) >= 12
        public = [(m, p) for m, p, _, is_public in routes if is_public]
        assert public == [("GET", "/v1/healthz")]
        for method, path, scope, is_public in routes:
            if is_public:
                continue
            assert scope in SCOPES, f"{method} {path} declares no scope"
            url = re.sub(r"\{[^}]+\}", "abc", path)
            r = client.request(method, url)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["reason"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            wrong = tokens[LACKING[scope]]
            assert scope not in IMPLIES[LACKING[scope]]
            r = client.request(method, url, headers={"Authorization": f"Bearer {wrong}"})
            assert r.status_code == 403, (method, path, r.status_code)
            assert r.json()["reason"] == "forbidden"
        assert client.get("/v1/healthz").status_code == 200


def test_bad_tokens_are_401(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        token = AUTH["Authorization"].split()[1]
        forged = token[:-1] + ("a" if token[-1] != "a" else "b")
        for header in [
            "Bearer",
            "Bearer ",
            "Basic abc",
            f"Bearer {forged}",
            "Bearer dy_7e570000_short",
            f"bearer {token} extra",
        ]:
            r = client.get("/v1/status", headers={"Authorization": header})
            assert r.status_code == 401, header


def test_tokens_are_created_listed_and_revoked_through_the_api(
    fake_client_factory: Any, tmp_path: Path
) -> None:
    with fake_client_factory() as client:
        r = client.post("/v1/tokens", json={"name": "ci", "scopes": ["deploy"]})
        assert r.status_code == 201, r.text
        created = r.json()
        secret = created["token"]
        assert secret.startswith(f"dy_{created['id']}_")
        deployer = {"Authorization": f"Bearer {secret}"}
        assert client.get("/v1/status", headers=deployer).status_code == 200
        assert client.get("/v1/tokens", headers=deployer).status_code == 403
        listed = client.get("/v1/tokens").json()
        assert {t["id"] for t in listed} >= {created["id"], "7e570000"}
        assert all("token" not in t and "sha256" not in t for t in listed)
        stored = (Path(client.app.state.services.settings.data_dir) / "tokens.json").read_text()
        assert secret not in stored and hash_token(secret) in stored
        r = client.delete(f"/v1/tokens/{created['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"]
        assert client.get("/v1/status", headers=deployer).status_code == 401
        r = client.post("/v1/tokens", json={"name": "x", "scopes": ["root"]})
        assert r.status_code == 400 and "scopes" in r.json()["message"]
        r = client.delete("/v1/tokens/7e570000")
        assert r.status_code == 409 and "configured" in r.json()["message"]


def test_first_start_creates_one_admin_token(tmp_path: Path) -> None:
    from dockyard.core.config import Settings

    book = TokenBook.from_settings(Settings(data_dir=str(tmp_path)))
    first = book.ensure_admin()
    assert first is not None and book.verify(first) is not None
    assert book.verify(first).scopes == ["admin"]  # type: ignore[union-attr]
    assert book.ensure_admin() is None  # never twice
    assert first not in (tmp_path / "tokens.json").read_text()
    assert oct((tmp_path / "tokens.json").stat().st_mode & 0o777) == "0o600"


def test_rate_limits_trigger_and_recover(fake_client_factory: Any) -> None:
    with fake_client_factory(rate_limit_per_token=5, rate_limit_window="second") as client:
        for _ in range(3):  # a loaded host may spread seven requests over a second: again
            time.sleep(1.2)
            started = time.monotonic()
            codes = [client.get("/v1/status").status_code for _ in range(7)]
            if time.monotonic() - started < 0.8:
                break
        assert codes[:5] == [200] * 5 and 429 in codes[5:]
        r = client.get("/v1/status")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["reason"] == "rate_limited"
        time.sleep(1.2)
        assert client.get("/v1/status").status_code == 200


def test_the_per_ip_limit_honours_its_window(fake_client_factory: Any) -> None:
    """``rate_limit_window`` applies to the per-IP budget too (it was always a minute)."""
    with fake_client_factory(rate_limit_per_ip=3, rate_limit_window="second") as client:
        for _ in range(3):  # a loaded host may spread four requests over a second: again
            time.sleep(1.2)
            started = time.monotonic()
            codes = [client.get("/v1/status").status_code for _ in range(4)]
            if time.monotonic() - started < 0.8:
                break
        assert codes == [200, 200, 200, 429]
        time.sleep(1.2)  # a minute-long window would still refuse this one
        assert client.get("/v1/status").status_code == 200


def test_duplicate_json_keys_are_a_400_naming_the_key(fake_client_factory: Any) -> None:
    """A decoder keeps the last of two values silently; dockyard refuses the body instead,
    on every route (the deployments API and the evaluation plugin's)."""
    json_type = {"content-type": "application/json"}
    with fake_client_factory() as client:
        cases = [
            ("/v1/repos", b'{"id": "a", "id": "b", "repo": "https://github.com/a/b"}', "id"),
            (
                "/v1/repos",
                b'{"id": "a", "repo": "https://github.com/a/b", "env": {"X": "1", "X": "2"}}',
                "X",
            ),
            (
                "/v1/integration/evaluate-miner",
                b'{"miner": {"github_url": "https://github.com/a/b"}, "tasks": [], "tasks": []}',
                "tasks",
            ),
        ]
        for path, body, key in cases:
            r = client.post(path, content=body, headers=json_type)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["reason"] == "invalid_input"
            assert r.json()["message"] == f"{key}: this key appears more than once in the JSON body"
        assert client.get("/v1/repos/a").status_code == 404
        ok = b'{"id": "a", "repo": "https://github.com/a/b", "env": {"X": "1", "Y": "1"}}'
        assert client.post("/v1/repos", content=ok, headers=json_type).status_code == 202


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    import ipaddress

    trusted = [ipaddress.ip_network("10.0.0.0/8")]

    def scope(peer: str, xff: str | None) -> Any:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return {"client": (peer, 1234), "headers": headers}

    assert client_address(scope("127.0.0.1", "1.2.3.4"), trusted) == "127.0.0.1"
    assert client_address(scope("10.0.0.5", "1.2.3.4"), trusted) == "1.2.3.4"
    assert client_address(scope("10.0.0.5", "6.6.6.6, 1.2.3.4, 10.0.0.9"), trusted) == "1.2.3.4"
    assert client_address(scope("10.0.0.5", "garbage"), trusted) == "10.0.0.5"
    assert client_address(scope("10.0.0.5", None), trusted) == "10.0.0.5"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Any]:
    """``live(**settings)`` serves the API with uvicorn on a loopback port (real peers)."""
    from dockyard.api.app import create_app
    from dockyard.core.config import Settings
    from dockyard.core.plugins import build_plugin_manager
    from dockyard.core.services import Services
    from tests.conftest import TEST_SETTINGS
    from tests.fakes import FakeRuntime, FakeSource

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**settings: Any) -> str:
        cfg = Settings(data_dir=str(tmp_path / f"d{len(servers)}"), **{**TEST_SETTINGS, **settings})
        services = Services.build(
            cfg,
            build_plugin_manager(load_entry_points=False),
            runtime=FakeRuntime(),
            sources={"f": FakeSource(tmp_path)},
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(cfg, services=services),
                host="127.0.0.1",
                port=port,
                log_level="error",
                proxy_headers=False,  # as `dockyard serve` runs it
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def _call(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers={**AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_allowlist_ignores_a_spoofed_forwarded_for_from_an_untrusted_peer(live: Any) -> None:
    spoof = {"X-Forwarded-For": "10.1.2.3"}
    base = live(allowed_clients=["10.0.0.0/8"])
    assert _call(f"{base}/v1/status") == 403
    assert _call(f"{base}/v1/status", spoof) == 403  # the peer (127.0.0.1) is not a proxy
    proxied = live(allowed_clients=["10.0.0.0/8"], trusted_proxies=["127.0.0.1/32"])
    assert _call(f"{proxied}/v1/status", spoof) == 200
    assert _call(f"{proxied}/v1/status", {"X-Forwarded-For": "192.0.2.7"}) == 403
    local = live(allowed_clients=["127.0.0.0/8"])
    assert _call(f"{local}/v1/status") == 200


def test_per_ip_limit_uses_the_real_client_address(live: Any) -> None:
    base = live(rate_limit_per_ip=3, rate_limit_window="minute", trusted_proxies=["127.0.0.1/32"])
    codes = [_call(f"{base}/v1/status", {"X-Forwarded-For": "192.0.2.1"}) for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # another real client behind the same proxy has its own budget
    assert _call(f"{base}/v1/status", {"X-Forwarded-For": "192.0.2.2"}) == 200


def test_audit_log_records_every_request_without_secrets(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        client.get("/v1/repos/nope", headers={"X-Request-ID": "req-123"})
        client.get("/v1/status", headers={"Authorization": "Bearer dy_nope"})
        r = client.post(
            "/v1/repos",
            json={
                "id": "a",
                "repo": "https://github.com/a/b",
                "env": {"API_KEY": "sk-very-secret"},
            },
        )
        assert r.status_code == 202
        assert "sk-very-secret" not in r.text
        assert r.headers["x-request-id"]
        path = Path(client.app.state.services.settings.data_dir) / "audit.log"
        text = path.read_text()
        assert "sk-very-secret" not in text and "dy_nope" not in text
        entries = [json.loads(line) for line in text.splitlines()]
        first = entries[0]
        assert first["request_id"] == "req-123"
        assert (first["token_id"], first["target"], first["outcome"]) == ("7e570000", "nope", 404)
        assert first["route"] == "/v1/repos/{deployment_id}"
        assert entries[1]["outcome"] == 401 and entries[1]["token_id"] is None
        assert entries[2]["method"] == "POST" and entries[2]["outcome"] == 202
        events = client.get("/v1/repos/a/events").text
        assert "sk-very-secret" not in events
