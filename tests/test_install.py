"""``dockyard install`` / ``uninstall`` (``api/cli_install.py``): the units it writes pass
``systemd-analyze verify``, land in a temporary root with their ``WantedBy=`` symlink, and
``uninstall`` leaves that root as it found it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dockyard.api import cli_install
from dockyard.api.cli import main

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (contrib/ci/setup-podman.sh installs systemd)",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake home, so the user unit's place is known."""
    home = tmp_path / "home" / "operator"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def verify(unit: Path, mode: str, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of one unit file (the user manager wants a runtime dir)."""
    runtime_dir.mkdir(exist_ok=True)
    command = ["systemd-analyze", "verify", "--man=no"]
    if mode == "user":
        command.append("--user")
    return subprocess.run(
        [*command, str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime_dir)},
    )


@needs_analyze
@pytest.mark.parametrize(
    ("mode", "where", "target"),
    [
        ("system", "etc/systemd/system", "multi-user.target"),
        ("user", "home/operator/.config/systemd/user", "default.target"),
    ],
)
def test_install_into_a_root_verifies_and_uninstalls_cleanly(
    tmp_path: Path, home: Path, mode: str, where: str, target: str, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    # the fake home is under tmp_path; inside the root it is the same absolute path
    where = str(home.relative_to("/") / ".config/systemd/user") if mode == "user" else where
    assert main(["install", f"--{mode}", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    unit = root / where / "dockyard.service"
    link = root / where / f"{target}.wants" / "dockyard.service"
    assert _files(root) == sorted([str(unit.relative_to(root)), str(link.relative_to(root))])
    assert link.is_symlink() and link.resolve() == unit.resolve()
    assert f"wrote {unit}" in out
    ctl = "systemctl --user" if mode == "user" else "systemctl"
    for line in (f"{ctl} start dockyard", f"{ctl} stop dockyard", "-u dockyard -f"):
        assert line in out

    checked = verify(unit, mode, tmp_path / "runtime")
    assert checked.returncode == 0, checked.stderr
    assert "dockyard.service" not in checked.stderr, checked.stderr  # no warning about it

    text = unit.read_text()
    for setting in ("NoNewPrivileges=yes", "Restart=on-failure", "KillMode=mixed"):
        assert setting in text
    assert "PrivateUsers" not in text and "RestrictNamespaces" not in text
    if mode == "system":
        for setting in ("ProtectSystem=strict", "StateDirectory=dockyard", "PrivateTmp=yes"):
            assert setting in text
        assert "--podman-socket unix:///run/podman/podman.sock" in text
    else:
        assert "ProtectSystem" not in text
        assert "--podman-socket unix://%t/podman/podman.sock" in text

    # installing again updates in place
    assert main(["install", f"--{mode}", "--root", str(root)]) == 0
    assert f"updated {unit}" in capsys.readouterr().out

    assert main(["uninstall", f"--{mode}", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {unit}" in out and f"removed {link}" in out
    assert _files(root) == []
    assert not link.parent.exists()
    assert main(["uninstall", f"--{mode}", "--root", str(root)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit whose program does not exist is refused."""
    unit = cli_install.render("system", command=["/nonexistent/dockyard"])
    path = tmp_path / "dockyard.service"
    path.write_text(unit.text)
    checked = verify(path, "system", tmp_path / "runtime")
    assert checked.returncode != 0
    assert "/nonexistent/dockyard" in checked.stderr


@needs_analyze
def test_serve_arguments_are_quoted_for_systemd(tmp_path: Path) -> None:
    unit = cli_install.render(
        "system",
        command=[shutil.which("true") or "/bin/true"],
        serve_args=["--config", "/etc/dock yard/100%.toml"],
    )
    assert '"/etc/dock yard/100%%.toml"' in unit.text
    path = tmp_path / "dockyard.service"
    path.write_text(unit.text)
    checked = verify(path, "system", tmp_path / "runtime")
    assert checked.returncode == 0, checked.stderr


def test_print_shows_the_unit_and_writes_nothing(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["install", "--system", "--print", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Written by 'dockyard install --system'")
    assert "[Install]\nWantedBy=multi-user.target" in out
    assert list(tmp_path.iterdir()) == []


def test_bad_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["install", "--system", "--linger", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dockyard: error: --linger goes with --user") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["install"])  # a mode is required
    assert exited.value.code == 2
    assert "one of the arguments --user --system is required" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert main(["install", "--system", "--root", str(blocked)]) == 2
    assert capsys.readouterr().err.startswith("dockyard: error: cannot write")
