"""The ``git`` source: fetch exactly one commit of a stranger's repository, safely.

What it enforces (see ``docs/SECURITY.md``, "Fetching"):

- **URLs** (:func:`parse_repo_url`): ``https`` only, host in the operator's allowlist
  (default ``github.com``), path ``/owner/repo[.git]`` from a strict character set, plus
  GitHub's ``/owner/repo/tree/<ref>`` and ``/owner/repo/commit/<40-hex>`` forms. Userinfo,
  ports, queries, fragments, ``::``, backslashes, ``%``, whitespace, control and non-ASCII
  characters are refused. Only with ``insecure_sources`` (tests, operators) are
  ``git://127.x.x.x[:port]/path``, ``http://127.x.x.x[:port]/path`` and local absolute
  paths / ``file:///path`` accepted; never another host.
- **Redirects**: the fetch repository sets ``http.followRedirects=false``; libgit2 then
  refuses any redirect to another host ("cannot redirect from 'a' to 'b'"), on every request.
  (libgit2 still follows a redirect that stays on the same host, e.g. GitHub's
  renamed-repository redirects.) No proxy is used, and the host's git configuration
  (``~/.gitconfig``, ``/etc/gitconfig``: ``insteadOf`` rewrites, ``sslVerify``, ...) is
  ignored.
- **Refs**: resolved against the remote every time (branch first, then tag; annotated tags
  peeled; ``None`` is the remote's default branch). A 40-hex commit is fetched directly by
  SHA. An abbreviated SHA (4 to 39 hex digits, both digits and letters) is refused before
  anything is fetched (``invalid_repo_url``: a full commit is required); a hex-looking name
  of digits only or letters only (``20240101``, ``deadbeef``) is looked up as a branch or
  tag, and ends ``ref_not_found`` when the remote has none.
- **Fetch**: shallow (depth 1) of exactly that commit, no tags, no submodules (gitlinks are
  left as empty directories, nothing is contacted), no hooks and no filters beyond libgit2's
  built-in ones (libgit2 cannot run external programs: no LFS smudge, no filter drivers).
- **Limits during the fetch**: the whole fetch runs in a child process of its own (one per
  fetch, started ahead of time and waiting for its job: :class:`WarmWorkers`; its code is
  ``git_fetcher``, which imports only the standard library and pygit2) that is killed
  at the wall-clock timeout (a stalled server sends no progress, so a callback could never
  fire);
  the byte cap is checked in libgit2's transfer-progress callback (fired every ~100 KB), and
  raising there aborts the download early; the file cap, a directory cap (same number) and
  the unpacked size (same cap as the download) are checked on the fetched tree before
  anything is written to the work tree.
- **Checkout**: written to a temporary directory, checked, then renamed into
  ``<cache>/<sha256(url)[:32]>/<commit>`` (atomic: a visible entry is always complete);
  HEAD is verified to equal the resolved commit. Any symlink with an absolute target or
  whose real path leaves the checkout refuses the whole repository (``path_escapes_repo``),
  so nothing in a cached checkout can point at host files.
- **Paths**: ``subdir`` and ``dockerfile`` (relative to ``subdir``) are refused lexically if
  they climb out, then resolved with ``realpath`` and required to stay inside the checkout
  and outside ``.git``.

Nothing blocking runs on the event loop: the fetch child is started and talked to from
worker threads, filesystem work runs in ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dockyard.core import children
from dockyard.core.errors import SourceError
from dockyard.core.hookspecs import hookimpl
from dockyard.core.source import FetchedSource, Source, SourceLimits, SourceRequest
from dockyard.plugins.git_fetcher import (
    ESCAPES,
    FAILED,
    META_FILE,
    READY,
    REF_NOT_FOUND,
    TOO_LARGE,  # noqa: F401 - the reasons stay importable from here
    UNREACHABLE,  # noqa: F401
    read_head,
)

__all__ = [
    "GitSource",
    "RepoUrl",
    "dockyard_register_sources",
    "parse_repo_url",
    "resolve_paths",
    "validate_ref",
]

INVALID_URL = "invalid_repo_url"
TIMEOUT = "fetch_timeout"
SUBDIR_NOT_FOUND = "subdir_not_found"
DOCKERFILE_NOT_FOUND = "dockerfile_not_found"

MAX_URL_LENGTH = 512
DEFAULT_HOSTS: tuple[str, ...] = ("github.com",)

_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}")
_REPO = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,99}")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9._-]{0,254}")
_LOOPBACK = re.compile(r"127\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_PORT = re.compile(r"[0-9]{1,5}")
_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_SHORT_HEX = re.compile(r"[0-9a-fA-F]{4,39}")
#: An abbreviated commit as people write them: hex with both digits and letters.
_ABBREVIATED = re.compile(r"(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{4,39}")
_REF_CHARS = re.compile(r"[A-Za-z0-9._/+-]{1,255}")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SCP_LIKE = re.compile(r"[^/:@]+@[^/:]+:")

#: How long a leftover ``.tmp-*`` directory (from a killed controller) is kept, at least.
STALE_TMP_S = 3600.0


def _refuse(message: str, **detail: Any) -> SourceError:
    return SourceError(message, reason=INVALID_URL, **detail)


@dataclass(frozen=True)
class RepoUrl:
    """A repository URL that passed :func:`parse_repo_url`.

    ``normalized`` identifies the repository (cache key, ``FetchedSource.repo``);
    ``fetch_url`` is what libgit2 is given; ``ref_from_url`` is the ref named by a
    ``/tree/<ref>`` or ``/commit/<sha>`` URL; ``local`` marks the (insecure-only) local
    transport, which cannot fetch shallow.
    """

    normalized: str
    host: str
    owner: str
    repo: str
    ref_from_url: str | None = None
    fetch_url: str = ""
    local: bool = False


def validate_ref(ref: str, *, reason: str = REF_NOT_FOUND) -> str:
    """Return ``ref`` if it is a safe git ref name or a 40-hex commit; raise SourceError.

    Accepts ``main``, ``feature/x``, ``v1.2``, ``refs/heads/main``, ``refs/tags/v1`` and
    full SHAs: the rules of ``git check-ref-format`` on the character set
    ``[A-Za-z0-9._/+-]``. An abbreviated commit (``3f9c2a1``) is refused with
    ``invalid_repo_url`` whatever ``reason`` says: nothing is fetched to find out.
    """
    why = None
    if not isinstance(ref, str) or not _REF_CHARS.fullmatch(ref):
        why = "only letters, digits and . _ / + - are allowed (at most 255)"
    elif ref.startswith(("-", "/")) or ref.endswith(("/", ".")):
        why = "it may not start with '-' or '/' nor end with '/' or '.'"
    elif ".." in ref or "//" in ref:
        why = "it may not contain '..' or '//'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        why = "no component may start with '.' or end with '.lock'"
    if why is not None:
        raise SourceError(f"invalid ref {ref!r}: {why}", reason=reason, ref=str(ref)[:300])
    if _ABBREVIATED.fullmatch(ref):
        raise SourceError(
            f"ref {ref!r} looks like an abbreviated commit; give the full 40-hex commit "
            "(or a branch or tag name)",
            reason=INVALID_URL,
            ref=ref,
        )
    return ref.lower() if _HEX40.fullmatch(ref) else ref


def _check_characters(url: str) -> None:
    if not isinstance(url, str):
        raise _refuse("the repository URL must be a string")
    if not url:
        raise _refuse("the repository URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"the repository URL is longer than {MAX_URL_LENGTH} characters")
    for ch in url:
        code = ord(ch)
        if code > 0x7E:
            raise _refuse("the repository URL contains non-ASCII or control characters")
        if code <= 0x20 or code == 0x7F:
            raise _refuse("the repository URL contains whitespace or control characters")
    if "::" in url:
        raise _refuse("'::' (git's transport-helper syntax) is not allowed in a repository URL")
    if "\\" in url:
        raise _refuse("backslashes are not allowed in a repository URL")
    if "%" in url:
        raise _refuse("percent-encoding is not allowed in a repository URL")
    if "?" in url:
        raise _refuse("a query string ('?') is not allowed in a repository URL")
    if "#" in url:
        raise _refuse("a fragment ('#') is not allowed in a repository URL")


def _split_authority(rest: str) -> tuple[str, str]:
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise _refuse("credentials (user@ / user:password@) are not allowed in a repository URL")
    return authority, slash + path


def _safe_path(path: str, what: str) -> list[str]:
    """``/seg/seg/...`` with safe segments (no '.', '..', empty or '-'-led segments)."""
    if not path.startswith("/"):
        raise _refuse(f"the {what} must be an absolute path")
    segments = path[1:].split("/")
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash
    if not segments or len(segments) > 32:
        raise _refuse(f"the {what} must have between 1 and 32 components")
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            raise _refuse(
                f"the {what} component {seg!r} is not allowed (letters, digits, . _ - only; "
                "no empty, '.' or '..' components)"
            )
    return segments


def _parse_https(rest: str, allowed_hosts: Iterable[str]) -> RepoUrl:
    authority, path = _split_authority(rest)
    if ":" in authority:
        raise _refuse("an explicit port is not allowed in a repository URL")
    host = authority.lower()
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(p) for p in host.split(".")):
        raise _refuse(f"{authority!r} is not a valid host name")
    allowed = sorted({h.strip().lower() for h in allowed_hosts if h.strip()})
    if host not in allowed:
        raise _refuse(
            f"host {host!r} is not allowed (allowed: {', '.join(allowed) or 'none'})", host=host
        )
    if not path.startswith("/"):
        raise _refuse("the URL must name a repository as /owner/repo")
    segments = path[1:].split("/")
    if len(segments) > 2 and segments[-1] == "":
        segments.pop()  # one trailing slash: https://host/owner/repo/
    if len(segments) < 2:
        raise _refuse("the URL must name a repository as /owner/repo")
    owner, repo = segments[0], segments[1]
    if not _OWNER.fullmatch(owner):
        raise _refuse(
            f"owner {owner!r} is not valid (1-39 letters, digits or '-', not starting with '-')"
        )
    if repo.endswith(".git"):
        repo = repo[: -len(".git")]
    if repo in ("", ".", "..") or not _REPO.fullmatch(repo):
        raise _refuse(
            f"repository name {segments[1]!r} is not valid (1-100 letters, digits, . _ -; "
            "not '.' or '..')"
        )
    ref: str | None = None
    extra = segments[2:]
    if extra:
        kind, tail = extra[0], extra[1:]
        if kind == "tree" and tail:
            ref = validate_ref("/".join(tail), reason=INVALID_URL)
        elif kind == "commit" and len(tail) == 1:
            if not _HEX40.fullmatch(tail[0]):
                raise _refuse(f"a /commit/ URL needs a full 40-hex commit, not {tail[0]!r}")
            ref = tail[0].lower()
        else:
            raise _refuse(
                "only /owner/repo, /owner/repo/tree/<ref> and /owner/repo/commit/<sha> "
                f"are understood, not {path!r}"
            )
    normalized = f"https://{host}/{owner}/{repo}"
    return RepoUrl(
        normalized=normalized,
        host=host,
        owner=owner,
        repo=repo,
        ref_from_url=ref,
        fetch_url=normalized + ".git",
    )


def _parse_loopback(scheme: str, rest: str) -> RepoUrl:
    authority, path = _split_authority(rest)
    host, colon, port = authority.partition(":")
    match = _LOOPBACK.fullmatch(host)
    if not match or any(int(octet) > 255 or octet != str(int(octet)) for octet in match.groups()):
        raise _refuse(f"{scheme}:// is only accepted to a loopback address (127.x.x.x)")
    if colon and (not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535):
        raise _refuse(f"invalid port {port!r}")
    segments = _safe_path(path, "repository path")
    netloc = f"{host}:{int(port)}" if colon else host
    normalized = f"{scheme}://{netloc}/{'/'.join(segments)}"
    repo = segments[-1].removesuffix(".git") or segments[-1]
    return RepoUrl(
        normalized=normalized,
        host=host,
        owner="/".join(segments[:-1]),
        repo=repo,
        fetch_url=normalized,
    )


def _parse_local(path: str) -> RepoUrl:
    segments = _safe_path(path, "local repository path")
    normalized = "file:///" + "/".join(segments)
    return RepoUrl(
        normalized=normalized,
        host="",
        owner="/".join(segments[:-1]),
        repo=segments[-1].removesuffix(".git") or segments[-1],
        fetch_url=normalized,
        local=True,
    )


def parse_repo_url(
    url: str, allowed_hosts: Iterable[str] = DEFAULT_HOSTS, insecure: bool = False
) -> RepoUrl:
    """Validate and normalize a repository URL; raise ``SourceError(invalid_repo_url)``
    with a message naming what is wrong.

    Pure: no network, no filesystem. ``insecure`` additionally accepts loopback ``git://``
    and ``http://`` servers and local absolute paths (tests and operators only).
    """
    _check_characters(url)
    match = _SCHEME.match(url)
    if match is None:
        if insecure and url.startswith("/"):
            return _parse_local(url)
        if _SCP_LIKE.match(url):
            raise _refuse("scp-style ssh addresses (user@host:path) are not accepted; use https")
        raise _refuse("the repository URL must start with https://")
    scheme = match.group(1).lower()
    rest = url[match.end() :]
    if scheme == "https":
        return _parse_https(rest, allowed_hosts)
    if scheme in ("http", "git"):
        if not insecure:
            raise _refuse(f"{scheme}:// is not allowed; use https")
        return _parse_loopback(scheme, rest)
    if scheme == "file":
        if not insecure:
            raise _refuse("file:// is not allowed; use https")
        if not rest.startswith("/"):
            raise _refuse("file:// URLs must name an absolute local path (file:///path)")
        return _parse_local(rest)
    raise _refuse(f"the scheme {scheme}:// is not allowed; use https")


def merge_refs(from_url: str | None, requested: str | None) -> str | None:
    """The ref to fetch: the URL's ``/tree/<ref>`` or ``/commit/<sha>`` and the request's
    ``ref`` must agree when both are given."""
    if requested is not None:
        requested = validate_ref(requested)
    if from_url is not None and requested is not None and from_url != requested:
        raise _refuse(
            f"the URL names ref {from_url!r} but the request asks for {requested!r}",
            url_ref=from_url,
            ref=requested,
        )
    return from_url if from_url is not None else requested


# ---------------------------------------------------------------------------- paths
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _lexical_paths(subdir: str, dockerfile: str | None) -> None:
    """Refuse ``subdir``/``dockerfile`` that climb out before anything is fetched."""
    for label, value in (("subdir", subdir), ("dockerfile", dockerfile)):
        if value is None:
            continue
        if "\x00" in value or "\\" in value:
            raise SourceError(f"{label} {value!r} contains forbidden characters", reason=ESCAPES)
        if os.path.isabs(value):
            raise SourceError(f"{label} {value!r} must be relative", reason=ESCAPES)
    joined = os.path.normpath(os.path.join(subdir or ".", dockerfile or "."))
    base = os.path.normpath(subdir or ".")
    for label, value in (("subdir", base), ("dockerfile", joined)):
        if value == ".." or value.startswith(".." + os.sep):
            raise SourceError(f"{label} {value!r} leaves the repository", reason=ESCAPES)
        if value.split(os.sep)[0] == ".git":
            raise SourceError(f"{label} {value!r} points into .git", reason=ESCAPES)


def resolve_paths(checkout: str, subdir: str, dockerfile: str | None) -> tuple[str, str | None]:
    """Resolve the build context and the Dockerfile with ``realpath`` (symlinks followed)
    and require both inside ``checkout`` and outside its ``.git``.

    :return: ``(context, dockerfile)`` as absolute real paths.
    :raises SourceError: ``path_escapes_repo``, ``subdir_not_found`` or
        ``dockerfile_not_found``.
    """
    _lexical_paths(subdir, dockerfile)
    root = os.path.realpath(checkout)
    git_dir = os.path.join(root, ".git")
    context = os.path.realpath(os.path.join(root, subdir or "."))
    if not _inside(context, root) or _inside(context, git_dir):
        raise SourceError(
            f"subdir {subdir!r} resolves outside the checkout", reason=ESCAPES, subdir=subdir
        )
    if not os.path.isdir(context):
        raise SourceError(
            f"subdir {subdir!r} does not exist in the repository",
            reason=SUBDIR_NOT_FOUND,
            subdir=subdir,
        )
    if dockerfile is None:
        return context, None
    path = os.path.realpath(os.path.join(context, dockerfile))
    if not _inside(path, root) or _inside(path, git_dir):
        raise SourceError(
            f"dockerfile {dockerfile!r} resolves outside the checkout",
            reason=ESCAPES,
            dockerfile=dockerfile,
        )
    if not os.path.isfile(path):
        raise SourceError(
            f"dockerfile {dockerfile!r} does not exist in {subdir or 'the repository root'!r}",
            reason=DOCKERFILE_NOT_FOUND,
            dockerfile=dockerfile,
        )
    return context, path


# ---------------------------------------------------------------------------- the source


class GitSource(Source):
    """Fetches one commit of a git repository into a cache keyed by URL and commit."""

    name: ClassVar[str] = "git"

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        allowed_hosts: Sequence[str] = DEFAULT_HOSTS,
        insecure: bool = False,
        limits: SourceLimits | None = None,
        local_repos: Sequence[str] = (),
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.allowed_hosts = tuple(h.strip().lower() for h in allowed_hosts if h.strip())
        self.insecure = insecure
        self.limits = limits or SourceLimits()
        self.local_repos = frozenset(os.path.realpath(p) for p in local_repos)
        WORKERS.warm()  # the first fetch finds its child ready

    @classmethod
    def from_settings(cls, settings: Any) -> GitSource:
        """The factory registered with dockyard: cache under ``<data_dir>/sources``."""
        return cls(
            cache_dir=settings.data_path / "sources",
            allowed_hosts=settings.allowed_git_hosts,
            insecure=settings.insecure_sources,
            local_repos=settings.local_repos,
            limits=SourceLimits(
                timeout_s=settings.fetch_timeout_s,
                max_bytes=settings.fetch_max_bytes,
                max_files=settings.fetch_max_files,
            ),
        )

    def accepts(self, url: str) -> bool:
        """Anything that looks like a git address (it may still be refused in fetch)."""
        if not isinstance(url, str):
            return False
        match = _SCHEME.match(url)
        if match:
            return match.group(1).lower() in {
                "https",
                "http",
                "git",
                "ssh",
                "git+ssh",
                "ssh+git",
                "file",
            }
        return url.startswith("/") or bool(_SCP_LIKE.match(url))

    def parse(self, url: str) -> RepoUrl:
        """:func:`parse_repo_url` with this source's allowlist and insecure flag; a local
        path is also accepted when it is exactly one of the operator's ``local_repos``."""
        if self.local_repos and isinstance(url, str):
            path = url.removeprefix("file://")
            if path.startswith("/") and os.path.realpath(path) in self.local_repos:
                return parse_repo_url(url, self.allowed_hosts, insecure=True)
        return parse_repo_url(url, self.allowed_hosts, self.insecure)

    def validate(self, url: str, ref: str | None) -> None:
        """Refuse a bad URL or ref before anything is stored (no I/O)."""
        parsed = self.parse(url)
        merge_refs(parsed.ref_from_url, ref)

    def repo_cache_dir(self, parsed: RepoUrl) -> Path:
        """``<cache_dir>/<sha256(normalized url)[:32]>``."""
        digest = hashlib.sha256(parsed.normalized.encode()).hexdigest()[:32]
        return self.cache_dir / digest

    async def fetch(self, request: SourceRequest) -> FetchedSource:
        """Fetch ``request`` (see the module docstring for every check on the way)."""
        parsed = self.parse(request.repo)
        ref = merge_refs(parsed.ref_from_url, request.ref)
        _lexical_paths(request.subdir, request.dockerfile)
        repo_dir = self.repo_cache_dir(parsed)
        await asyncio.to_thread(_prepare_dir, repo_dir, self.limits.timeout_s)

        if ref is not None and _HEX40.fullmatch(ref):
            meta = await asyncio.to_thread(_cached_entry, repo_dir / ref, ref)
            if meta is not None:
                return await self._result(parsed, request, ref, meta, repo_dir / ref, True)

        tmp = repo_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            job = {
                "url": parsed.fetch_url,
                "ref": ref,
                "local": parsed.local,
                "tmp": str(tmp),
                "repo_dir": str(repo_dir),
                "max_bytes": self.limits.max_bytes,
                "max_files": self.limits.max_files,
                "timeout_s": self.limits.timeout_s,
            }
            outcome = await _run_worker(job, self.limits.timeout_s)
            commit = outcome["commit"]
            final = repo_dir / commit
            if outcome.get("cached"):
                meta = await asyncio.to_thread(_cached_entry, final, commit)
                if meta is not None:
                    meta["resolved_ref"] = outcome.get("resolved_ref")
                    return await self._result(parsed, request, ref, meta, final, True)
                raise SourceError(f"cached checkout of {commit} vanished", reason=FAILED)
            # Paths are checked before publishing: a refused request leaves nothing behind.
            with _recording_commit(commit):
                await asyncio.to_thread(
                    resolve_paths, str(tmp / "checkout"), request.subdir, request.dockerfile
                )
            await asyncio.to_thread(_publish, tmp / "checkout", final, commit)
            return await self._result(parsed, request, ref, outcome, final, False)
        finally:
            await asyncio.to_thread(_cleanup, tmp, repo_dir)

    async def _result(
        self,
        parsed: RepoUrl,
        request: SourceRequest,
        ref: str | None,
        meta: Mapping[str, Any],
        checkout: Path,
        cached: bool,
    ) -> FetchedSource:
        with _recording_commit(meta["commit"]):
            context, dockerfile = await asyncio.to_thread(
                resolve_paths, str(checkout), request.subdir, request.dockerfile
            )
        return FetchedSource(
            repo=parsed.normalized,
            ref=ref,
            resolved_ref=meta.get("resolved_ref"),
            commit=meta["commit"],
            checkout=os.path.realpath(checkout),
            context=context,
            dockerfile=dockerfile,
            bytes_received=0 if cached else int(meta.get("bytes_received", 0)),
            files=int(meta.get("files", 0)),
            cached=cached,
        )


