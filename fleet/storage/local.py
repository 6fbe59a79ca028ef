"""A shared root on a local mount: :class:`SharedRoot`, which resolves
shared-root-relative paths under it, and :func:`remove_paths` (atomic writes are
:mod:`fleet.files`).

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
from pathlib import Path

from fleet.codec.manifest import read_manifest
from fleet.errors import PathOutsideRootError
from fleet.storage.refs import PackRef


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
