"""The fetch child of the ``git`` source: one process per fetch, started by
:class:`dockyard.plugins.git_source.WarmWorkers` ahead of time.

It imports only the standard library and pygit2 (not dockyard, asyncio or msgspec), so a
child is ready quickly and small; it says ``ready``, reads one job (JSON) from stdin,
resolves, fetches shallow, checks and checks out one commit, and writes one JSON line to
stdout. The caps it enforces and why are in ``git_source``'s module docstring; the parent
enforces the wall-clock timeout by killing this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

UNREACHABLE = "repo_unreachable"
REF_NOT_FOUND = "ref_not_found"
TOO_LARGE = "repo_too_large"
ESCAPES = "path_escapes_repo"
FAILED = "source_error"

META_FILE = "dockyard-fetch.json"  # inside the checkout's .git: what the child recorded
#: What a fetch child writes once it has imported everything and waits for its job.
READY = b"ready\n"

_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_SHORT_HEX = re.compile(r"[0-9a-fA-F]{4,39}")


class FetchRefused(Exception):
    """The fetch cannot go on: a stable reason (the parent's ``SourceError`` reason), a
    message and details."""

    def __init__(self, message: str, *, reason: str = FAILED, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.detail = detail


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_head(checkout: Path) -> str | None:
    """The detached HEAD commit of a checkout, or None."""
    try:
        head = (checkout / ".git" / "HEAD").read_text().strip()
    except OSError:
        return None
    return head.lower() if _HEX40.fullmatch(head) else None


class _TooLarge(Exception):
    """Raised from the transfer-progress callback to abort a fetch over the byte cap."""

    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


def main() -> None:
    """Entry point of the fetch child: a job (JSON) on stdin, one JSON line on stdout.
    pygit2 is imported before the job is read, so a warm spare has paid for it already."""
    import pygit2  # noqa: F401

    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    try:
        job = json.loads(sys.stdin.read())
        result: dict[str, Any] = {"ok": True, **fetch(job)}
    except FetchRefused as exc:
        result = {"ok": False, "reason": exc.reason, "message": exc.message, "detail": exc.detail}
    except Exception as exc:
        result = {"ok": False, "reason": FAILED, "message": f"fetch failed: {exc}"}
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def _isolate_libgit2(empty_dir: str, timeout_s: float) -> None:
    """Make libgit2 ignore the host's git configuration (system, XDG, global: no
    ``insteadOf`` rewrites, no ``sslVerify=false``, no redirects policy) and bound its
    socket waits; process-wide, which is why it only runs in the fetch child."""
    import pygit2
    from pygit2.enums import ConfigLevel

    for level in (ConfigLevel.SYSTEM, ConfigLevel.XDG, ConfigLevel.GLOBAL, ConfigLevel.PROGRAMDATA):
        pygit2.settings.search_path[level] = empty_dir
    with contextlib.suppress(Exception):
        pygit2.settings.server_connect_timeout = int(timeout_s * 1000)
        pygit2.settings.server_timeout = int(timeout_s * 1000)


def _resolve(heads: Sequence[Any], ref: str | None) -> tuple[str | None, str | None]:
    """``(resolved ref name, expected commit or None)`` from the remote's advertisement."""
    by_name = {h.name: str(h.oid) for h in heads}
    if ref is None:
        head = next((h for h in heads if h.name == "HEAD"), None)
        if head is None:
            raise FetchRefused(
                "the remote has no default branch (empty repository?)", reason=REF_NOT_FOUND
            )
        target = head.symref_target if head.symref_target in by_name else None
        return target or "HEAD", str(head.oid)
    if _HEX40.fullmatch(ref):
        return None, ref
    candidates = [ref] if ref.startswith("refs/") else [f"refs/heads/{ref}", f"refs/tags/{ref}"]
    for name in candidates:
        if name in by_name:
            return name, by_name.get(name + "^{}", by_name[name])
    if _SHORT_HEX.fullmatch(ref):
        raise FetchRefused(
            f"{ref!r} is not a branch or tag; abbreviated commits are not accepted, a full "
            "40-hex commit is required",
            reason=REF_NOT_FOUND,
            ref=ref,
        )
    raise FetchRefused(f"no branch or tag {ref!r} on the remote", reason=REF_NOT_FOUND, ref=ref)


def _scan_tree(repo: Any, tree: Any, max_files: int, max_bytes: int) -> tuple[int, list[str]]:
    """Count files and directories and sum blob sizes of ``tree`` before checkout; return
    ``(files, symlink paths)``. Refuses ``repo_too_large`` as soon as a cap is passed."""
    from pygit2.enums import FileMode

    files = dirs = size = 0
    links: list[str] = []
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        current, prefix = stack.pop()
        for entry in current:
            path = prefix + entry.name
            if entry.filemode == FileMode.TREE:
                dirs += 1
                if dirs > max_files:
                    raise FetchRefused(
                        f"the repository has more than {max_files} directories",
                        reason=TOO_LARGE,
                        max_files=max_files,
                    )
                stack.append((repo[entry.id], path + "/"))
                continue
            files += 1
            if files > max_files:
                raise FetchRefused(
                    f"the repository has more than {max_files} files",
                    reason=TOO_LARGE,
                    files_seen=files,
                    max_files=max_files,
                )
            if entry.filemode == FileMode.COMMIT:
                continue  # a submodule: never fetched, checked out as an empty directory
            size += repo.odb.read_header(entry.id)[1]
            if size > max_bytes:
                raise FetchRefused(
                    f"the checked-out files would exceed {max_bytes} bytes",
                    reason=TOO_LARGE,
                    checkout_bytes_seen=size,
                    max_bytes=max_bytes,
                )
            if entry.filemode == FileMode.LINK:
                links.append(path)
    return files, links


