"""The agent sandbox image: the one image Autoppia's validator runs every miner's agent in,
made by dockyard from a requirements file, without the build ever touching a network.

``dockyard sandbox-image build --requirements FILE`` (``build_sandbox_image``):

1. **Base.** The operator's ``python:3.11-slim`` when the engine has it, else dockyard's
   offline base ``localhost/dockyard/base-python:bookworm`` (``contrib/base-image/build.sh``,
   Debian's CPython 3.11.2 without pip); or ``--base IMAGE``.
2. **Probe.** A one-line build on the base prints its Python version, machine and C
   library, so the wheels fit exactly that interpreter.
3. **Wheels.** The host's pip (dockyard's own Python, run normally: the operator's pip
   configuration, indexes and proxies apply) downloads binary wheels for that Python and
   platform (``--only-binary=:all:``), plus pip itself. A requirement no wheel satisfies,
   e.g. one that needs a newer Python than the base's, is an error naming the package.
4. **Build**, with no network: a virtual environment ``/opt/agent`` is filled from the
   wheels by pip run from its own wheel (the base needs no pip), then copied alone into a
   clean stage: uid 10001, ``WORKDIR /app``, ``HOME=/tmp``, and the validator's command
   ``uvicorn main:app --host 0.0.0.0 --port $SANDBOX_AGENT_PORT``.

Everything goes through the configured runtime plugin (``Runtime.build``), so it works on
any engine dockyard supports.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dockyard.core.errors import BuildFailed, DockyardError
from dockyard.core.runtime import LABEL_MANAGED, BuildRequest, Runtime

#: Bases tried in order when none is given: the operator's, then dockyard's offline one.
DEFAULT_BASES = ("python:3.11-slim", "localhost/dockyard/base-python:bookworm")
#: The validator's sandbox user, port variable and command.
AGENT_UID = 10001
VENV = "/opt/agent"
#: The validator's start command (a shell expands the port variable).
COMMAND = "exec uvicorn main:app --host 0.0.0.0 --port ${SANDBOX_AGENT_PORT:-8000}"
LABEL_REQUIREMENTS = "io.dockyard.sandbox.requirements"
LABEL_BASE = "io.dockyard.sandbox.base"
LABEL_PYTHON = "io.dockyard.sandbox.python"
_PROBE_MARK = "DOCKYARD-PYTHON"
#: The oldest glibc manylinux wheels target (manylinux2014 = glibc 2.17).
_MANYLINUX_FLOOR = 17

Log = Callable[[str], None]


class SandboxImageError(DockyardError):
    """The sandbox image cannot be made; the message says what to change."""

    reason = "sandbox_image_failed"
    status_code = 422


@dataclass(frozen=True)
class PythonTarget:
    """The base image's interpreter, as its own ``platform`` module reports it."""

    version: str  # e.g. "3.11.2"
    machine: str  # e.g. "x86_64"
    libc: str  # "glibc" expected
    libc_version: str  # e.g. "2.36"

    @property
    def abi(self) -> str:
        major, minor = self.version.split(".")[:2]
        return f"cp{major}{minor}"

    def platforms(self) -> list[str]:
        """pip ``--platform`` tags this interpreter can load, newest glibc first."""
        if self.libc != "glibc":
            raise SandboxImageError(
                f"the base's Python uses {self.libc or 'an unknown C library'}; only "
                "glibc-based bases (Debian, Ubuntu, python:*-slim) are supported"
            )
        major, minor = (int(p) for p in self.libc_version.split(".")[:2])
        tags = [
            f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, _MANYLINUX_FLOOR - 1, -1)
        ]
        return [*tags, f"manylinux2014_{self.machine}"]  # pip adds 2010 and 1 to this one


@dataclass(frozen=True)
class SandboxImage:
    """What was built."""

    tag: str
    image_id: str
    base: str
    python: PythonTarget
    wheels: list[str]


