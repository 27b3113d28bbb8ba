"""The served OpenAPI schema tells the truth: Schemathesis, every check, no failure.

A dockyard on the fake runtime and source (no container, no git, no proxy: this is about
the HTTP surface) is served by uvicorn on loopback; the ``st`` CLI fetches its schema and
sends generated requests with an admin token, bounded in examples and time. The fake
source accepts only ``https://github.com/...`` URLs and fetches nothing, so generated
deployments never reach anything: their "containers" are small servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from dockyard.api.app import create_app
from dockyard.core.config import Settings
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from tests.conftest import TEST_SETTINGS, TEST_TOKEN, free_port
from tests.fakes import FakeRuntime, FakeSource

#: Generated examples per operation and the wall-clock budget of the whole run.
MAX_EXAMPLES = 30
MAX_TIME_S = 150


@contextlib.contextmanager
def served(tmp_path: Path, **settings: Any) -> Iterator[str]:
    """Serve a dockyard on the fake runtime at ``http://127.0.0.1:<port>`` in a thread."""
    cfg = Settings(
        data_dir=str(tmp_path / "data"),
        port_range_start=47600,
        port_range_end=47700,
        **{**TEST_SETTINGS, **settings},
    )
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=FakeRuntime(),
        sources={"fake": FakeSource(tmp_path / "src")},
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg, services=services),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="dockyard-api")
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped while starting"
            assert time.monotonic() < deadline, "uvicorn did not start in 20 s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _st() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if found is None:
        pytest.fail("the schemathesis CLI (st) is missing: pip install -e '.[test]'")
    return found


@pytest.mark.slow
def test_schemathesis_finds_no_failure_in_the_served_schema(tmp_path: Path) -> None:
    with served(tmp_path) as base:
        command = [
            _st(),
            "--config-file",
            str(Path(__file__).parent / "schemathesis.toml"),
            "run",
            f"{base}/docs/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {TEST_TOKEN}",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--max-time",
            str(MAX_TIME_S),
            "--request-timeout",
            "20",
            "--workers",
            "1",
            "--seed",
            "1",
            "--no-color",
            "--generation-database",
            "none",
        ]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=MAX_TIME_S + 120,
            cwd=tmp_path,
            env=env,
            check=False,
        )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]


def test_every_operation_documents_its_errors_with_the_real_body(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        schema = client.get("/docs/openapi.json").json()
        body = schema["components"]["schemas"]["ErrorBody"]
        assert body["required"] == ["reason", "message"]
        assert body["additionalProperties"] is False
        operations = {
            op["operationId"]: (path, op)
            for path, item in schema["paths"].items()
            for op in item.values()
            if isinstance(op, dict) and "operationId" in op
        }
        for operation_id, (path, op) in operations.items():
            statuses = set(op["responses"])
            assert {"400", "500"} <= statuses, operation_id
            if operation_id != "healthz":
                assert {"401", "403", "429"} <= statuses, operation_id
            if "{" in path:
                assert "404" in statuses, operation_id
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorBody", (operation_id, status)
        for operation_id in ("createDeployment", "redeploy"):
            assert {"409", "413", "422"} <= set(operations[operation_id][1]["responses"])
        for operation_id in ("switch", "deleteDeployment"):
            assert "409" in operations[operation_id][1]["responses"]


def test_path_parameters_carry_their_patterns(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        schema = client.get("/docs/openapi.json").json()
        patterns = {
            p["name"]: p["schema"].get("pattern")
            for item in schema["paths"].values()
            for op in item.values()
            if isinstance(op, dict)
            for p in op.get("parameters", [])
            if p["in"] == "path"
        }
        assert patterns["deployment_id"] == "^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$"
        assert patterns["evaluation_id"] == "^[A-Za-z0-9-]{1,64}$"
        assert patterns["token_id"] == "^[0-9a-f]{8}$"


def test_models_refuse_unknown_fields_in_the_schema_too(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        components = client.get("/docs/openapi.json").json()["components"]["schemas"]
        spec = components["DeploymentSpec"]
        assert spec["additionalProperties"] is False
        # An optional field keeps its constraints (Litestar alone drops them).
        ref = spec["properties"]["ref"]["anyOf"][0]
        assert ref["pattern"] == "^[A-Za-z0-9._/+-]{1,255}$"
        timeouts = components["Timeouts"]["properties"]["request_s"]["anyOf"][0]
        assert timeouts["exclusiveMinimum"] == 0


def test_one_status_per_kind_of_error_across_routes(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        bad_id = "Not_An_Id"
        for method, path in [
            ("get", f"/v1/repos/{bad_id}"),
            ("get", f"/v1/repos/{bad_id}/events"),
            ("get", f"/v1/repos/{bad_id}/logs"),
            ("post", f"/v1/repos/{bad_id}/redeploy"),
            ("post", f"/v1/repos/{bad_id}/switch"),
            ("delete", f"/v1/repos/{bad_id}"),
            ("get", "/v1/integration/evaluation/bad!id"),
            ("post", "/v1/integration/evaluation/bad!id/cancel"),
            ("delete", "/v1/tokens/XYZ"),
        ]:
            r = getattr(client, method)(path)
            assert r.status_code == 400, (method, path, r.text)
            assert r.json()["reason"] == "invalid_input", (method, path)
        spec = {"id": "app", "repo": "https://github.com/acme/agent"}
        # Matches the schema, but contradicts itself or names what nothing accepts: 422.
        for body in [
            {**spec, "build_mode": "image"},
            {**spec, "subdir": "../etc"},
            {**spec, "repo": "ftp://example.org/x"},
        ]:
            r = client.post("/v1/repos", json=body)
            assert r.status_code == 422, (body, r.text)
        r = client.post("/v1/integration/evaluate-miner", json={"miner": {"github_url": "x"}})
        assert r.status_code == 422, r.text


def test_options_lists_every_method_of_a_path(fake_client_factory: Any) -> None:
    with fake_client_factory() as client:
        r = client.options("/v1/repos/app")
        assert r.status_code == 204
        assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE", "OPTIONS"}
        r = client.options("/v1/tokens")
        assert set(r.headers["allow"].split(", ")) == {"GET", "POST", "OPTIONS"}


def test_a_redeploy_that_contradicts_itself_is_422(fake_client_factory: Any) -> None:
    with fake_client_factory(port_range_start=47720, port_range_end=47730) as client:
        spec = {"id": "app", "repo": "https://github.com/acme/agent", "grace_period_s": 0}
        assert client.post("/v1/repos?wait=true", json=spec).status_code == 200
        r = client.post("/v1/repos/app/redeploy", json={"build_mode": "image"})
        assert r.status_code == 422, r.text
        assert "image is required" in r.json()["message"]
        r = client.post("/v1/tokens")  # no body at all: does not match the schema
        assert r.status_code == 400, r.text
