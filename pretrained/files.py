"""Writing files so that a reader never sees half of one: the project's one atomic-write helper.

A file is written to a temporary name in its own folder, flushed to disk, given the mode an ordinary
``open`` would give it, and renamed onto its path (``os.replace``, atomic on POSIX and Windows); on any
failure the temporary file is removed and the old file, if any, is left as it was.  Shared by
``pretrained/`` (weights, the zoo report) and ``bench/`` (results, reports, previews).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "default_permissions"]


def default_permissions(path: os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode an ordinary ``open`` would (0666 − umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    The parent folder is created if needed.  On failure nothing is left behind and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        default_permissions(tmp)  # mkstemp makes it 0600; the mode an ordinary open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))
