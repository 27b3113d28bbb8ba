"""The runtime contract's harness: the busybox test image, its build context, and the rule
that an engine missing here is a skip, except on CI (``CI=true``), where it is a failure.

The image is made of the host's static busybox (Debian's ``busybox-static``): a static
``/health``, a CGI reporting the container's own capabilities, ulimits and writable paths,
and a build argument echoed by a ``RUN`` step together with the build's network interfaces.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import pytest

from dockyard.core.runtime import BuiltImage

ON_CI = os.environ.get("CI", "").lower() == "true"
#: Label on every container a test creates; the ``runtime`` fixture removes them afterwards.
TEST_LABEL = "io.dockyard.test"


class EngineProbe(Protocol):
    """Looks at an engine *without* the runtime under test (its CLI, its API). Optional: a
    suite run without one checks only what the runtime itself reports."""

    @property
    def rootless(self) -> bool: ...

    def build_containers(self, name_part: str) -> list[str]:
        """Build containers left on the engine that belong to a build of ``name_part``."""
        ...


PROBE_CGI = r"""#!/bin/sh
writable() { if touch "$1" 2>/dev/null; then echo yes; else echo no; fi; }
echo "Content-Type: text/plain"
echo ""
echo "uid=$(id -u)"
grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | tr -d ' \t' | tr ':' '='
echo "nofile=$(ulimit -n)"
echo "nproc=$(ulimit -u)"
echo "root_writable=$(writable /rootfs-write-test)"
echo "tmp_writable=$(writable /tmp/write-test)"
echo "tmp_mount=$(grep ' /tmp ' /proc/mounts | cut -d' ' -f4)"
echo "env_value=${DOCKYARD_TEST_VALUE:-}"
echo "mounted=$(cat /data/mounted.txt 2>/dev/null)"
echo "mount_writable=$(writable /data/write-test)"
"""

DOCKERFILE = """\
FROM scratch
ARG GREETING=unset
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY www /www
RUN echo "greeting=$GREETING" && echo "$GREETING" > /www/greeting.txt \\
    && sed -n 's/^ *\\([^:]*\\):.*/build-iface=\\1/p' /proc/net/dev
CMD ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
"""


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``; on CI, fail instead (every engine must run there)."""
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: engines are never skipped on CI)", pytrace=False)
    pytest.skip(reason)


def busybox_path() -> Path:
    """The static busybox the test images are made of (Debian's busybox-static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file():
            return path
    unavailable("busybox is not installed: apt-get install busybox-static")


def make_context(directory: Path, dockerfile: str = DOCKERFILE) -> Path:
    """A build context: busybox, a static ``/health``, a probe CGI, and ``dockerfile``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox_path(), directory / "busybox")
    www = directory / "www"
    (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
    (www / "health").write_text('{"status": "ok"}\n')
    probe = www / "cgi-bin" / "probe"
    probe.write_text(PROBE_CGI)
    probe.chmod(0o755)
    (directory / "Dockerfile").write_text(dockerfile)
    return directory


@dataclass
class TestImage:
    """The session's busybox image: tag, what the build returned, the build arg it got."""

    tag: str
    built: BuiltImage
    greeting: str
    context: Path
    name: str  # repository name without registry, as in build-container names

    __test__ = False  # not a test class
