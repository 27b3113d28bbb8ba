"""The minimal API: health, plugins, JSON errors, OpenAPI."""

from __future__ import annotations

from typing import Any

from dockyard.core import hookimpl


def test_healthz_reports_runtime_store_and_unenforced_limits(api_client_factory: Any) -> None:
    with api_client_factory() as client:
        r = client.get("/v1/healthz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok"
        assert body["runtime"]["name"] == "example"
        assert body["store"]["ok"] is True
        assert body["limits_enforced"] is False
        assert body["limits_note"] == "the example runtime runs nothing"


def test_healthz_is_degraded_when_the_runtime_fails(api_client_factory: Any) -> None:
    with api_client_factory() as client:
        services = client.app.state.services

        async def broken_info() -> None:
            raise RuntimeError("engine gone")

        services.runtime.info = broken_info
        body = client.get("/v1/healthz").json()
        assert body["status"] == "degraded"
        assert body["runtime"] is None
        assert body["runtime_error"] == "engine gone"


def test_plugins_lists_builtins_with_their_hooks(api_client_factory: Any) -> None:
    class Observer:
        @hookimpl
        def dockyard_event(self, event: Any) -> None:
            """Counts nothing."""

    with api_client_factory(extra_plugins=[("observer", Observer())]) as client:
        plugins = {p["name"]: p for p in client.get("/v1/plugins").json()}
        assert plugins["podman"]["hooks"] == ["dockyard_register_runtimes"]
        assert plugins["sqlite"]["hooks"] == ["dockyard_register_stores"]
        assert plugins["observer"]["hooks"] == ["dockyard_event"]
        assert plugins["podman"]["module"] == "dockyard.backends.podman"
        assert plugins["podman"]["version"]


def test_unknown_route_is_json_404(api_client_factory: Any) -> None:
    with api_client_factory() as client:
        r = client.get("/v1/nope")
        assert r.status_code == 404
        assert r.json()["reason"] == "not_found"


def test_openapi_schema_and_docs_page(api_client_factory: Any) -> None:
    with api_client_factory() as client:
        schema = client.get("/docs/openapi.json").json()
        assert "/v1/healthz" in schema["paths"]
        assert schema["paths"]["/v1/plugins"]["get"]["operationId"] == "listPlugins"
        assert client.get("/docs/swagger").status_code == 200
