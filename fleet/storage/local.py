"""Local files: :func:`publishing`, the one way fleet writes a file or a directory
atomically on a POSIX file system (temp sibling, fsync, rename), and
:class:`SharedRoot`, which resolves shared-root-relative paths under a local mount.

Paths in requests are relative to the shared root (an absolute path is accepted only
if it lies inside the root); each worker resolves them under its own mount. Anything
that escapes the root, through ``..``, an absolute path elsewhere, or a symlink
pointing out, is refused with :class:`~fleet.errors.PathOutsideRootError`
(docs/design.md decision 4).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fleet.codec.manifest import read_manifest
from fleet.errors import PathOutsideRootError, StorageError, storage_error
from fleet.storage.refs import TEMP_MARKER, PackRef


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


def remove_paths(root: Path, paths: list[Path]) -> int:
    """Delete each file or directory tree of ``paths`` (missing ones are skipped), then
    each parent directory below ``root`` that became empty; return the bytes freed.
    Idempotent under concurrency: a file or directory another remover (a second
    ``collect_garbage`` task, ``fleet gc``) deletes first is skipped, not an error."""
    freed = 0
    parents: set[Path] = set()

    def gone(_function: object, _path: object, info: tuple[type, BaseException, object]) -> None:
        if not isinstance(info[1], FileNotFoundError):
            raise info[1]

    for path in paths:
        if not (path.exists() or path.is_symlink()) or path == root:
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                freed += sum(_size(p) for p in path.rglob("*"))
                shutil.rmtree(path, onerror=gone)
            else:
                freed += path.lstat().st_size
                path.unlink()
        parents.add(path.parent)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        while parent != root and parent.is_relative_to(root) and parent.is_dir():
            try:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
            except OSError as exc:  # removed, or refilled, meanwhile
                if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOTEMPTY:
                    break
                raise
            parent = parent.parent
    return freed


def _size(path: Path) -> int:
    """The bytes of a file (0 for a directory, or a file already gone)."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0


class SharedRoot:
    """Resolves shared-root-relative paths on this machine and refuses escapes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """The absolute path of ``path`` under the root (it need not exist yet).

        Symlinks in existing parts of the path are followed before the check.

        Raises:
            PathOutsideRootError: ``path`` is empty or resolves outside the root.
        """
        raw = os.fspath(path)
        if not raw or "\x00" in raw:
            raise PathOutsideRootError(raw, str(self.root))
        candidate = Path(raw)
        full = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if full != self.root and not full.is_relative_to(self.root):
            raise PathOutsideRootError(raw, str(self.root))
        return full

    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` (absolute or relative) as a root-relative POSIX string.

        Raises:
            PathOutsideRootError: it lies outside the root.
        """
        return self.resolve(path).relative_to(self.root).as_posix()

    def pack_ref(self, path: str | os.PathLike[str]) -> PackRef:
        """The PackRef of the existing pack at ``path``.

        Raises:
            PathOutsideRootError: outside the root.
            CodecError: not a readable pack.
        """
        full = self.resolve(path)
        return PackRef.of(self.relative(full), read_manifest(full))
