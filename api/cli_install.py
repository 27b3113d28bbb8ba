"""``dockyard install`` and ``dockyard uninstall``: dockyard as a systemd service.

``install --system`` writes ``/etc/systemd/system/dockyard.service`` (rootful: root's
Podman, state in ``/var/lib/dockyard`` made by ``StateDirectory=``); ``install --user``
writes ``~/.config/systemd/user/dockyard.service`` (rootless: the user's Podman, state in
``~/.local/share/dockyard``) and, with ``--linger``, lets the user's services run without
a login (``loginctl enable-linger``). Both enable the unit the way ``systemctl enable``
does (the ``WantedBy=`` symlink) and reload systemd when it runs; ``--root DIR`` writes
into another root instead (tests, image builds), ``--print`` only shows the unit.
``uninstall`` stops and disables the unit and removes what ``install`` wrote.

The unit runs ``dockyard serve`` against the Podman socket of Podman's own socket unit
(``podman.socket``), never a private ``podman system service`` started by dockyard: rootless
Podman needs user namespaces and ``newuidmap`` (setuid), which ``NoNewPrivileges=`` and
the filesystem sandbox below would break, so Podman stays outside dockyard's sandbox.

Hardening (``systemd-analyze verify`` checks the units, ``tests/test_install.py``; they are
not started under systemd there: the test host has no systemd as PID 1):

* both: ``NoNewPrivileges=yes``, ``UMask=0077``, ``LockPersonality=yes``,
  ``RestrictRealtime=yes``, ``RestrictSUIDSGID=yes``; ``Restart=on-failure``;
  ``KillMode=mixed`` with ``TimeoutStopSec=``: SIGTERM goes to dockyard alone, which stops
  its proxy and fetch workers itself (``dockyard serve``'s clean stop), and whatever is left
  after the timeout gets SIGKILL;
* ``--system`` also: ``ProtectSystem=strict`` (only the state directory and Podman's socket
  directory writable), ``ProtectHome=read-only`` (a ``--allow-local-repo`` under ``/home``
  stays readable), ``PrivateTmp=yes``. Not ``ProtectKernelTunables=``: the agent firewall
  writes ``/proc/sys/net/ipv4/conf/*/route_localnet``.
* ``--user`` gets no filesystem sandbox: in the user manager those options imply
  ``PrivateUsers=yes``, a user namespace that hides the subordinate ids rootless Podman's
  files belong to, and this has not been verified to hold with rootless Podman.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.core.errors import DockyardError

COMMANDS = {"install", "uninstall"}
UNIT = "dockyard.service"
#: Seconds systemd gives ``dockyard serve`` to stop cleanly before SIGKILL.
STOP_TIMEOUT_S = 60


class InstallError(DockyardError):
    """The service cannot be installed or removed; the message says why."""

    reason = "install_failed"


def add_commands(sub: Any) -> None:
    """Register ``install`` and ``uninstall`` on the main parser's subcommands."""
    for name, text in [
        ("install", "install dockyard as a systemd service (--user or --system)"),
        ("uninstall", "stop, disable and remove the service install wrote"),
    ]:
        cmd = sub.add_parser(name, help=text)
        mode = cmd.add_mutually_exclusive_group(required=True)
        mode.add_argument(
            "--user", dest="mode", action="store_const", const="user", help="rootless"
        )
        mode.add_argument(
            "--system", dest="mode", action="store_const", const="system", help="rootful"
        )
        cmd.add_argument(
            "--root", metavar="DIR", help="write into this root directory instead of /"
        )
        if name == "install":
            cmd.add_argument(
                "--print", dest="print_only", action="store_true", help="only show the unit"
            )
            cmd.add_argument(
                "--linger",
                action="store_true",
                help="with --user: run the user's services without a login (loginctl)",
            )
            cmd.add_argument(
                "--serve-arg",
                dest="serve_args",
                action="append",
                default=[],
                metavar="ARG",
                help="one more argument for 'dockyard serve' (repeatable)",
            )


@dataclass(frozen=True)
class ServiceUnit:
    """Where the unit goes and what it says, for one mode."""

    mode: str  # "user" or "system"
    unit_dir: Path  # as seen on the target host, e.g. /etc/systemd/system
    text: str

    @property
    def wanted_by(self) -> str:
        return "default.target" if self.mode == "user" else "multi-user.target"

    @property
    def systemctl(self) -> list[str]:
        return ["systemctl", "--user"] if self.mode == "user" else ["systemctl"]

    def paths(self, root: Path) -> tuple[Path, Path]:
        """The unit file and its ``WantedBy=`` symlink under ``root``."""
        unit_dir = root / self.unit_dir.relative_to("/")
        return unit_dir / UNIT, unit_dir / f"{self.wanted_by}.wants" / UNIT

    def how_to(self) -> str:
        ctl = " ".join(self.systemctl)
        journal = "journalctl --user" if self.mode == "user" else "journalctl"
        return (
            f"start:  {ctl} start dockyard\n"
            f"stop:   {ctl} stop dockyard\n"
            f"status: {ctl} status dockyard\n"
            f"logs:   {journal} -u dockyard -f   (the first start prints the admin token)"
        )


def _exec_quote(arg: str) -> str:
    """One ``ExecStart=`` word: systemd's quoting, and ``%`` (a specifier) doubled."""
    arg = arg.replace("%", "%%")
    if arg and all(c.isalnum() or c in "/._-:=+," for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dockyard_command() -> list[str]:
    """How the unit starts this dockyard: the ``dockyard`` script next to this Python, else
    this Python running the CLI module."""
    script = Path(sys.executable).parent / "dockyard"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "dockyard.api.cli"]