async def choose_base(runtime: Runtime, base: str | None = None) -> str:
    """``base`` when given (it must exist), else the first of ``DEFAULT_BASES`` the engine
    has. Images are never pulled."""
    candidates = [base] if base else list(DEFAULT_BASES)
    for candidate in candidates:
        if await runtime.image_exists(candidate):
            return candidate
    if base:
        raise SandboxImageError(f"base image {base!r} does not exist on this host (never pulled)")
    raise SandboxImageError(
        "no base image: neither python:3.11-slim nor localhost/dockyard/base-python:bookworm "
        "exists on this host; run contrib/base-image/build.sh or load python:3.11-slim"
    )


async def probe_python(runtime: Runtime, base: str, *, timeout_s: float = 120) -> PythonTarget:
    """Build a throw-away image on ``base`` whose only step prints its Python's version,
    machine and C library; the image is removed."""
    code = (
        "import platform; "
        f"print({_PROBE_MARK!r}, platform.python_version(), platform.machine(), "
        "*(platform.libc_ver() or ('', '')))"
    )
    tag = f"localhost/dockyard/sandbox-probe:{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="dockyard-probe-") as context:
        (Path(context) / "Dockerfile").write_text(f'FROM {base}\nRUN ["python3", "-c", "{code}"]\n')
        lines: list[str] = []
        try:
            built = await runtime.build(
                BuildRequest(
                    context=context, tag=tag, labels={LABEL_MANAGED: "true"}, timeout_s=timeout_s
                ),
                lines.append,
            )
            lines.extend(built.log)
        except DockyardError as exc:
            raise SandboxImageError(
                f"base image {base!r} has no working python3: {exc.message}"
            ) from None
        finally:
            await runtime.remove_image(tag, force=True)
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == _PROBE_MARK:
            libc, libc_version = (parts[3], parts[4]) if len(parts) >= 5 else ("", "")
            return PythonTarget(parts[1], parts[2], libc, libc_version)
    raise SandboxImageError(f"base image {base!r}: its python3 did not report its version")


def pip_command() -> list[str]:
    """The host's pip: dockyard's own Python's, else ``pip3`` on PATH."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    if found:
        return [found]
    raise SandboxImageError("pip is needed on this host to download the wheels (python3 -m pip)")


def download_wheels(
    requirements: Path,
    target: PythonTarget,
    dest: Path,
    *,
    pip: Sequence[str] | None = None,
    on_log: Log | None = None,
    timeout_s: float = 1800,
) -> list[str]:
    """Download binary wheels of ``requirements`` (and of pip) for ``target`` into ``dest``
    with the host's pip, configured as the operator configured it; the wheel file names.

    :raises SandboxImageError: naming the requirement that cannot be satisfied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        *(pip or pip_command()),
        "download",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        target.version,
        "--implementation",
        "cp",
        "--abi",
        target.abi,
        *(arg for platform in target.platforms() for arg in ("--platform", platform)),
        "--progress-bar",
        "off",
        "--no-input",
        "-r",
        str(requirements),
        "pip",
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise SandboxImageError(f"downloading the wheels took over {timeout_s:g} s") from None
    if on_log:
        for line in (done.stdout + done.stderr).splitlines():
            on_log(line)
    if done.returncode != 0:
        raise SandboxImageError(_explain_pip_failure(done.stderr + done.stdout, target))
    return sorted(p.name for p in dest.iterdir() if p.name.endswith(".whl"))


def _explain_pip_failure(output: str, target: PythonTarget) -> str:
    """One sentence naming the requirement pip could not satisfy, and why."""
    platform = f"CPython {target.version} on {target.machine} (glibc {target.libc_version})"
    newer = re.search(
        r"Package '([^']+)' requires a different Python: \S+ not in '([^']+)'", output
    )
    if newer:
        name, spec = newer.groups()
        return (
            f"requirement {name!r} needs Python {spec}, but the base image has {target.version}; "
            f"pin an older release of {name} or use a base with a newer Python (--base)"
        )
    missing = re.search(r"No matching distribution found for (\S+)", output)
    if missing:
        name = missing.group(1)
        ignored = re.search(
            r"Ignored the following versions that require a different python version: (.+)",
            output,
        )
        if ignored:
            return (
                f"requirement {name!r}: every release that matches needs a newer Python than "
                f"the base image's {target.version} ({ignored.group(1).strip()[:200]}); pin an "
                "older release or use a base with a newer Python (--base)"
            )
        return (
            f"requirement {name!r}: no binary wheel for {platform} (the sandbox installs "
            "wheels only, nothing is compiled)"
        )
    tail = [line for line in output.splitlines() if line.strip()][-3:]
    return "pip download failed: " + " | ".join(tail)[:500]


