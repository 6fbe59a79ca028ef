"""A worker's local cache of what it reads from an object-store shared root.

Entries are files or directories under ``FLEET_CACHE_DIR``, keyed by what identifies
their content: a pack by its values digest, a microshard by its content hash, any
other file by its path and the store's ETag (or size and modification time). An entry
is written into a staging directory inside the cache, checked, and renamed into place
(atomic; a second process that fetched the same entry keeps the first one), so a
reader never sees a partial entry. Every use touches the entry; when the cache holds
more than ``FLEET_CACHE_MAX_BYTES``, the least recently used entries are deleted
(entries used in the last ``IN_USE_S`` seconds are kept: a hook may be reading them,
so the bound is soft). Worker processes on one host may share a cache directory.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Seconds after its last use during which an entry is never evicted.
IN_USE_S = 120.0

#: Kinds of entries (one subdirectory each).
KINDS = ("packs", "shards", "files")


def _tree_bytes(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    return path.lstat().st_size


class WorkerCache:
    """Content-keyed local copies with LRU eviction (see the module docstring).

    Args:
        root: the cache directory (created if missing).
        max_bytes: soft bound on the bytes of all entries.
        in_use_s: seconds after its last use during which an entry is kept.
    """

    def __init__(
        self, root: str | os.PathLike[str], max_bytes: int, *, in_use_s: float = IN_USE_S
    ) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.in_use_s = in_use_s
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key: str) -> Path:
        """Where the entry ``key`` of ``kind`` lives (it may not exist)."""
        if kind not in KINDS or not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad cache entry {kind}/{key}")
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The entry's path if it is cached (touched, for LRU), else None."""
        path = self.path(kind, key)
        try:
            os.utime(path)
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        return path

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh empty directory inside the cache (same file system as the entries, so
        :meth:`admit` renames); removed when the block ends."""
        tmp = self.root / ".staging" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def admit(self, kind: str, key: str, staged: Path) -> Path:
        """Move ``staged`` (a file or directory in :meth:`staging`) in as the entry
        ``key``; return the entry's path. If another process admitted it first, that
        entry is kept. Evicts least recently used entries beyond ``max_bytes``."""
        dest = self.path(kind, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, dest)
        except OSError:
            if not dest.exists():
                raise
        self.evict(keep=dest)
        return dest

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last use, bytes, path)`` of every entry, least recently used first."""
        found = []
        for kind in KINDS:
            folder = self.root / kind
            for path in folder.iterdir() if folder.is_dir() else []:
                try:
                    found.append((path.lstat().st_mtime, _tree_bytes(path), path))
                except FileNotFoundError:
                    continue
        return sorted(found)

    def size_bytes(self) -> int:
        """Bytes held by all entries."""
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the cache fits ``max_bytes`` (never
        ``keep`` nor one used in the last ``IN_USE_S`` seconds); return bytes freed."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        freed = 0
        now = time.time()
        for used, size, path in entries:
            if total - freed <= self.max_bytes:
                break
            if path == keep or now - used < self.in_use_s:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            freed += size
        return freed
