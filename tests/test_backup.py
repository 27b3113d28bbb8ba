"""``dockyard backup`` and ``dockyard restore`` (``api/cli_admin.py``): a backup taken while
dockyard serves, restored into a new data directory, serves the same deployments (and the
same tokens) there; a restore never overwrites state without ``--force``; a damaged or
foreign archive is refused with one line.

The deployments run on the fake runtime (one "host" shared by both dockyards, as when a
data directory moves on the same host); the real-Podman round trip is
``test_backup_round_trip_on_podman``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from dockyard.api.app import create_app
from dockyard.api.cli import main
from dockyard.core.config import Settings
from dockyard.core.plugins import build_plugin_manager
from dockyard.core.services import Services
from tests.conftest import AUTH, TEST_SETTINGS
from tests.fakes import FakeRuntime, FakeSource

FAST_HEALTH = {"interval_s": 0.05, "timeout_s": 1.0, "deadline_s": 5.0}


@contextlib.contextmanager
def dockyard(data: Path, runtime: FakeRuntime, src: Path) -> Iterator[TestClient[Any]]:
    cfg = Settings(
        data_dir=str(data), port_range_start=61350, port_range_end=61360, **TEST_SETTINGS
    )
    services = Services.build(
        cfg,
        build_plugin_manager(load_entry_points=False),
        runtime=runtime,
        sources={"fake": FakeSource(src)},
    )
    with TestClient(create_app(cfg, services=services)) as client:
        client.headers.update(AUTH)
        yield client


def deploy(client: TestClient[Any], deployment_id: str, ref: str) -> None:
    spec = {"id": deployment_id, "repo": "https://github.com/acme/agent", "ref": ref}
    r = client.post("/v1/repos?wait=true", json={**spec, "health": FAST_HEALTH})
    assert r.status_code == 200, r.text


def served(client: TestClient[Any]) -> dict[str, Any]:
    """What the status list and each deployment's view say, without what changes by itself
    (health timings, the URL's host)."""
    r = client.get("/v1/status")
    assert r.status_code == 200, r.text
    out = {}
    for item in r.json()["deployments"]:
        view = client.get(f"/v1/repos/{item['id']}").json()
        out[item["id"]] = {
            "generation": item["generation"],
            "promoted": item["promoted"],
            "ref": item["ref"],
            "slots": [
                (s["color"], s["state"], s.get("commit"), s.get("host_port")) for s in view["slots"]
            ],
        }
    return out


def test_a_restored_backup_serves_the_same_deployments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = FakeRuntime()
    old, new, archive = tmp_path / "old", tmp_path / "new", tmp_path / "state.tar.gz"
    with dockyard(old, runtime, tmp_path / "src") as client:
        deploy(client, "alpha", "v1")
        deploy(client, "bravo", "v1")
        r = client.post("/v1/repos/bravo/redeploy?wait=true", json={"ref": "v2"})
        assert r.status_code == 200, r.text
        made = client.post("/v1/tokens", json={"name": "ops", "scopes": ["read"]}).json()
        before = served(client)
        # online: taken while this dockyard serves
        assert main(["backup", str(archive), "--data-dir", str(old)]) == 0
        assert "dockyard.db" in capsys.readouterr().out
        assert archive.stat().st_mode & 0o077 == 0  # the token file is in it
        assert set(before) == {"alpha", "bravo"}
        assert before["bravo"]["promoted"] == "green" and before["bravo"]["generation"] == 2

        assert main(["restore", str(archive), "--data-dir", str(new)]) == 0
        assert (new / "dockyard.db").stat().st_mode & 0o777 == 0o600
        # the containers run on (a fake one lives only as long as its dockyard's loop)
        with dockyard(new, runtime, tmp_path / "src") as restored:
            assert served(restored) == before
            # the token made through the API works on the restored dockyard
            auth = {"Authorization": f"Bearer {made['token']}"}
            assert restored.get("/v1/status", headers=auth).status_code == 200
            # and it keeps working: a redeploy there builds and promotes
            r = restored.post("/v1/repos/alpha/redeploy?wait=true", json={"ref": "v3"})
            assert r.status_code == 200, r.text
            assert r.json()["promoted"] == "green"

    # never over existing state without --force
    assert main(["restore", str(archive), "--data-dir", str(new)]) == 2
    err = capsys.readouterr().err
    assert "already holds state" in err and "--force" in err and "Traceback" not in err
    assert main(["restore", str(archive), "--data-dir", str(new), "--force"]) == 0
    # nor over an existing archive
    assert main(["backup", str(archive), "--data-dir", str(old)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_restored_on_a_new_host_the_gone_containers_fail_and_a_redeploy_serves(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "state.tar.gz"
    with dockyard(tmp_path / "old", FakeRuntime(), tmp_path / "src") as client:
        deploy(client, "alpha", "v1")
        assert main(["backup", str(archive), "--data-dir", str(tmp_path / "old")]) == 0
    assert main(["restore", str(archive), "--data-dir", str(tmp_path / "new")]) == 0
    with dockyard(tmp_path / "new", FakeRuntime(), tmp_path / "src") as client:
        view = client.get("/v1/repos/alpha").json()
        blue = next(s for s in view["slots"] if s["color"] == "blue")
        assert (blue["state"], blue["reason"]) == ("FAILED", "container_gone")
        r = client.post("/v1/repos/alpha/redeploy?wait=true", json={})
        assert r.status_code == 200, r.text
        assert r.json()["promoted"] is not None


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"../evil": b"x"}, "unexpected member '../evil'"),
        ({"dockyard.db": b"x"}, "no manifest"),
        ({"manifest.json": b'{"format": "other"}'}, "not a dockyard backup of version"),
        (
            {
                "manifest.json": json.dumps(
                    {"format": "dockyard-backup", "version": 1, "files": {"dockyard.db": "0"}}
                ).encode(),
                "dockyard.db": b"not sqlite",
            },
            "does not match its checksum",
        ),
    ],
)
def test_a_bad_archive_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], members: dict[str, bytes], message: str
) -> None:
    archive = _archive(tmp_path / "bad.tar.gz", members)
    assert main(["restore", str(archive), "--data-dir", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "new" / "dockyard.db").exists()


def test_backup_of_an_empty_data_dir_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backup", str(tmp_path / "b.tgz"), "--data-dir", str(tmp_path / "none")]) == 2
    assert "holds no dockyard state" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.podman
def test_backup_round_trip_on_podman(tmp_path: Path) -> None:
    """Real Podman and a real git server: a deployed agent, backed up while dockyard serves,
    is shown the same by a dockyard started on the restored copy (its container ran on
    while neither dockyard did), and that dockyard can delete it."""
    import subprocess
    import urllib.request
    import uuid

    from tests.gitserver import GitDaemon, RepoBuilder
    from tests.test_e2e import HEALTH, _agent, _podman_required

    _podman_required()
    dep = f"bk{uuid.uuid4().hex[:8]}"
    old, new, archive = tmp_path / "old", tmp_path / "new", tmp_path / "state.tar.gz"

    def app(data: Path) -> TestClient[Any]:
        cfg = Settings(
            **{**TEST_SETTINGS, "monitor_interval_s": 0},
            runtime="podman",
            data_dir=str(data),
            insecure_sources=True,
            port_range_start=61370,
            port_range_end=61380,
            build_timeout_s=60,
        )
        client = TestClient(create_app(cfg), timeout=120)
        client.headers.update(AUTH)
        return client

    def get(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.read().decode().strip()

    root = tmp_path / "served"
    builder = RepoBuilder(root)
    v1 = ""
    try:
        with GitDaemon(root) as daemon:
            repo = builder.new("backed")
            v1 = _agent(repo, "v1")
            spec = {"id": dep, "repo": f"{daemon.url}/backed.git", "ref": v1, "health": HEALTH}
            with app(old) as a:
                r = a.post("/v1/repos?wait=true&timeout=120", json=spec)
                assert r.status_code == 200, r.text
                before = a.get(f"/v1/repos/{dep}").json()
                port = before["slots"][0]["host_port"]
                assert before["promoted"] == "blue" and get(port) == "v1"
                assert main(["backup", str(archive), "--data-dir", str(old)]) == 0
        assert get(port) == "v1"  # no dockyard runs; the agent does
        assert main(["restore", str(archive), "--data-dir", str(new)]) == 0
        with app(new) as b:
            after = b.get(f"/v1/repos/{dep}").json()
            for key in ("promoted", "generation", "spec"):
                assert after[key] == before[key], key
            slot = after["slots"][0]
            assert (slot["state"], slot["commit"], slot["host_port"]) == ("PROMOTED", v1, port)
            assert dep in {d["id"] for d in b.get("/v1/status").json()["deployments"]}
            assert get(port) == "v1"
            assert b.delete(f"/v1/repos/{dep}").status_code == 200
    finally:
        for color in ("blue", "green"):  # whatever a failure above left of ours
            subprocess.run(["podman", "rm", "-f", f"dockyard-{dep}-{color}"], capture_output=True)
        if v1:  # the image built from this test's commit
            found = subprocess.run(
                ["podman", "images", "-q", "--filter", f"label=io.dockyard.source.commit={v1}"],
                capture_output=True,
                text=True,
            )
            for image in set(found.stdout.split()):
                subprocess.run(["podman", "rmi", "-f", image], capture_output=True)
