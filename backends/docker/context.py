"""The build context Docker is sent: the context directory as a tar, ``.dockerignore``
applied as the Docker CLI applies it (Docker's build endpoint takes the tar as it is)."""

from __future__ import annotations

import fnmatch
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool


def _translate(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go ``filepath.Match`` plus ``**``) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(char)
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^"):
                    body = "!" + body[1:]
                out += fnmatch.translate(f"[{body}]").removeprefix("(?s:").removesuffix(")\\Z")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(f"^{out}$")


def read_dockerignore(context: Path) -> list[_IgnorePattern]:
    """The context's ``.dockerignore`` patterns, as the Docker CLI reads them."""
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    patterns = []
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        line = os.path.normpath(line).replace(os.sep, "/")
        if len(line) > 1 and line.startswith("/"):
            line = line.lstrip("/")
        if line == ".":
            continue
        patterns.append(_IgnorePattern(_translate(line), exclusion))
    return patterns


def is_ignored(path: str, patterns: list[_IgnorePattern]) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is excluded: the last pattern matching it
    or one of its parent directories wins, ``!`` patterns re-include."""
    parts = path.split("/")
    parents = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    matched = False
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue
        if any(pattern.regex.match(p) for p in parents):
            matched = not pattern.exclusion
    return matched


def _walk(context: Path, patterns: list[_IgnorePattern]) -> Iterator[tuple[Path, str]]:
    has_exceptions = any(p.exclusion for p in patterns)
    for root, dirs, files in os.walk(context):
        rel_root = Path(root).relative_to(context).as_posix()
        prefix = "" if rel_root == "." else f"{rel_root}/"
        kept = []
        for name in sorted(dirs):
            rel = prefix + name
            if (context / rel).is_symlink():
                files.append(name)  # archived as a link, never followed
                continue
            if is_ignored(rel, patterns) and not has_exceptions:
                continue
            kept.append(name)
            if not is_ignored(rel, patterns):
                yield context / rel, rel
        dirs[:] = kept
        for name in sorted(files):
            rel = prefix + name
            if rel in (".dockerignore",) or not is_ignored(rel, patterns):
                yield context / rel, rel


def context_tar(context: Path, dockerfile: str) -> io.BufferedRandom:
    """The build context as a tar in a temporary file, ``.dockerignore`` applied (the
    Dockerfile and ``.dockerignore`` are always sent, as the Docker CLI does); owners are
    root, special files are left out."""
    patterns = read_dockerignore(context)
    out = tempfile.TemporaryFile(prefix="dockyard-context-")  # noqa: SIM115 - returned open
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            sent: set[str] = set()
            for path, rel in _walk(context, patterns):
                info = tar.gettarinfo(str(path), arcname=rel)
                if not (info.isfile() or info.isdir() or info.issym()):
                    continue
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isfile():
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)
                sent.add(rel)
            if dockerfile not in sent:
                info = tar.gettarinfo(str(context / dockerfile), arcname=dockerfile)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(context / dockerfile, "rb") as handle:
                    tar.addfile(info, handle)
        out.seek(0)
        return out  # type: ignore[return-value]
    except BaseException:
        out.close()
        raise


__all__ = ["context_tar", "is_ignored", "read_dockerignore"]
