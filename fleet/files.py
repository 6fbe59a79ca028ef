"""Atomic writes to a local POSIX file system: :func:`publishing`, the one way fleet
writes a file or a directory atomically (temp sibling, fsync, rename), and
:func:`atomic_write_bytes`. A leaf module: the codec, the stores and the worker's own
state all write through it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fleet.errors import StorageError, storage_error

#: Marker in the names of temp siblings (``.<name>.tmp-<hex>``); ``fleet gc`` removes
#: stale ones a crash left behind.
TEMP_MARKER = ".tmp-"


def temp_sibling(path: Path) -> Path:
    """A fresh hidden temp path next to ``path`` (same file system, so rename is atomic)."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex}")


def fsync_path(path: Path) -> None:
    """fsync a file (its bytes) or a directory (the names in it: a rename, a new file),
    so they are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.is_symlink():
                fsync_path(child)
        for directory in [*(p for p in path.rglob("*") if p.is_dir()), path]:
            fsync_path(directory)
    elif path.exists():
        fsync_path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def publishing(
    dest: Path, *, mkdir: bool = False, replace_dir: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Publish whatever the block writes at ``dest``, atomically.

    Yields a fresh temp sibling of ``dest`` (an empty directory if ``mkdir``, else a
    path that does not exist yet). When the block ends, what it created there (a file
    or a directory tree) is fsynced and renamed onto ``dest``, and ``dest``'s parent is
    fsynced: a reader sees the old ``dest`` (or none) or the complete new one, never a
    part. An existing file is replaced; an existing directory only when
    ``replace_dir(dest)`` allows it (e.g. "it is a pack"). On any exception, and when
    the block created nothing, the temp path is removed and nothing is published.

    Raises:
        StorageError: ``dest`` is a directory ``replace_dir`` does not allow replacing,
            the block created nothing, or the file system failed
            (:class:`~fleet.errors.StorageFullError` when it is full).
    """
    tmp = temp_sibling(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mkdir:
            tmp.mkdir()
        yield tmp
        if not tmp.exists():
            raise StorageError(f"nothing was written to publish at {dest}")
        _fsync_tree(tmp)
        if dest.is_dir() and not dest.is_symlink():
            if replace_dir is None or not replace_dir(dest):
                raise StorageError(f"refusing to replace {dest}: it exists and is not a pack")
            aside = temp_sibling(dest)
            os.rename(dest, aside)
            os.rename(tmp, dest)
            _remove(aside)
        else:
            os.replace(tmp, dest)
        fsync_path(dest.parent)
    except StorageError:  # typed already, by whoever knew the path (a nested writer)
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise storage_error(exc, str(dest)) from exc
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`publishing`).

    Raises:
        StorageError: the file system failed (``StorageFullError`` when it is full).
    """
    with publishing(path) as tmp:
        tmp.write_bytes(data)
