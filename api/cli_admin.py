"""Operator commands on a data directory, no server needed: ``dockyard gc``,
``dockyard backup FILE`` and ``dockyard restore FILE --data-dir NEW``.

A backup is one ``tar.gz``: ``manifest.json`` (format, dockyard's version, the schema
version, each file's SHA-256), ``dockyard.db`` (the state store, copied with SQLite's online
backup API, so a running dockyard keeps serving and the copy is one consistent moment) and
``tokens.json`` (the tokens made through the API or CLI, hashed) when it exists. With
``--events`` the event journal (``events.sqlite3``) goes too; it is left out by default:
deployments, revisions, slots, their history and evaluation records are all in the state
store, the journal is only the live stream's bounded buffer.

``restore`` checks the archive (only those members, regular files, the checksums, a
dockyard database that passes ``PRAGMA integrity_check``) and refuses a data directory that
already holds state unless ``--force``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import sqlite3
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from dockyard.core.config import Settings, load_settings
from dockyard.core.errors import DockyardError
from dockyard.core.gc import GarbageCollector, GcReport
from dockyard.core.plugins import dockyard_version

COMMANDS = {"gc", "backup", "restore"}
BACKUP_FORMAT = "dockyard-backup"
BACKUP_VERSION = 1
STATE_DB = "dockyard.db"
TOKENS = "tokens.json"
JOURNAL = "events.sqlite3"
MANIFEST = "manifest.json"
#: Largest member a restore reads (a state database is far smaller).
MAX_MEMBER_BYTES = 8 * 1024**3
#: ``PRAGMA application_id`` of a dockyard database (``plugins/sqlite_store.py``).
APPLICATION_ID = 0x444B5944


def add_commands(sub: Any) -> None:
    """Register ``gc``, ``backup`` and ``restore`` on the ``dockyard`` parser."""
    gc = sub.add_parser("gc", help="remove what retention says (gc_* settings) and print it")
    gc.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    gc.add_argument("--data-dir", dest="data_dir", help="the data directory (default: config)")
    gc.add_argument("--json", action="store_true", help="the report as one JSON object")
    backup = sub.add_parser("backup", help="copy the state and the token file into one archive")
    backup.add_argument("file", help="the archive to write (.tar.gz); must not exist")
    backup.add_argument("--data-dir", dest="data_dir", help="the data directory (default: config)")
    backup.add_argument("--events", action="store_true", help="include the event journal")
    restore = sub.add_parser("restore", help="restore a backup into a data directory")
    restore.add_argument("file", help="an archive made by dockyard backup")
    restore.add_argument("--data-dir", dest="data_dir", required=True, help="where to restore")
    restore.add_argument(
        "--force", action="store_true", help="replace the state a data directory already holds"
    )


def main(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; failures the user can cause are DockyardError."""
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = load_settings(args.config, **overrides)
    if args.command == "gc":
        report = asyncio.run(run_gc(settings, dry_run=args.dry_run))
        print_report(report, as_json=args.json)
        return 1 if report.errors else 0
    if args.command == "backup":
        files = backup(settings, Path(args.file), events=args.events)
        print(f"backed up {', '.join(files)} of {settings.data_path} to {args.file}")
        return 0
    files = restore(Path(args.file), settings.data_path, force=args.force)
    print(f"restored {', '.join(files)} into {settings.data_path}")
    return 0


# -- gc ------------------------------------------------------------------------------------
async def run_gc(settings: Settings, *, dry_run: bool) -> GcReport:
    """One pass over the configured store and runtime. A runtime that cannot open leaves
    images alone (said in the report's errors); everything else is still collected."""
    from dockyard.core.services import Services

    services = Services.build(settings)
    await services.store.open()
    runtime: Any = services.runtime
    runtime_error = None
    try:
        await runtime.open()
    except DockyardError as exc:
        runtime, runtime_error = None, f"images: runtime unavailable: {exc.message}"
    try:
        report = await GarbageCollector(settings, services.store, runtime, pm=services.pm).collect(
            dry_run=dry_run
        )
    finally:
        if runtime is not None:
            await runtime.close()
        await services.store.close()
    if runtime_error:
        report.errors.append(runtime_error)
    return report


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_report(report: GcReport, *, as_json: bool = False) -> None:
    """Each removal, the total, each kind's use after, and what failed."""
    import msgspec

    if as_json:
        print(msgspec.json.encode(report).decode())
        return
    verb = "would remove" if report.dry_run else "removed"
    for r in report.removed:
        print(f"{verb}  {r.kind:<11} {r.name}  {_size(r.bytes)} ({r.reason})")
    count = len(report.removed)
    print(f"gc: {verb} {count} entr{'y' if count == 1 else 'ies'}, {_size(report.freed_bytes)}")
    for kind, use in report.usage.items():
        print(f"  {kind:<11} {_size(use.bytes):>10} in {use.count} ({use.in_use} in use)")
    for error in report.errors:
        print(f"dockyard: warning: {error}", file=sys.stderr)


