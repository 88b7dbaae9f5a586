"""Crash-safe file writes shared by checkpoints, saved models and data caches.

:func:`atomic_write` is the classic recipe: fill a temp file in the target's directory, fsync
it, ``os.replace`` it over the target, fsync the directory. A process killed at any moment
leaves either the old file or the new one, never a half-written file under the target's name;
readers in other processes never see a partial file either.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_all", "fsync_dir", "fsync_file"]


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename / new entry in ``path`` (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temp file in the same
    directory, which is fsynced and then ``os.replace``-d over ``path``. On any error the temp
    file is removed and ``path`` is untouched."""
    atomic_write_all([(path, write)])


def atomic_write_all(files: Sequence[tuple[str | os.PathLike, Callable[[str], None]]]) -> None:
    """:func:`atomic_write` for several files that belong together (a model's config and
    weights): every temp file is filled and fsynced before the first rename, so a crash while
    writing (the slow part) leaves all old files in place. Only a crash between the renames,
    microseconds apart, can leave some files new and some old; readers that must tell (see
    ``save_id`` in :mod:`spadeformer.models.io`) tie the files together by a shared id."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            path = Path(path)
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            temps.append((tmp, path))
            write(str(tmp))
            fsync_file(tmp)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for parent in dict.fromkeys(path.parent for _, path in temps):
        fsync_dir(parent)
