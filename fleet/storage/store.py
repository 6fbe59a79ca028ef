"""The storage layer: everything fleet keeps on the shared root (packs, momentum,
optimizer states, datasets, artifacts, result markers, reports) goes through a
:class:`Store`, addressed by shared-root-relative POSIX paths.

Two backends (``FLEET_SHARED_ROOT``):

- :class:`LocalStore`, a local path (a directory every worker mounts, NFS included):
  files are read where they lie (no copy) and published by rename
  (:func:`fleet.storage.local.publishing`);
- :class:`~fleet.storage.object_store.ObjectStore`, an fsspec URL (``s3://bucket/prefix``,
  tested against SeaweedFS's S3 API): reads are fetched once into the worker's
  :class:`~fleet.storage.cache.WorkerCache` and verified, writes are staged locally and
  uploaded, data objects first and the commit file (a pack's ``manifest.json``, a
  dataset's ``fetch-manifest.json``) last (docs/protocol.md, "Publishing on an object
  store").

Hooks only ever see local paths: :meth:`Store.local_pack`, :meth:`Store.local_file` and
:meth:`Store.local_shard` give a readable local copy, :meth:`Store.output` a local path
to write that is published when the block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fleet.codec.manifest import MANIFEST_FILE, PackManifest, _manifest_from_json, read_manifest
from fleet.errors import ManifestError, NotAPackError, PathOutsideRootError
from fleet.files import atomic_write_bytes
from fleet.storage.local import SharedRoot, remove_paths
from fleet.storage.refs import PackRef, result_marker

if TYPE_CHECKING:
    from fleet.codec.pack import PackReader
    from fleet.codec.pseudo_gradient import PseudoGradientReader

#: Files that commit a directory: uploaded last, so a reader that finds one finds the
#: whole directory (a pack's manifest, a burn_p2p dataset's fetch manifest).
COMMIT_FILES = (MANIFEST_FILE, "fetch-manifest.json")


@dataclass(frozen=True)
class Entry:
    """A file or directory on a store: root-relative ``path``, ``size`` in bytes (0 for
    a directory), modification time ``mtime`` (Unix seconds; 0 where unknown)."""

    path: str
    size: int
    mtime: float
    is_dir: bool

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def parse_manifest(data: bytes, where: str) -> PackManifest:
    """A pack manifest from the bytes of its ``manifest.json``.

    Raises:
        ManifestError: not JSON or not a valid manifest.
    """
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(where, None, f"not valid JSON: {exc}") from exc
    return _manifest_from_json(Path(where), raw)


class TransferCounters:
    """Bytes this process moved to (``sent_bytes``) and from (``received_bytes``) the
    shared root, counted where they move: each payload a store request carries (the
    requests' own headers aside); and the ``requests`` it sent to the store: on an
    object store, every HTTP request (a retried one once per try, a multipart upload
    once per part, a listing once per page); none on a local root. Thread-safe;
    :meth:`snapshot` and a later :meth:`since` give the bytes one task moved,
    ``requests`` read before and after it the requests it made."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        self.received_bytes = 0
        self.requests = 0
        self._lock = threading.Lock()

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.sent_bytes += nbytes

    def received(self, nbytes: int) -> None:
        with self._lock:
            self.received_bytes += nbytes

    def request(self, count: int = 1) -> None:
        """Count ``count`` requests sent to the store."""
        with self._lock:
            self.requests += count

    def snapshot(self) -> tuple[int, int]:
        """``(sent_bytes, received_bytes)`` so far."""
        with self._lock:
            return self.sent_bytes, self.received_bytes

    def since(self, snapshot: tuple[int, int]) -> tuple[int, int]:
        """``(sent_bytes, received_bytes)`` since ``snapshot``."""
        sent, received = self.snapshot()
        return sent - snapshot[0], received - snapshot[1]


class CountedReader:
    """A binary file object that counts the bytes read through it into ``counters``."""

    def __init__(self, f: IO[bytes], counters: TransferCounters) -> None:
        self._f = f
        self._counters = counters

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._counters.received(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)  # type: ignore[attr-defined]
        self._counters.received(n or 0)
        return n or 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> CountedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


class Store(ABC):
    """A shared root, local or remote. Paths are root-relative POSIX strings; one that
    escapes the root is refused with :class:`~fleet.errors.PathOutsideRootError`. Every
    byte moved is counted in :attr:`counters`."""

    #: Where the root is, for messages and ``fleet cluster info``.
    url: str
    #: True for a local path (files are read where they lie).
    is_local: bool
    #: Bytes this process moved to and from the root.
    counters: TransferCounters

    # ------------------------------------------------------------------ paths

    @abstractmethod
    def relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` as a normalised root-relative POSIX path.

        Raises:
            PathOutsideRootError: empty, or outside the root.
        """

    # ------------------------------------------------------------------ reads

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """True if a file or a non-empty directory is at ``rel``."""

    def existing(self, rels: list[str]) -> list[str]:
        """Those of ``rels`` at which a file or a non-empty directory is, in order and
        root-relative; an object store asks once per directory the paths are in, not
        once per path.

        Raises:
            PathOutsideRootError: a path outside the root.
            StorageError: the store failed.
        """
        return [rel for rel in (self.relative(r) for r in rels) if self.exists(rel)]

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the file at ``rel``.

        Raises:
            FileNotFoundError: no such file.
            StorageError: the store failed.
        """

    @abstractmethod
    def listdir(self, rel: str) -> list[Entry]:
        """The files and directories directly in ``rel``, sorted by name ([] if none)."""

    @abstractmethod
    def walk(self, rel: str = "") -> list[Entry]:
        """Every file below ``rel`` (recursively), sorted by path ([] if none)."""

    @abstractmethod
    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        """A binary file object on ``rel`` (``readinto``, ``seek``); remote stores read it
        in ranged requests of ``block_size`` bytes, so memory stays O(block).

        Raises:
            FileNotFoundError: no such file.
        """

    def read_manifest(self, rel: str) -> PackManifest:
        """The manifest of the pack at ``rel``.

        Raises:
            NotAPackError: no ``manifest.json`` there (a pack whose upload did not finish
                has none).
            ManifestError, UnknownPackFormatError: an unreadable manifest.
        """
        where = posixpath.join(rel, MANIFEST_FILE)
        try:
            data = self.read_bytes(where)
        except FileNotFoundError:
            raise NotAPackError(f"{self.url}/{rel}", f"no {MANIFEST_FILE}") from None
        return parse_manifest(data, f"{self.url}/{where}")

    def pack_ref(self, rel: str) -> PackRef:
        """The PackRef of the pack at ``rel``.

        Raises:
            PathOutsideRootError: outside the root.
            CodecError: not a readable pack.
        """
        rel = self.relative(rel)
        return PackRef.of(rel, self.read_manifest(rel))

    @abstractmethod
    def size(self, rel: str) -> int:
        """The byte length of the file at ``rel``.

        Raises:
            FileNotFoundError: no such file.
        """

    def pack_reader(
        self,
        rel: str,
        *,
        block_size: int = 1 << 22,
        check_finite: bool = False,
        layout_hash: str | None = None,
        values_digest: str | None = None,
    ) -> PackReader | PseudoGradientReader:
        """A reader streaming the pack at ``rel`` from the store, of any format
        (:func:`fleet.codec.readers.open_pack`: the codec reads, the store moves bytes).

        Raises:
            CodecError: see :func:`~fleet.codec.readers.open_pack`.
        """
        from fleet.codec.readers import open_pack

        return open_pack(
            self,
            self.relative(rel),
            block_size=block_size,
            check_finite=check_finite,
            layout_hash=layout_hash,
            values_digest=values_digest,
        )

    def read_manifest_json(self, rel: str) -> Any:
        """The parsed ``manifest.json`` of the pack at ``rel``, of any format.

        Raises:
            NotAPackError: no manifest there.
            ManifestError: not JSON.
        """
        from fleet.codec.readers import read_manifest_json

        return read_manifest_json(self, self.relative(rel))

    @abstractmethod
    def local_pack(self, rel: str, ref: PackRef | None = None) -> Path:
        """A local directory holding the pack at ``rel`` (the pack itself on a local
        store; a verified cached copy on a remote one).

        Raises:
            CodecError: not a pack, or a remote pack whose values do not match its
                digest (``DigestMismatchError``) or its ref (``LayoutMismatchError``).
        """

    @abstractmethod
    def local_file(self, rel: str) -> Path:
        """A local path holding the file at ``rel``.

        Raises:
            FileNotFoundError: no such file.
        """

    @abstractmethod
    def local_shard(
        self, rel: str, content_hash: str | None, *, dataset: str, shard_id: str
    ) -> Path:
        """A local path holding the microshard at ``rel``, its content hash checked the
        first time it is read on this worker (when ``content_hash`` is given).

        Raises:
            ShardMissingError: no such file.
            ShardHashMismatchError: its content differs from ``content_hash``.
        """

    # ------------------------------------------------------------------ writes

    @abstractmethod
    @contextmanager
    def output(self, rel: str, *, required: bool = True) -> Iterator[Path]:
        """A local path at which the block writes ``rel`` (a file or a directory), with
        an atomic local writer (:func:`~fleet.storage.local.publishing`,
        :func:`~fleet.codec.write_pack`); it is on the store when the block ends. On a
        local store this is the destination itself; on a remote one a staging path,
        uploaded with its commit file last. An exception publishes nothing; so does a
        block that wrote nothing when not ``required``.

        Raises:
            StorageError: the upload or the file system failed, or ``required`` and the
                block wrote nothing.
        """
        yield Path()

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically (a reader sees the old one, none, or the new one).

        Raises:
            StorageError: the store failed.
        """

    def record_result(self, out_rel: str, key: str, result: Any) -> None:
        """Write a task's ``result`` (a pydantic model) beside the output it published at
        ``out_rel``, keyed by ``key`` (a hash of its request), so the same request
        delivered again returns it (docs/protocol.md section 5.3: exactly-once effects).

        Raises:
            StorageError: the store failed.
        """
        record = {"request": key, "result": result.model_dump(mode="json")}
        self.write_bytes(result_marker(out_rel), json.dumps(record).encode())

    def recorded_result(self, out_rel: str, key: str, model: type[Any]) -> Any:
        """The result a previous run of the request ``key`` recorded beside its output
        pack, if that pack is still the one it published (None otherwise)."""
        from fleet.errors import CodecError, StorageError

        try:
            recorded = json.loads(self.read_bytes(result_marker(out_rel)))
            if recorded.get("request") != key:
                return None
            result = model.model_validate(recorded["result"])
            published = self.read_manifest_json(out_rel)
        except (OSError, ValueError, CodecError, StorageError):
            return None
        digest = published.get("values_digest") if isinstance(published, dict) else None
        if getattr(result, "pack", None) is None or digest != result.pack.values_digest:
            return None
        return result

    @abstractmethod
    def remove(self, rels: list[str]) -> int:
        """Delete files and directory trees (missing ones are skipped); return bytes freed."""

    def stale_uploads(self, min_age_s: float) -> list[str]:
        """Unfinished uploads older than ``min_age_s`` (for ``fleet gc``): none locally,
        where a crash leaves temp siblings instead."""
        return []

    def abort_uploads(self, ids: list[str]) -> int:
        """Abort the unfinished uploads ``ids``; return how many were aborted."""
        return 0


class LocalStore(Store):
    """A shared root on a local path (see the module docstring)."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.shared = SharedRoot(root)
        self.root = self.shared.root
        self.url = str(self.root)
        self.counters = TransferCounters()
        self._checker: Any = None  # a ShardChecker, made on first use

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """The absolute local path of ``path`` (see :meth:`SharedRoot.resolve`)."""
        return self.shared.resolve(path)

    def relative(self, path: str | os.PathLike[str]) -> str:
        rel = self.shared.relative(path)
        if rel == ".":
            raise PathOutsideRootError(os.fspath(path), self.url)
        return rel

    def exists(self, rel: str) -> bool:
        return self.resolve(rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        try:
            data = self.resolve(rel).read_bytes()
        except IsADirectoryError:
            raise FileNotFoundError(rel) from None
        self.counters.received(len(data))
        return data

    def _entry(self, path: Path) -> Entry:
        stat = path.lstat()
        is_dir = path.is_dir() and not path.is_symlink()
        # not resolved: a symlink out of the root is listed, and refused where it is used
        rel = path.relative_to(self.root).as_posix()
        try:
            size = 0 if is_dir else path.stat().st_size
        except OSError:  # a dangling symlink
            size = stat.st_size
        return Entry(rel, size, stat.st_mtime, is_dir)

    def listdir(self, rel: str) -> list[Entry]:
        folder = self.resolve(rel)
        if not folder.is_dir():
            return []
        return [self._entry(p) for p in sorted(folder.iterdir())]

    def walk(self, rel: str = "") -> list[Entry]:
        folder = self.resolve(rel) if rel else self.root
        if not folder.is_dir():
            return []
        return [self._entry(p) for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()]

    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        return CountedReader(open(self.resolve(rel), "rb", buffering=0), self.counters)  # type: ignore[return-value]

    def read_manifest(self, rel: str) -> PackManifest:
        return read_manifest(self.resolve(rel))

    def local_pack(self, rel: str, ref: PackRef | None = None) -> Path:
        """The pack where it lies (its data files count as received: the caller reads
        them from the root)."""
        path = self.resolve(rel)
        self.counters.received(_tree_bytes(path, skip=MANIFEST_FILE))
        return path

    def size(self, rel: str) -> int:
        path = self.resolve(rel)
        if not path.is_file():
            raise FileNotFoundError(rel)
        return path.stat().st_size

    def local_file(self, rel: str) -> Path:
        path = self.resolve(rel)
        if not path.is_file():
            raise FileNotFoundError(rel)
        self.counters.received(path.stat().st_size)
        return path

    def local_shard(
        self, rel: str, content_hash: str | None, *, dataset: str, shard_id: str
    ) -> Path:
        from fleet.data.shard_hash import ShardChecker

        path = self.resolve(rel)
        with contextlib.suppress(FileNotFoundError):
            self.counters.received(path.stat().st_size)
        if content_hash is not None:
            if self._checker is None:
                self._checker = ShardChecker()
            self._checker.check(dataset, shard_id, path, content_hash)
        return path

    @contextmanager
    def output(self, rel: str, *, required: bool = True) -> Iterator[Path]:
        path = self.resolve(rel)
        yield path
        self.counters.sent(_tree_bytes(path))

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.resolve(rel), data)
        self.counters.sent(len(data))

    def remove(self, rels: list[str]) -> int:
        return remove_paths(self.root, [self.resolve(r) for r in rels])


def _tree_bytes(path: Path, *, skip: str | None = None) -> int:
    """Bytes of a file, or of the files in a directory tree (but ``skip``); 0 if missing."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != skip)
        return path.stat().st_size
    except FileNotFoundError:
        return 0
