"""Token scopes plugins register (``dockyard_register_token_scopes``): the core has
``read``, ``deploy`` and ``admin``; the evaluation plugin adds ``evaluate`` with today's
grants; an unknown scope is refused naming it (API 400, CLI one line); a token file with
``evaluate`` keeps working; a route declaring a scope nobody registers fails the app's
start naming its plugin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from litestar import get

from dockyard.api.auth import CORE_TABLE, ScopeTable, TokenBook, TokenScope, hash_token
from dockyard.api.cli import main as cli_main
from dockyard.core.config import Settings
from dockyard.core.errors import PluginError, ValidationError
from dockyard.core.hookspecs import hookimpl
from dockyard.core.plugins import build_plugin_manager
from tests.conftest import TEST_SETTINGS

PORTS = {"port_range_start": 48722, "port_range_end": 48740}


def test_the_core_scopes_and_the_evaluation_plugin_s() -> None:
    assert CORE_TABLE.names == ("admin", "deploy", "read")
    table = ScopeTable.from_plugins(build_plugin_manager(load_entry_points=False))
    assert table.names == ("admin", "deploy", "evaluate", "read")
    # exactly the grants of before: evaluate alone, deploy reads, admin everything
    assert {name: sorted(table.implied(name)) for name in table.names} == {
        "admin": ["admin", "deploy", "evaluate", "read"],
        "deploy": ["deploy", "read"],
        "evaluate": ["evaluate"],
        "read": ["read"],
    }
    bare = ScopeTable.from_plugins(
        build_plugin_manager(load_entry_points=False, disable=["evaluation"])
    )
    assert "evaluate" not in bare
    with pytest.raises(ValidationError, match=r"scopes: unknown scope 'evaluate'"):
        bare.check(["read", "evaluate"])


def test_an_unknown_scope_is_refused_by_the_api_naming_it(fake_client_factory: Any) -> None:
    with fake_client_factory(**PORTS) as client:
        r = client.post("/v1/tokens", json={"name": "x", "scopes": ["read", "bogus"]})
        assert r.status_code == 400, r.text
        assert r.json()["message"].startswith("scopes: unknown scope 'bogus'")
        r = client.post("/v1/tokens", json={"name": "x", "scopes": ["evaluate"]})
        assert r.status_code == 201 and r.json()["scopes"] == ["evaluate"]
    with fake_client_factory(disable=["evaluation"], **PORTS) as client:
        r = client.post("/v1/tokens", json={"name": "x", "scopes": ["evaluate"]})
        assert r.status_code == 400
        assert "unknown scope 'evaluate'" in r.json()["message"]


def test_a_token_file_with_evaluate_keeps_working(fake_client_factory: Any, tmp_path: Path) -> None:
    """A ``tokens.json`` written before scopes were registered (the same JSON)."""
    token = "dy_0e0a1000_" + "e" * 43
    data = tmp_path / "data"
    data.mkdir()
    record = {
        "id": "0e0a1000",
        "name": "validator",
        "scopes": ["evaluate"],
        "sha256": hash_token(token),
        "created_at": 1.0,
        "revoked_at": None,
        "source": "file",
    }
    (data / "tokens.json").write_text(json.dumps([record]))
    auth = {"Authorization": f"Bearer {token}"}
    with fake_client_factory(**PORTS) as client:
        assert client.get("/v1/integration/evaluations", headers=auth).status_code == 200
        assert client.get("/v1/status", headers=auth).status_code == 403  # no read: as before
    with fake_client_factory(disable=["evaluation"], **PORTS) as client:
        listed = client.get("/v1/tokens").json()  # the file still loads
        assert any(t["id"] == "0e0a1000" and t["scopes"] == ["evaluate"] for t in listed)
        assert client.get("/v1/status", headers=auth).status_code == 403


class StrayScope:
    """Mounts a route that declares a scope no plugin registers."""

    @hookimpl
    def dockyard_api_plugins(self, register: Any) -> None:
        @get("/v1/stray", opt={"scope": "wizard"}, sync_to_thread=False)
        def stray() -> str:
            return "x"

        register.route(stray)


class CoreScopeAgain:
    @hookimpl
    def dockyard_register_token_scopes(self, register: Any) -> None:
        register("read", TokenScope("mine"))


class ImpliesNothingKnown:
    @hookimpl
    def dockyard_register_token_scopes(self, register: Any) -> None:
        register("ops", TokenScope("ops", implies=frozenset({"root"})))


def test_bad_scope_registrations_fail_the_start_naming_the_plugin(tmp_path: Path) -> None:
    from dockyard.api.app import create_app

    settings = Settings(data_dir=str(tmp_path / "data"), **TEST_SETTINGS)
    for name, plugin, message in [
        ("stray", StrayScope(), r"plugin 'stray': route /v1/stray declares .*'wizard'"),
        ("again", CoreScopeAgain(), r"plugin 'again' registered the token scope 'read'"),
        ("ops", ImpliesNothingKnown(), r"plugin 'ops': token scope 'ops' implies .*'root'"),
    ]:
        pm = build_plugin_manager(load_entry_points=False, extra_plugins=[(name, plugin)])
        with pytest.raises(PluginError, match=message):
            create_app(settings, pm=pm)


def test_the_cli_refuses_an_unknown_scope_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["token", "create", "ci", "--local", "--data-dir", str(tmp_path)]
    assert cli_main([*args, "--scope", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown scope 'bogus'" in err and "Traceback" not in err
    assert cli_main([*args, "--scope", "evaluate", "--scope", "read"]) == 0
    out = capsys.readouterr().out
    assert '"evaluate"' in out or "evaluate" in out
    book = TokenBook(tmp_path / "tokens.json")
    assert [r.scopes for r in book.records()] == [["evaluate", "read"]]
