"""The agent sandbox image (``dockyard sandbox-image build``): wheels for exactly the base's
Python, a clear error naming a requirement that does not fit, and the image the validator
runs agents in (uid 10001, /app, HOME=/tmp, uvicorn on $SANDBOX_AGENT_PORT).

The pip tests run the host's real pip offline: the operator's pip configuration is honoured,
so ``PIP_NO_INDEX``/``PIP_FIND_LINKS`` point it at wheels this test makes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dockyard.plugins.evaluation.sandbox_image import (
    AGENT_UID,
    PythonTarget,
    SandboxImageError,
    _explain_pip_failure,
    dockerfile,
    download_wheels,
)
from tests.conftest import ROOT

DEBIAN = PythonTarget(version="3.11.2", machine="x86_64", libc="glibc", libc_version="2.36")


def make_wheel(folder: Path, name: str, version: str, requires_python: str | None = None) -> Path:
    """A pure-Python wheel with the given ``Requires-Python``."""
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    if requires_python:
        meta += f"Requires-Python: {requires_python}\n"
    files = {
        f"{name}/__init__.py": "VALUE = 1\n",
        f"{dist}/METADATA": meta,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text)}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def offline_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The operator's pip configuration, as environment: no index, only a local folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    make_wheel(links, "pip", "99.0")  # the image installs with pip run from its own wheel
    return links


def test_platform_tags_cover_every_glibc_up_to_the_bases() -> None:
    tags = DEBIAN.platforms()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert tags[-1] == "manylinux2014_x86_64" and DEBIAN.abi == "cp311"
    with pytest.raises(SandboxImageError, match="glibc"):
        PythonTarget("3.11.2", "x86_64", "", "").platforms()


def test_the_dockerfile_is_the_validators_sandbox() -> None:
    text = dockerfile("python:3.11-slim", "pip-25.0-py3-none-any.whl")
    assert text.startswith("FROM python:3.11-slim AS install\n")
    assert '"--no-index"' in text and "/tmp/wheels/pip-25.0-py3-none-any.whl/pip" in text
    assert f"USER {AGENT_UID}:{AGENT_UID}" in text and "WORKDIR /app" in text
    assert "HOME=/tmp" in text and "PYTHONUNBUFFERED=1" in text
    assert "uvicorn main:app --host 0.0.0.0 --port ${SANDBOX_AGENT_PORT:-8000}" in text
    # the second stage carries only the environment, not the wheels
    assert text.split("\nFROM ", 2)[1].count("wheels") == 0


def test_a_requirement_needing_a_newer_python_is_named(offline_index: Path, tmp_path: Path) -> None:
    make_wheel(offline_index, "needsnew", "1.0", ">=3.11.5")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("needsnew\n")
    with pytest.raises(SandboxImageError) as caught:
        download_wheels(requirements, DEBIAN, tmp_path / "wheels")
    message = caught.value.message
    assert "'needsnew' needs Python >=3.11.5" in message, message
    assert "the base image has 3.11.2" in message and "--base" in message


def test_wheels_are_fetched_for_the_bases_python(offline_index: Path, tmp_path: Path) -> None:
    """A wheel that fits 3.11.2 is downloaded (through the operator's configuration), pip's
    own wheel too; a requirement with no wheel at all is named."""
    make_wheel(offline_index, "fits", "2.0", ">=3.8")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("fits\n")
    wheels = download_wheels(requirements, DEBIAN, tmp_path / "wheels")
    assert wheels == ["fits-2.0-py3-none-any.whl", "pip-99.0-py3-none-any.whl"]
    requirements.write_text("absent-package\n")
    with pytest.raises(SandboxImageError, match="'absent-package': no binary wheel for CPython"):
        download_wheels(requirements, DEBIAN, tmp_path / "more")


def test_pip_failures_are_explained_in_one_sentence() -> None:
    ignored = (
        "ERROR: Ignored the following versions that require a different python version: "
        "3.0 Requires-Python >=3.12\nERROR: Could not find a version that satisfies the "
        "requirement newlib==3.0 (from versions: 1.0)\n"
        "ERROR: No matching distribution found for newlib==3.0\n"
    )
    message = _explain_pip_failure(ignored, DEBIAN)
    assert message.startswith("requirement 'newlib==3.0': every release that matches needs")
    assert "3.0 Requires-Python >=3.12" in message
    assert _explain_pip_failure("boom\n\nERROR: it broke\n", DEBIAN).endswith("ERROR: it broke")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockyard.api.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_requirements_files_are_one_line_errors(tmp_path: Path) -> None:
    result = _cli("sandbox-image", "build", "--requirements", str(tmp_path / "absent.txt"))
    assert result.returncode == 2, result
    assert result.stderr.startswith("dockyard: error: --requirements: ")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.podman
@pytest.mark.slow
def test_the_command_names_a_requirement_the_bases_python_cannot_run(
    offline_base_image: str, tmp_path: Path
) -> None:
    """Through the command and the real engine: the base's Python is probed (Debian's or
    the operator's 3.11), and a requirement needing a newer one fails in one line naming
    it, before anything is built."""
    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links, "needsnew", "1.0", ">=3.99")
    make_wheel(links, "pip", "99.0")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("needsnew\n")
    tag = "localhost/dockyard-test/agent-sandbox:never"
    result = _cli(
        "sandbox-image",
        "build",
        "--requirements",
        str(requirements),
        "--tag",
        tag,
        env={
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(links),
            "DOCKYARD_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert result.returncode == 2, result
    assert "base Python: 3.11." in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("dockyard:")]
    assert line.startswith("dockyard: error: requirement 'needsnew' needs Python >=3.99"), line
    exists = subprocess.run(["podman", "image", "exists", tag], capture_output=True)
    assert exists.returncode == 1  # nothing was built
    probes = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}", "localhost/dockyard/sandbox-probe"],
        capture_output=True,
        text=True,
    )
    assert probes.stdout.strip() == ""  # the probe image is gone


@pytest.mark.podman
@pytest.mark.slow
def test_the_image_is_the_validators_sandbox(sandbox_image: str) -> None:
    """The built image: uid 10001, /app, HOME=/tmp, uvicorn on $SANDBOX_AGENT_PORT, FastAPI
    importable offline, provenance labels."""
    inspect = subprocess.run(
        ["podman", "image", "inspect", sandbox_image],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == f"{AGENT_UID}:{AGENT_UID}" and config["WorkingDir"] == "/app"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp" and env["PATH"].startswith("/opt/agent/bin:")
    assert config["Cmd"][-1].startswith("exec uvicorn main:app --host 0.0.0.0 --port ")
    labels = config["Labels"]
    requirements = (ROOT / "tests" / "sandbox-requirements.txt").read_bytes()
    assert labels["io.dockyard.sandbox.requirements"] == hashlib.sha256(requirements).hexdigest()
    assert labels["io.dockyard.sandbox.python"].startswith("3.11.")
    run = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "--read-only", sandbox_image,
         "python", "-c", "import fastapi, uvicorn, os; print(os.getuid(), os.getcwd())"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.stdout.split() == [str(AGENT_UID), "/app"], run.stdout + run.stderr
