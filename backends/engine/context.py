"""The build context an engine sends: what dockyard adds to the archive of the checkout
(the Dockerfile that base image aliases rewrote), so the checkout itself is never written."""

from __future__ import annotations

import io
import tarfile
import time
from typing import IO


def add_to_tar(archive: IO[bytes], name: str, data: bytes) -> None:
    """Append the file ``name`` (mode 0644) to the uncompressed tar ``archive``; leaves the
    archive positioned at its start, ready to be sent."""
    archive.seek(0)
    with tarfile.open(fileobj=archive, mode="a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    archive.seek(0)


__all__ = ["add_to_tar"]
