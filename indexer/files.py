"""Writing an index's files so that a crash leaves the previous file whole and a failed write
(a full disk) leaves no temporary file behind, and never into an index this process holds
read-only; and telling a full disk from other errors."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What a full disk or an exhausted quota looks like from the libraries that write the index.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded")


# Index folders open in this process, read-only and writable: a file under a folder held only
# read-only (a read-only server's index) is not written, whichever code asks (a fitted model
# stored for the next process...). Writes of a writable catalog open beside it go through.
_held: dict[bool, Counter[Path]] = {True: Counter(), False: Counter()}
_held_lock = threading.Lock()


def hold(folder: Path, read_only: bool) -> None:
    with _held_lock:
        _held[read_only][Path(folder).resolve()] += 1


def release(folder: Path, read_only: bool) -> None:
    with _held_lock:
        _held[read_only][Path(folder).resolve()] -= 1
        _held[read_only] = +_held[read_only]


def held_read_only(path: Path) -> bool:
    """Whether ``path`` lies in an index folder this process holds read-only, and none writable."""
    path = Path(path).resolve()
    with _held_lock:
        def holding(read_only: bool) -> bool:
            return any(path.is_relative_to(folder) for folder in _held[read_only])
        return holding(True) and not holding(False)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; made ``path`` (synced, then renamed) when the
    block ends, deleted when it raises. The name holds the process id, so two processes saving
    the same file never write one temporary file. A path in an index held read-only is an
    ``OSError`` (EROFS), which the callers that store a fit for later already take in their stride."""
    path = Path(path)
    if held_read_only(path):
        raise OSError(errno.EROFS, "the index is open read-only", str(path))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Replacement:
    """What ``replaced_file`` gives its block: call ``committed()`` once the rows written with the
    new file are committed, from then on the new file stays, whatever fails after."""

    def __init__(self) -> None:
        self.done = False

    def committed(self) -> None:
        self.done = True


@contextmanager
def replaced_file(path: Path) -> Iterator[Replacement]:
    """A block that saves a new file at ``path`` (a fitted model) and then commits the rows it
    made: if the block raises before ``committed()``, the previous file is put back (or the new
    one removed, where there was none), so the file and the rows never disagree. The previous
    file is kept under a second name (a hard link: no bytes copied, so putting it back needs no
    space on a full disk)."""
    path = Path(path)
    backup = path.with_name(f"{path.name}.{os.getpid()}.previous")
    had = path.is_file()
    if had:
        backup.unlink(missing_ok=True)
        try:
            os.link(path, backup)
        except OSError:  # a filesystem without hard links
            shutil.copy2(path, backup)
    replacement = Replacement()
    try:
        yield replacement
    except BaseException:
        if not replacement.done:
            if had:
                os.replace(backup, path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        backup.unlink(missing_ok=True)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when another process rewrites or replaces a file: (modification time in ns,
    size, inode); None where there is no file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a full disk: an ``OSError`` ENOSPC/EDQUOT,
    SQLite's SQLITE_FULL, or faiss's write error, which carries only the C library's text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if isinstance(error, (OSError, RuntimeError, sqlite3.Error)) and any(
                text in str(error).lower() for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False
