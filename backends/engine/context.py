"""The build context an engine sends: what dockyard adds to the archive of the checkout
(the Dockerfile that base image aliases rewrote), so the checkout itself is never written."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
from typing import IO


def add_to_tar(archive: IO[bytes], name: str, data: bytes) -> IO[bytes]:
    """A copy of the uncompressed tar ``archive`` (closed here) with the file ``name``
    (mode 0644) appended, positioned at its start, ready to be sent."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 (returned to the caller, who closes it)
    archive.seek(0)
    shutil.copyfileobj(archive, out)
    archive.close()
    out.seek(0)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    with tarfile.open(fileobj=out, mode="a") as tar:
        tar.addfile(info, io.BytesIO(data))
    out.seek(0)
    return out


__all__ = ["add_to_tar"]
