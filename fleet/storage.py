"""The shared root: where packs, optimizer states and artifacts live, and PackRefs.

Every worker mounts the shared root at the same path. Paths in requests are relative
to it (an absolute path is accepted only if it lies inside the root). Anything that
escapes the root, through ``..``, an absolute path elsewhere, or a symlink pointing
out, is refused with :class:`~fleet.errors.PathOutsideRootError` (DESIGN.md
decision 4).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from fleet.codec import PackManifest, read_manifest
from fleet.errors import PathOutsideRootError


class PackRef(BaseModel):
    """A parameter pack by reference: ``path`` relative to the shared root, plus its
    ``layout_hash``, ``values_digest`` (``xxh3_64:<hex>`` or None) and
    ``model_schema_hash``, so a reader can check it without opening it first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    layout_hash: str | None = None
    values_digest: str | None = None
    model_schema_hash: str | None = None
    parameter_count: int | None = None

    @classmethod
    def of(cls, rel_path: str, manifest: PackManifest) -> PackRef:
        """The PackRef of a pack at ``rel_path`` with this manifest."""
        return cls(
            path=rel_path,
            layout_hash=manifest.layout_hash,
            values_digest=manifest.values_digest,
            model_schema_hash=manifest.model_schema_hash,
            parameter_count=manifest.parameter_count,
        )


def temp_sibling(path: Path) -> Path:
    """A fresh hidden temp path next to ``path`` (same file system, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync,
    rename. A reader sees the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