def dockerfile(base: str, pip_wheel: str) -> str:
    """The sandbox image's Dockerfile: install from the wheels offline, then a clean stage
    with only the virtual environment, the validator's user, directory and command (the
    runtime adds the labels)."""
    user = (
        "import pathlib; "
        f"pathlib.Path('/etc/passwd').open('a').write('agent:x:{AGENT_UID}:{AGENT_UID}:"
        "agent:/tmp:/usr/sbin/nologin\\\\n'); "
        f"pathlib.Path('/etc/group').open('a').write('agent:x:{AGENT_UID}:\\\\n')"
    )
    return f"""\
FROM {base} AS install
COPY wheels /tmp/wheels
COPY requirements.txt /tmp/requirements.txt
RUN ["python3", "-m", "venv", "--without-pip", "{VENV}"]
RUN ["{VENV}/bin/python", "/tmp/wheels/{pip_wheel}/pip", "install", "--no-index", \
"--no-cache-dir", "--disable-pip-version-check", "--find-links", "/tmp/wheels", \
"-r", "/tmp/requirements.txt"]

FROM {base}
COPY --from=install {VENV} {VENV}
RUN ["python3", "-c", "{user}"]
ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    HOME=/tmp PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SANDBOX_AGENT_PORT=8000
WORKDIR /app
USER {AGENT_UID}:{AGENT_UID}
EXPOSE 8000
CMD ["/bin/sh", "-c", "{COMMAND}"]
"""


async def build_sandbox_image(
    runtime: Runtime,
    requirements: Path,
    tag: str,
    *,
    base: str | None = None,
    pip: Sequence[str] | None = None,
    on_log: Log | None = None,
    timeout_s: float = 1800,
    memory_mb: int = 2048,
    cpus: float = 2.0,
) -> SandboxImage:
    """Make the agent sandbox image ``tag`` from ``requirements`` (see the module)."""
    import asyncio

    log = on_log or (lambda _line: None)
    if not requirements.is_file():
        raise SandboxImageError(f"requirements file {requirements} does not exist")
    chosen = await choose_base(runtime, base)
    log(f"base image: {chosen}")
    target = await probe_python(runtime, chosen)
    log(f"base Python: {target.version} ({target.machine}, {target.libc} {target.libc_version})")
    with tempfile.TemporaryDirectory(prefix="dockyard-sandbox-") as tmp:
        context = Path(tmp)
        shutil.copyfile(requirements, context / "requirements.txt")
        wheels = await asyncio.to_thread(
            download_wheels, requirements, target, context / "wheels", pip=pip, on_log=log
        )
        pip_wheel = next(
            (w for w in wheels if re.fullmatch(r"pip-[^-]+-py3-none-any\.whl", w)), None
        )
        if pip_wheel is None:
            raise SandboxImageError("pip download did not fetch a pip wheel")
        digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
        labels = {
            LABEL_MANAGED: "true",
            LABEL_REQUIREMENTS: digest,
            LABEL_BASE: chosen,
            LABEL_PYTHON: target.version,
        }
        (context / "Dockerfile").write_text(dockerfile(chosen, pip_wheel))
        log(f"building {tag} from {len(wheels)} wheels (no network)")
        try:
            built = await runtime.build(
                BuildRequest(
                    context=str(context),
                    tag=tag,
                    labels=labels,
                    network=False,
                    memory_mb=memory_mb,
                    cpus=cpus,
                    timeout_s=timeout_s,
                ),
                log,
            )
        except BuildFailed as exc:
            raise SandboxImageError(f"building {tag} failed: {exc.message}") from None
    return SandboxImage(tag=tag, image_id=built.id, base=chosen, python=target, wheels=wheels)


__all__ = [
    "AGENT_UID",
    "DEFAULT_BASES",
    "PythonTarget",
    "SandboxImage",
    "SandboxImageError",
    "build_sandbox_image",
    "choose_base",
    "dockerfile",
    "download_wheels",
    "probe_python",
]
