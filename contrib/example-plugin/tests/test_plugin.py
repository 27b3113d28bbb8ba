"""The example plugin inside a running dockyard (``dockyard_app`` from ``dockyard.testing``):
found through its entry point, its runtime selected by name, its policy refusing a
repository whose owner is not allowed (before anything is fetched: no network)."""

from __future__ import annotations

from typing import Any


def test_dockyard_lists_the_plugin_and_its_hooks(dockyard_app: Any) -> None:
    with dockyard_app(runtime="example") as client:
        plugins = {p["name"]: p for p in client.get("/v1/plugins").json()}
    assert set(plugins["example"]["hooks"]) == {
        "dockyard_register_runtimes",
        "dockyard_check_spec",
        "dockyard_event",
    }


def test_the_policy_refuses_an_owner_not_allowed(dockyard_app: Any) -> None:
    options = {"example": {"allowed_owners": ["acme"]}}
    with dockyard_app(runtime="example", plugins=options) as client:
        refused = client.post(
            "/v1/repos", json={"id": "other", "repo": "https://github.com/other/app"}
        )
        health = client.get("/v1/healthz").json()
        missing = client.get("/v1/repos/other")
    assert refused.status_code == 422, refused.text
    assert refused.json()["reason"] == "policy_refused"
    assert "allowed_owners" in refused.json()["message"]
    assert health["runtime"]["name"] == "example"
    assert missing.status_code == 404  # refused: nothing was stored
