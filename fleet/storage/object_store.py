"""A shared root on an object store, through fsspec (``FLEET_SHARED_ROOT=s3://bucket/prefix``).

Any file system fsspec speaks works; s3 (s3fs, ``pip install 'fleet-diloco[s3]'``) is
the one tested, against SeaweedFS. ``FLEET_STORAGE_OPTIONS`` (a JSON object) is passed
to the file system as it is (for s3fs: ``endpoint_url``, ``key``, ``secret``,
``client_kwargs``, ...); s3fs also reads the usual ``AWS_*`` variables.

An object store has no rename, so publishing is ordered instead (docs/protocol.md,
"Publishing on an object store"): a single object is one PUT (or a multipart upload,
completed atomically: a reader sees the whole object or none); a directory's data
objects are uploaded first and its commit file (a pack's ``manifest.json``) last, after
the old commit file was deleted. A reader that finds a manifest finds the values it
names, and checks their digest while reading them. An upload cut short (a killed
worker) leaves data objects without a manifest, which readers refuse as "not a pack"
and ``fleet gc`` removes, and unfinished multipart uploads, which ``fleet gc`` aborts.

Reads for hooks go through the worker's :class:`~fleet.storage.cache.WorkerCache`:
fetched once, verified while fetched (a pack's values digest, a shard's content hash),
reused while the digest matches. The outer step reads packs in ranged requests
(:meth:`ObjectStore.open_read`) and never holds more than a block per pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import xxhash

from fleet.codec.manifest import MANIFEST_FILE
from fleet.errors import (
    DigestMismatchError,
    ManifestError,
    NotAPackError,
    PathOutsideRootError,
    ShardHashMismatchError,
    ShardMissingError,
    StorageError,
    StorageIOError,
    ValuesLengthError,
)
from fleet.storage.cache import WorkerCache
from fleet.storage.refs import PackRef
from fleet.storage.store import COMMIT_FILES, CountedReader, Entry, Store, TransferCounters

if TYPE_CHECKING:
    from fleet.codec.pack import PackReader
    from fleet.codec.pseudo_gradient import PseudoGradientReader

#: Bytes per read when fetching into the cache.
FETCH_BLOCK_BYTES = 8 << 20


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(where, None, f"not valid JSON: {exc}") from exc


def _mtime(info: dict[str, Any]) -> float:
    for key in ("LastModified", "mtime", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


#: Keyword arguments of an s3fs file system that it passes on to its aiobotocore session.
_SESSION_ARGS = ("session_vars", "event_hooks", "include_builtin_handlers", "profile")


def _is_s3fs(cls: type) -> bool:
    return any(
        c.__name__ == "S3FileSystem" and c.__module__.startswith("s3fs.") for c in cls.__mro__
    )


def _s3fs_options(options: dict[str, Any], counters: TransferCounters) -> dict[str, Any]:
    """``options`` for s3fs, with a session whose clients count every HTTP request they
    send into ``counters`` (botocore's ``before-send`` event: once per try)."""
    from aiobotocore.session import AioSession  # type: ignore[import-untyped]

    if options.get("session") is None:
        session_args = {k: options.pop(k) for k in _SESSION_ARGS if k in options}
        options["session"] = AioSession(**session_args)

    def sent(**_: Any) -> None:  # a before-send handler returns None: the request goes out
        counters.request()

    options["session"].register("before-send.s3", sent)
    return options


class ObjectStore(Store):
    """A shared root at an fsspec URL, read through a worker cache (see the module
    docstring).

    Args:
        url: ``scheme://bucket/prefix``.
        storage_options: keyword arguments for the fsspec file system.
        cache: where reads are cached; required for :meth:`local_pack`,
            :meth:`local_file`, :meth:`local_shard` and :meth:`output`.

    Raises:
        StorageError: the file system is unknown or cannot be made.
    """

    is_local = False

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None, cache: WorkerCache | None
    ) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache = cache
        self.counters = TransferCounters()
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        fs = self.fs  # fail early on an unknown scheme or a missing driver
        self.root = fs._strip_protocol(self.url).rstrip("/")

    @property
    def fs(self) -> Any:
        """The fsspec file system, made once per process (a forked pool child makes its
        own: s3fs's event loop does not survive a fork)."""
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                import fsspec

                scheme = self.url.split("://", 1)[0]
                try:
                    cls = fsspec.get_filesystem_class(scheme)
                    options = dict(self.storage_options)
                    if _is_s3fs(cls):
                        options = _s3fs_options(options, self.counters)
                    self._fs = cls(skip_instance_cache=True, **options)
                except (ImportError, ValueError, TypeError) as exc:
                    hint = " (pip install 'fleet-diloco[s3]')" if scheme in ("s3", "s3a") else ""
                    raise StorageError(
                        f"cannot open the shared root {self.url}: {exc}{hint}"
                    ) from exc
                self._pid = os.getpid()
            return self._fs

    def key(self, rel: str) -> str:
        """The file system path of ``rel``."""
        return f"{self.root}/{rel}" if rel else self.root

    def _need_cache(self) -> WorkerCache:
        if self.cache is None:
            raise StorageError(f"reading {self.url} for a hook needs a worker cache")
        return self.cache

    # ------------------------------------------------------------------ paths

    def relative(self, path: str | os.PathLike[str]) -> str:
        raw = os.fspath(path)
        if raw.startswith(self.url + "/"):
            raw = raw[len(self.url) + 1 :]
        if not raw or "\x00" in raw or raw.startswith("/") or "://" in raw:
            raise PathOutsideRootError(raw, self.url)
        rel = posixpath.normpath(raw)
        if rel in (".", "..") or rel.startswith("../"):
            raise PathOutsideRootError(raw, self.url)
        return rel

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise StorageIOError(f"{self.url} ({what})", type(exc).__name__, str(exc)) from exc

    # ------------------------------------------------------------------ reads

    def exists(self, rel: str) -> bool:
        key = self.key(self.relative(rel))
        self.fs.invalidate_cache(key)
        return bool(self._call("exists", self.fs.exists, key))

    def read_bytes(self, rel: str) -> bytes:
        data = bytes(self._call("read", self.fs.cat_file, self.key(self.relative(rel))))
        self.counters.received(len(data))
        return data

    def _entry(self, info: dict[str, Any]) -> Entry:
        name = str(info["name"]).rstrip("/")
        rel = name[len(self.root) + 1 :] if name.startswith(self.root + "/") else name
        is_dir = info.get("type") == "directory"
        return Entry(rel, 0 if is_dir else int(info.get("size") or 0), _mtime(info), is_dir)

    def listdir(self, rel: str) -> list[Entry]:
        key = self.key(self.relative(rel) if rel else "")
        self.fs.invalidate_cache(key)
        try:
            infos = self._call("list", self.fs.ls, key, detail=True)
        except FileNotFoundError:
            return []
        entries = [self._entry(i) for i in infos if str(i["name"]).rstrip("/") != key]
        return sorted(entries, key=lambda e: e.path)

    def walk(self, rel: str = "") -> list[Entry]:
        key = self.key(self.relative(rel) if rel else "")
        self.fs.invalidate_cache(key)
        try:
            infos = self._call("walk", self.fs.find, key, detail=True)
        except FileNotFoundError:
            return []
        entries = [self._entry(i) for i in infos.values() if i.get("type") != "directory"]
        return sorted(entries, key=lambda e: e.path)

    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        key = self.key(self.relative(rel))
        opened = self._call(
            "open", self.fs.open, key, "rb", block_size=block_size, cache_type="readahead"
        )
        return CountedReader(opened, self.counters)  # type: ignore[return-value]

    def local_pack(self, rel: str, ref: PackRef | None = None) -> Path:
        """A verified local copy of the pack at ``rel``, of any format (the codec says
        which files it holds and how their digests make its ``values_digest``:
        :func:`fleet.codec.readers.pack_files`). With a ``ref`` whose digest the cache
        holds, no request is made: the cache admitted that copy verified."""
        from fleet.codec.pack import check_expected
        from fleet.codec.readers import pack_files

        rel = self.relative(rel)
        cache = self._need_cache()
        where = f"{self.url}/{rel}"
        if ref is not None and ref.values_digest is not None:
            hit = cache.get("packs", ref.values_digest.replace(":", "-"))
            if hit is not None:
                if ref.layout_hash is not None:
                    raw = json.loads((hit / MANIFEST_FILE).read_bytes())
                    check_expected(
                        pack_files(raw, str(hit)).manifest, where, layout_hash=ref.layout_hash
                    )
                return hit
        manifest_bytes = self._manifest_bytes(rel)
        spec = pack_files(_json(manifest_bytes, f"{where}/{MANIFEST_FILE}"), where)
        if ref is not None:
            check_expected(
                spec.manifest, where, layout_hash=ref.layout_hash, values_digest=ref.values_digest
            )
        key = spec.values_digest.replace(":", "-") if spec.values_digest else None
        if key is not None and (hit := cache.get("packs", key)) is not None:
            return hit
        with cache.staging() as tmp:
            pack = tmp / "pack"
            pack.mkdir()
            digests = []
            for name, nbytes in spec.files:
                digests.append(self._fetch(f"{rel}/{name}", pack / name, nbytes))
            actual = spec.combine(digests)
            if spec.values_digest is not None and actual != spec.values_digest:
                raise DigestMismatchError(f"{where}/{spec.files[0][0]}", spec.values_digest, actual)
            (pack / MANIFEST_FILE).write_bytes(manifest_bytes)
            return cache.admit("packs", key or "undigested-" + actual.replace(":", "-"), pack)

    def _manifest_bytes(self, rel: str) -> bytes:
        try:
            return self.read_bytes(f"{rel}/{MANIFEST_FILE}")
        except FileNotFoundError:
            raise NotAPackError(f"{self.url}/{rel}", f"no {MANIFEST_FILE}") from None

    def _fetch(self, rel: str, dest: Path, nbytes: int) -> bytes:
        """Copy the object ``rel`` to ``dest``; its xxh3_64 digest (8 bytes).

        Raises:
            ValuesLengthError: it is not ``nbytes`` long.
        """
        hasher = xxhash.xxh3_64()
        got = 0
        try:
            with (
                self.open_read(rel, block_size=FETCH_BLOCK_BYTES) as src,
                open(dest, "wb") as dst,
            ):
                while block := src.read(FETCH_BLOCK_BYTES):
                    hasher.update(block)
                    dst.write(block)
                    got += len(block)
        except FileNotFoundError:
            got = 0
        if got != nbytes:
            raise ValuesLengthError(f"{self.url}/{rel}", nbytes, got)
        return hasher.digest()

    def pack_reader(
        self,
        rel: str,
        *,
        block_size: int = 1 << 22,
        check_finite: bool = False,
        layout_hash: str | None = None,
        values_digest: str | None = None,
    ) -> PackReader | PseudoGradientReader:
        """As :meth:`Store.pack_reader`; a pack this worker holds in its cache under the
        expected digest (it wrote it, or read it before) is read from there, checked
        all the same."""
        from fleet.codec.readers import LocalFiles, open_pack

        if values_digest is not None and self.cache is not None:
            hit = self.cache.get("packs", values_digest.replace(":", "-"))
            if hit is not None:
                return open_pack(
                    LocalFiles(hit),
                    "",
                    block_size=block_size,
                    check_finite=check_finite,
                    layout_hash=layout_hash,
                    values_digest=values_digest,
                )
        return super().pack_reader(
            rel,
            block_size=block_size,
            check_finite=check_finite,
            layout_hash=layout_hash,
            values_digest=values_digest,
        )

    def _info(self, rel: str) -> dict[str, Any]:
        key = self.key(self.relative(rel))
        self.fs.invalidate_cache(key)
        info = self._call("info", self.fs.info, key)
        if info.get("type") == "directory":
            raise FileNotFoundError(rel)
        return dict(info)

    def size(self, rel: str) -> int:
        return int(self._info(rel).get("size") or 0)

    @staticmethod
    def _file_key(rel: str, info: dict[str, Any]) -> str:
        """The cache key of a file: its path and its version on the store (ETag, else
        size and modification time)."""
        version = info.get("ETag") or f"{info.get('size')}-{_mtime(info)}"
        return hashlib.sha256(f"{rel}\0{version}".encode()).hexdigest()[:40]

    def local_file(self, rel: str) -> Path:
        rel = self.relative(rel)
        cache = self._need_cache()
        key = self._file_key(rel, self._info(rel))
        name = posixpath.basename(rel)
        if (hit := cache.get("files", key)) is not None:
            return hit / name
        with cache.staging() as tmp:
            entry = tmp / "entry"
            entry.mkdir()
            self._call("fetch", self.fs.get_file, self.key(rel), str(entry / name))
            self.counters.received((entry / name).stat().st_size)
            return cache.admit("files", key, entry) / name

    def local_shard(
        self, rel: str, content_hash: str | None, *, dataset: str, shard_id: str
    ) -> Path:
        from fleet.data.shard_hash import SHA256_MULTIHASH

        rel = self.relative(rel)
        if content_hash is None:
            try:
                return self.local_file(rel)
            except FileNotFoundError:
                raise ShardMissingError(dataset, shard_id, rel) from None
        cache = self._need_cache()
        expected = content_hash.lower()
        name = posixpath.basename(rel)
        if (hit := cache.get("shards", expected)) is not None:
            if not (hit / name).exists():  # the same content under another name
                with suppress(FileExistsError):
                    os.link(next(hit.iterdir()), hit / name)
            return hit / name
        with cache.staging() as tmp:
            entry = tmp / "entry"
            entry.mkdir()
            digest = hashlib.sha256()
            try:
                with (
                    self.open_read(rel, block_size=FETCH_BLOCK_BYTES) as src,
                    open(entry / name, "wb") as dst,
                ):
                    while block := src.read(FETCH_BLOCK_BYTES):
                        digest.update(block)
                        dst.write(block)
            except FileNotFoundError:
                raise ShardMissingError(dataset, shard_id, rel) from None
            actual = SHA256_MULTIHASH + digest.hexdigest()
            if actual != expected:
                raise ShardHashMismatchError(dataset, shard_id, expected, actual)
            return cache.admit("shards", expected, entry) / name

    # ------------------------------------------------------------------ writes

    @contextmanager
    def output(self, rel: str, *, required: bool = True) -> Iterator[Path]:
        rel = self.relative(rel)
        cache = self._need_cache()
        with cache.staging() as tmp:
            local = tmp / posixpath.basename(rel)
            yield local
            if not (local.exists() or local.is_symlink()):
                if not required:
                    return
                raise StorageError(f"nothing was written to publish at {self.url}/{rel}")
            self.upload(local, rel)
            # what this worker just wrote is in its cache: its next read of it is local
            # (its own replica pack, the global pack it merged, its optimizer state)
            manifest = local / MANIFEST_FILE
            if local.is_dir() and manifest.is_file():
                digest = json.loads(manifest.read_bytes()).get("values_digest")
                if isinstance(digest, str):
                    cache.admit("packs", digest.replace(":", "-"), local)
            elif local.is_file():
                entry = local.parent / ".entry"
                entry.mkdir()
                os.rename(local, entry / local.name)
                cache.admit("files", self._file_key(rel, self._info(rel)), entry)

    def upload(self, local: Path, rel: str) -> None:
        """Upload a local file or directory tree to ``rel``: data objects first, then the
        commit files (:data:`~fleet.storage.store.COMMIT_FILES`), after any old commit
        file there was deleted.

        Raises:
            StorageError: the upload failed (what was uploaded has no commit file).
        """
        rel = self.relative(rel)
        if not local.is_dir():
            self._call("upload", self.fs.put_file, str(local), self.key(rel))
            self.counters.sent(local.stat().st_size)
            return
        files = sorted(p for p in local.rglob("*") if p.is_file())
        commits = [p for p in files if p.parent == local and p.name in COMMIT_FILES]
        for old in commits:
            with suppress(FileNotFoundError):
                self._call("unpublish", self.fs.rm_file, self.key(f"{rel}/{old.name}"))
        for path in [p for p in files if p not in commits] + commits:
            target = f"{rel}/{path.relative_to(local).as_posix()}"
            self._call("upload", self.fs.put_file, str(path), self.key(target))
            self.counters.sent(path.stat().st_size)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._call("write", self.fs.pipe_file, self.key(self.relative(rel)), data)
        self.counters.sent(len(data))

    def remove(self, rels: list[str]) -> int:
        freed = 0
        for rel in rels:
            rel = self.relative(rel)
            files = self.walk(rel) or [e for e in [self._maybe_file(rel)] if e is not None]
            if not files:
                continue
            freed += sum(e.size for e in files)
            self._call("remove", self.fs.rm, [self.key(e.path) for e in files])
        return freed

    def _maybe_file(self, rel: str) -> Entry | None:
        try:
            info = self._info(rel)
        except FileNotFoundError:
            return None
        return self._entry(info)

    def stale_uploads(self, min_age_s: float) -> list[str]:
        import time

        if not hasattr(self.fs, "list_multipart_uploads"):
            return []
        bucket, _, prefix = self.root.partition("/")
        now = time.time()
        out = []
        for upload in self._call("list uploads", self.fs.list_multipart_uploads, bucket):
            key = str(upload.get("Key", ""))
            started = upload.get("Initiated")
            age = now - started.timestamp() if hasattr(started, "timestamp") else min_age_s
            if key.startswith(prefix) and age >= min_age_s:
                out.append(f"{key}\0{upload['UploadId']}")
        return out

    def abort_uploads(self, ids: list[str]) -> int:
        bucket = self.root.partition("/")[0]
        for item in ids:
            key, upload_id = item.split("\0", 1)
            self._call(
                "abort upload",
                self.fs.call_s3,
                "abort_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
            )
        return len(ids)
