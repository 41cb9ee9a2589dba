"""Writing files so that a reader never sees half of one: the project's one atomic-write helper.

A file is written to a temporary name in its own folder, flushed to disk, given the mode an ordinary
``open`` would give it, and renamed onto its path (``os.replace``, atomic on POSIX and Windows); on any
failure the temporary file is removed and the old file, if any, is left as it was.  Shared by
``pretrained/`` (weights, the zoo report) and ``bench/`` (results, reports, previews).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "default_permissions"]


def default_permissions(path: os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode an ordinary ``open`` would (0666 − umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (or download) into; when the block ends
    normally the file gets the mode an ordinary ``open`` would give it and is renamed onto ``path``.

    A check that raises inside the block (a checksum, say) leaves nothing behind: on any exception the
    temporary file is removed and ``path`` is unchanged.  The parent folder is created if needed; the
    temporary name keeps ``suffix`` (writers that pick a format by extension need it, e.g. ``.gif``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        default_permissions(tmp)  # mkstemp makes it 0600; the mode an ordinary open() would give
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``).

    The parent folder is created if needed.  On failure nothing is left behind and ``path`` is unchanged.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))