def _check_symlinks(repo: Any, tree: Any, root: str, links: Iterable[str]) -> None:
    """Refuse the checkout if any symlink is absolute or really resolves outside ``root``."""
    real_root = os.path.realpath(root)
    for path in links:
        target = repo[tree[path].id].data.decode(errors="replace")
        resolved = os.path.realpath(os.path.join(root, path))
        if os.path.isabs(target) or not _inside(resolved, real_root):
            raise FetchRefused(
                f"symlink {path!r} points outside the repository ({target!r})",
                reason=ESCAPES,
                symlink=path,
                target=target[:300],
            )


def fetch(job: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve, fetch shallow, check and check out one commit into ``job['tmp']/checkout``."""
    import pygit2
    from pygit2.enums import CheckoutStrategy

    tmp = Path(job["tmp"])
    empty = tmp / "empty"
    checkout = tmp / "checkout"
    empty.mkdir(parents=True, mode=0o700)
    _isolate_libgit2(str(empty), float(job["timeout_s"]))
    max_bytes, max_files = int(job["max_bytes"]), int(job["max_files"])

    repo = pygit2.init_repository(str(checkout), bare=False)
    repo.config["http.followRedirects"] = "false"
    repo.config["core.autocrlf"] = "false"
    repo.config["core.symlinks"] = "true"
    repo.config["remote.origin.tagopt"] = "--no-tags"
    remote = repo.remotes.create("origin", job["url"], "+refs/heads/*:refs/remotes/origin/*")

    def reachable() -> list[Any]:
        try:
            return list(remote.list_heads())
        except pygit2.GitError as exc:
            raise FetchRefused(f"cannot reach the repository: {exc}", reason=UNREACHABLE) from None

    if job["ref"] is not None and _HEX40.fullmatch(job["ref"]):
        # A commit is fetched by its SHA at once (one connection, as git clone makes); the
        # remote's refs are read only to tell an unreachable remote from a missing commit.
        resolved_ref, expected = None, job["ref"]
    else:
        resolved_ref, expected = _resolve(reachable(), job["ref"])
        if expected and read_head(Path(job["repo_dir"]) / expected) == expected:
            return {"commit": expected, "resolved_ref": resolved_ref, "cached": True}

    class Progress(pygit2.RemoteCallbacks):
        received = 0

        def transfer_progress(self, stats: Any) -> None:
            self.received = stats.received_bytes
            if stats.received_bytes > max_bytes:
                raise _TooLarge(stats.received_bytes)

    progress = Progress()
    local_ref = "refs/dockyard/fetched"
    spec = f"+{resolved_ref}:{local_ref}" if resolved_ref else job["ref"]
    try:
        stats = remote.fetch([spec], callbacks=progress, depth=0 if job["local"] else 1)
    except _TooLarge as exc:
        raise FetchRefused(
            f"the repository is larger than {max_bytes} bytes; the download was stopped",
            reason=TOO_LARGE,
            bytes_received=exc.received,
            max_bytes=max_bytes,
        ) from None
    except pygit2.GitError as exc:
        if resolved_ref is None:
            reachable()  # repo_unreachable when the remote itself cannot be reached
            raise FetchRefused(
                f"commit {job['ref']} is not available from the remote: it does not exist "
                f"or no branch or tag reaches it ({exc})",
                reason=REF_NOT_FOUND,
                ref=job["ref"],
            ) from None
        raise FetchRefused(f"fetching {resolved_ref} failed: {exc}", reason=UNREACHABLE) from None
    received = max(stats.received_bytes, progress.received)
    if received > max_bytes:  # under the callback's ~100 KB granularity
        raise FetchRefused(
            f"the repository is larger than {max_bytes} bytes",
            reason=TOO_LARGE,
            bytes_received=received,
            max_bytes=max_bytes,
        )

    # libgit2 stores a fetched tag under its own name whatever the refspec says; a branch
    # lands on local_ref. Fall back to the advertised commit.
    target: Any = job["ref"]
    if resolved_ref:
        target = expected
        for name in (local_ref, resolved_ref):
            if name in repo.references:
                target = repo.references[name].target
                break
    obj = repo.get(target) if target else None
    commit_obj = None
    with contextlib.suppress(Exception):
        commit_obj = obj.peel(pygit2.Commit) if obj is not None else None
    if commit_obj is None or (resolved_ref is None and str(commit_obj.id) != job["ref"]):
        raise FetchRefused(
            f"{job['ref'] or resolved_ref} does not name a commit", reason=REF_NOT_FOUND
        )
    commit = str(commit_obj.id)

    try:  # a refusal once the commit is known says which commit was refused
        files, links = _scan_tree(repo, commit_obj.tree, max_files, max_bytes)
        repo.checkout_tree(commit_obj.tree, strategy=CheckoutStrategy.FORCE)  # type: ignore[no-untyped-call]
        repo.set_head(commit_obj.id)
        for name in list(repo.references):  # only the detached HEAD stays
            repo.references.delete(name)
        _check_symlinks(repo, commit_obj.tree, str(checkout), links)
        if not repo.head_is_detached or str(repo.head.target) != commit:
            raise FetchRefused(f"checked-out HEAD is not {commit}", reason=FAILED)
    except FetchRefused as exc:
        exc.detail.setdefault("commit", commit)
        raise
    meta = {"commit": commit, "resolved_ref": resolved_ref, "files": files}
    (checkout / ".git" / META_FILE).write_text(json.dumps(meta))
    return {**meta, "bytes_received": received, "cached": False}


if __name__ == "__main__":
    main()