# -- backup --------------------------------------------------------------------------------
def _online_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its WAL included)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        finally:
            dst.close()
    finally:
        src.close()


def _schema_version(path: Path) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backup(settings: Settings, archive: Path, *, events: bool = False) -> list[str]:
    """Write the backup of ``settings``' data directory to ``archive`` (mode 0600: the
    token file is in it); returns the files it holds."""
    if settings.store != "sqlite":
        raise DockyardError(f"backup covers the sqlite store; this one is {settings.store!r}")
    data = settings.data_path
    if not (data / STATE_DB).is_file():
        raise DockyardError(f"{data} holds no dockyard state ({STATE_DB} is missing)")
    if archive.exists():
        raise DockyardError(f"{archive} exists already: remove it or choose another name")
    with tempfile.TemporaryDirectory(prefix="dockyard-backup-") as tmp:
        staged = Path(tmp)
        try:
            _online_copy(data / STATE_DB, staged / STATE_DB)
            if events and (data / JOURNAL).is_file():
                _online_copy(data / JOURNAL, staged / JOURNAL)
        except sqlite3.Error as exc:
            raise DockyardError(f"cannot copy the database in {data}: {exc}") from None
        if (data / TOKENS).is_file():
            (staged / TOKENS).write_bytes((data / TOKENS).read_bytes())
        files = sorted(p.name for p in staged.iterdir())
        manifest = {
            "format": BACKUP_FORMAT,
            "version": BACKUP_VERSION,
            "dockyard": dockyard_version(),
            "schema_version": _schema_version(staged / STATE_DB),
            "created_at": time.time(),
            "source": str(data),
            "files": {name: _sha256(staged / name) for name in files},
        }
        _write_archive(archive, staged, files, manifest)
    return files


def _write_archive(archive: Path, staged: Path, files: list[str], manifest: Any) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as tar:
            body = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(body), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(body))
            for name in files:
                tar.add(staged / name, arcname=name, recursive=False)
        os.replace(partial, archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# -- restore -------------------------------------------------------------------------------
def _read_archive(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the members, checked: only known names, regular files, sizes."""
    allowed = {MANIFEST, STATE_DB, TOKENS, JOURNAL}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                if member.name not in allowed or not member.isfile() or member.name in members:
                    raise DockyardError(f"{archive}: unexpected member {member.name!r}")
                if member.size > MAX_MEMBER_BYTES:
                    raise DockyardError(f"{archive}: {member.name} is too large")
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file
                members[member.name] = extracted.read()
    except FileNotFoundError:
        raise DockyardError(f"{archive} does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DockyardError(f"{archive} is not a dockyard backup: {exc}") from None
    try:
        manifest = json.loads(members.pop(MANIFEST))
    except (KeyError, ValueError):
        raise DockyardError(f"{archive} is not a dockyard backup (no manifest)") from None
    if manifest.get("format") != BACKUP_FORMAT or manifest.get("version") != BACKUP_VERSION:
        raise DockyardError(f"{archive} is not a dockyard backup of version {BACKUP_VERSION}")
    listed = manifest.get("files") or {}
    if set(listed) != set(members) or STATE_DB not in members:
        raise DockyardError(f"{archive}: its files do not match its manifest")
    for name, body in members.items():
        if hashlib.sha256(body).hexdigest() != listed[name]:
            raise DockyardError(f"{archive}: {name} does not match its checksum")
    return manifest, members


def _check_database(path: Path) -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if int(db.execute("PRAGMA application_id").fetchone()[0]) != APPLICATION_ID:
            raise DockyardError(f"{STATE_DB} in the backup is not a dockyard database")
        result = db.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise DockyardError(f"{STATE_DB} in the backup is damaged: {result}")
    except sqlite3.Error as exc:
        raise DockyardError(f"{STATE_DB} in the backup cannot be read: {exc}") from None
    finally:
        db.close()


def restore(archive: Path, data: Path, *, force: bool = False) -> list[str]:
    """Put a backup's files into ``data``; refuses existing state unless ``force`` (then
    dockyard must not be running on ``data``). Returns the files restored."""
    _, members = _read_archive(archive)
    present = [name for name in (STATE_DB, TOKENS, JOURNAL) if (data / name).exists()]
    if present and not force:
        raise DockyardError(
            f"{data} already holds state ({', '.join(present)}): stop dockyard there and "
            "add --force to replace it, or restore into an empty directory"
        )
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, body in members.items():
            tmp = data / f".{name}.restoring"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            staged.append((tmp, data / name))
        _check_database(data / f".{STATE_DB}.restoring")
        if JOURNAL not in members:  # the replaced state's journal is not this state's
            for suffix in ("", "-wal", "-shm"):
                Path(f"{data / JOURNAL}{suffix}").unlink(missing_ok=True)
        for tmp, final in staged:
            for leftover in ("-wal", "-shm", "-journal"):  # the replaced database's
                Path(f"{final}{leftover}").unlink(missing_ok=True)
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return sorted(members)