def render(
    mode: str,
    *,
    command: list[str] | None = None,
    serve_args: list[str] | None = None,
    home: str | None = None,
) -> ServiceUnit:
    """The unit for ``mode`` (``user`` or ``system``)."""
    if mode == "user":
        socket = "unix://%t/podman/podman.sock"  # %t: the user's XDG_RUNTIME_DIR
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(
            Path(home or Path.home()) / ".config"
        )
        unit_dir = Path(config_home) / "systemd" / "user"
        sandbox = ""
    else:
        socket = "unix:///run/podman/podman.sock"
        unit_dir = Path("/etc/systemd/system")
        sandbox = (
            "StateDirectory=dockyard\n"
            "StateDirectoryMode=0700\n"
            "ProtectSystem=strict\n"
            "ReadWritePaths=-/run/podman\n"
            "ProtectHome=read-only\n"
            "PrivateTmp=yes\n"
        )
    argv = [*(command or dockyard_command()), "serve"]
    if mode == "system":
        argv += ["--data-dir", "/var/lib/dockyard"]
    exec_start = " ".join(_exec_quote(a) for a in argv)
    extra = " ".join(_exec_quote(a) for a in serve_args or [])
    # The socket argument keeps its systemd specifier, so it is not quoted.
    exec_start += f" --podman-socket {socket}" + (f" {extra}" if extra else "")
    text = f"""\
# Written by 'dockyard install --{mode}'; 'dockyard uninstall --{mode}' removes it.
[Unit]
Description=dockyard: run agents from git, hardened, with blue/green switches
Wants=network-online.target podman.socket
After=network-online.target podman.socket

[Service]
Type=exec
ExecStart={exec_start}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=5s
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT_S}s
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
{sandbox}
[Install]
WantedBy={"default.target" if mode == "user" else "multi-user.target"}
"""
    return ServiceUnit(mode=mode, unit_dir=unit_dir, text=text)


def _systemd_runs(mode: str) -> bool:
    """Whether a systemd manager of ``mode`` runs here to reload and stop units."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return False
    if mode == "user":
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        return bool(runtime) and Path(runtime, "systemd", "private").exists()
    return True


def _systemctl(unit: ServiceUnit, *args: str) -> None:
    done = subprocess.run(
        [*unit.systemctl, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise InstallError(f"{' '.join(unit.systemctl)} {' '.join(args)}: {done.stderr.strip()}")


def _enable_linger(user: str) -> None:
    if shutil.which("loginctl") is None:
        raise InstallError("--linger needs loginctl (systemd), which is not installed")
    done = subprocess.run(
        ["loginctl", "enable-linger", user], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise InstallError(f"loginctl enable-linger {user}: {done.stderr.strip()}")


def install(args: argparse.Namespace) -> int:
    """``dockyard install``: write the unit and enable it; print how to run it."""
    if args.linger and args.mode != "user":
        raise InstallError("--linger goes with --user (a system service needs no login)")
    unit = render(args.mode, serve_args=args.serve_args)
    if args.print_only:
        print(unit.text, end="")
        return 0
    root = Path(args.root or "/")
    unit_path, link = unit.paths(root)
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        existed = unit_path.exists()
        tmp = unit_path.with_name(f".{UNIT}.tmp")
        tmp.write_text(unit.text)
        tmp.chmod(0o644)
        tmp.replace(unit_path)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / UNIT)
    except OSError as exc:
        raise InstallError(f"cannot write {unit_path}: {exc.strerror or exc}") from None
    print(f"{'updated' if existed else 'wrote'} {unit_path} (enabled: {link})")
    live = args.root is None and _systemd_runs(args.mode)
    if live:
        _systemctl(unit, "daemon-reload")
    if args.linger:
        if args.root is not None:
            print("--linger skipped: --root writes files only")
        else:
            user = os.environ.get("USER") or _current_user()
            _enable_linger(user)
            print(f"lingering enabled for {user}: the service runs without a login")
    if args.root is None and not live:
        print(
            f"systemd does not run here{' for this user' if args.mode == 'user' else ''}: "
            "the unit takes effect once it does"
        )
    print(unit.how_to())
    return 0


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def uninstall(args: argparse.Namespace) -> int:
    """``dockyard uninstall``: stop and disable the unit, remove its files (state stays)."""
    unit = render(args.mode)
    root = Path(args.root or "/")
    unit_path, link = unit.paths(root)
    live = args.root is None and _systemd_runs(args.mode)
    if live and unit_path.exists():
        _systemctl(unit, "disable", "--now", UNIT)
    removed = []
    for path in (link, unit_path):
        if path.is_symlink() or path.exists():
            try:
                path.unlink()
            except OSError as exc:
                raise InstallError(f"cannot remove {path}: {exc.strerror or exc}") from None
            removed.append(str(path))
    with_wants = link.parent
    if with_wants.is_dir() and not any(with_wants.iterdir()):
        with_wants.rmdir()
    if live:
        _systemctl(unit, "daemon-reload")
    if not removed:
        print(f"nothing to remove: {unit_path} does not exist")
        return 0
    for path in removed:
        print(f"removed {path}")
    state = "/var/lib/dockyard" if args.mode == "system" else "~/.local/share/dockyard"
    print(f"the state directory ({state}) is kept; remove it to forget every deployment")
    return 0


def main_install(args: argparse.Namespace) -> int:
    """``install`` or ``uninstall``."""
    return install(args) if args.command == "install" else uninstall(args)


__all__ = [
    "COMMANDS",
    "InstallError",
    "ServiceUnit",
    "add_commands",
    "dockyard_command",
    "main_install",
    "render",
]