@contextlib.contextmanager
def _recording_commit(commit: str) -> Iterator[None]:
    """A SourceError raised once ``commit`` is known carries it (``detail['commit']``):
    a refusal after the fetch still says which commit was refused."""
    try:
        yield
    except SourceError as exc:
        exc.detail.setdefault("commit", commit)
        raise


# ---------------------------------------------------------------------------- cache helpers
def _prepare_dir(repo_dir: Path, timeout_s: float) -> None:
    """Create the repository's cache directory and sweep temp dirs a dead process left."""
    repo_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    repo_dir.mkdir(exist_ok=True, mode=0o700)
    horizon = time.time() - max(STALE_TMP_S, 2 * timeout_s)
    for entry in repo_dir.iterdir():
        if entry.name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                if entry.lstat().st_mtime < horizon:
                    shutil.rmtree(entry, ignore_errors=True)


def _cached_entry(checkout: Path, commit: str) -> dict[str, Any] | None:
    """The recorded metadata of a complete cached checkout of ``commit``, or None.

    A directory whose detached HEAD is not ``commit`` is not trusted and is removed. A hit
    renews the directory's mtime: garbage collection ages a checkout from its last use.
    """
    if not checkout.is_dir():
        return None
    if read_head(checkout) != commit:
        shutil.rmtree(checkout, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):
        os.utime(checkout)
    try:
        meta = json.loads((checkout / ".git" / META_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    return {"commit": commit, "resolved_ref": None, "files": meta.get("files", 0)}


def _publish(src: Path, final: Path, commit: str) -> None:
    """Rename a verified checkout into place (atomic). A concurrent fetch that won keeps
    its copy; an entry that is not a checkout of ``commit`` is replaced."""
    if read_head(src) != commit:
        raise SourceError(f"checkout HEAD is not {commit}", reason=FAILED)
    for _attempt in range(3):
        try:
            os.rename(src, final)
            return
        except OSError:
            if read_head(final) == commit:
                return
            shutil.rmtree(final, ignore_errors=True)
    raise SourceError(f"cannot store the checkout of {commit} in the cache", reason=FAILED)


def _cleanup(tmp: Path, repo_dir: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        repo_dir.rmdir()  # only when empty: a failed first fetch leaves nothing behind


# ---------------------------------------------------------------------------- the worker
_WORKER_CODE = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
    "from dockyard.plugins.git_fetcher import main; main()"
)


def _worker_env() -> dict[str, str]:
    """The parent's environment without git or proxy variables."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    return {
        k: v for k, v in os.environ.items() if not k.startswith("GIT_") and k.lower() not in drop
    }


#: How long a fetch waits for a spare that is still starting before it starts its own.
SPARE_WAIT_S = 10.0


class WarmWorkers:
    """Fetch children started ahead of time, so a fetch does not wait for an interpreter
    to start and import pygit2 (~0.3 s on a CI-sized host, ten times ``git clone``).

    A spare child is started (in a thread, off the event loop), imports what the fetch
    needs, says :data:`READY` and blocks reading its job from stdin; a spare counts as one
    only once it said so. A fetch takes the spare (or starts its own when none comes within
    :data:`SPARE_WAIT_S`) and starts the next one once it is done; a child serves exactly
    one job and exits, so isolation is unchanged: its own session, no git or proxy
    variables, killed at the timeout. A spare that died while waiting (or was killed) is
    found dead and replaced. Spares left when dockyard exits see their stdin close and
    exit; ``atexit`` kills them too.
    """

    def __init__(self, spares: int = 1) -> None:
        self.spares = spares
        self._ready: list[subprocess.Popen[bytes]] = []
        self._changed = threading.Condition()
        self._starting = 0
        self.started = 0  # children started in all, for tests and benchmarks

    def _start(self) -> subprocess.Popen[bytes]:
        # children.popen: forked from one long-lived thread with PR_SET_PDEATHSIG, so a
        # killed dockyard leaves no fetch child (and a spare outlives no refill thread).
        process = children.popen(
            args=[sys.executable, "-I", "-c", _WORKER_CODE, json.dumps([p for p in sys.path if p])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=_worker_env(),
            cwd="/",
        )
        with self._changed:
            self.started += 1
        return process

    def _refill(self) -> None:
        process = None
        try:
            process = self._start()
            assert process.stdout is not None
            if process.stdout.readline() != READY:  # it died starting: not a spare
                _reap(process)
                process = None
        finally:
            with self._changed:
                self._starting -= 1
                if process is not None:
                    self._ready.append(process)
                self._changed.notify_all()

    def warm(self) -> None:
        """Start spares (in background threads) until ``spares`` are ready or starting."""
        with self._changed:
            missing = max(0, self.spares - len(self._ready) - self._starting)
            self._starting += missing
        for _ in range(missing):
            threading.Thread(target=self._refill, name="dockyard-fetch-spare", daemon=True).start()

    def take(self, wait_s: float = SPARE_WAIT_S) -> subprocess.Popen[bytes]:
        """A live spare (waiting up to ``wait_s`` for one being started), or a child started
        now when none is coming in time (blocking: call it in a thread)."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._changed:
                while not self._ready and self._starting:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                process = self._ready.pop(0) if self._ready else None
            if process is None:
                return self._start()
            if process.poll() is None:
                return process
            _reap(process)  # died while waiting: replaced by the next one

    def close(self) -> None:
        """Kill every spare (at exit)."""
        with self._changed:
            ready, self._ready = self._ready, []
        for process in ready:
            _reap(process)


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Kill a child's whole session and collect it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    process.wait()


WORKERS = WarmWorkers()
atexit.register(WORKERS.close)


async def _run_worker(job: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run the blocking fetch in a child process (a warm spare when one is ready), killed
    at ``timeout_s`` (counted from the job's hand-over) or when the fetch is cancelled."""
    proc = await asyncio.to_thread(WORKERS.take)
    try:
        out, err = await asyncio.wait_for(
            asyncio.to_thread(proc.communicate, json.dumps(job).encode()), timeout=timeout_s
        )
    except TimeoutError:
        raise SourceError(
            f"fetching {job['url']} took longer than {timeout_s:g} s and was stopped",
            reason=TIMEOUT,
            timeout_s=timeout_s,
        ) from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(asyncio.to_thread(proc.wait))
        WORKERS.warm()  # the next fetch's child starts now, after this one's work
    try:
        outcome = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        tail = err.decode(errors="replace")[-2000:]
        raise SourceError(
            f"the fetch worker failed (exit {proc.returncode})", reason=FAILED, stderr=tail
        ) from None
    if not outcome.get("ok"):
        raise SourceError(
            outcome.get("message", "fetch failed"),
            reason=outcome.get("reason", FAILED),
            **outcome.get("detail", {}),
        )
    return dict(outcome)


# ---------------------------------------------------------------------------- the plugin
@hookimpl
def dockyard_register_sources(register: Any) -> None:
    """Register the ``git`` source."""
    register("git", GitSource.from_settings)
