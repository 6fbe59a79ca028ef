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
(:meth:`ObjectStore.pack_reader`) and never holds more than a block per pack.

**Outages.** A store that goes away (restarted, its link down, overloaded: connection
errors, timeouts, 5xx replies, ``SlowDown``) is weather, as Redis is (docs/design.md,
decision 9). Each request is retried first by the client, botocore's standard retry
mode (:data:`REQUEST_ATTEMPTS` tries with jittered exponential backoff; s3fs's own
retry loop around it is set to one try, :data:`S3FS_TRIES`, so the two do not
multiply); then the whole store operation is run again, with exponential backoff
(:data:`RETRY_PAUSE_S`), for up to ``FLEET_STORE_RETRY_S`` seconds from its first
failure, after which it raises :class:`~fleet.errors.StorageUnavailableError`. Whole
operations, because a store that was down for a minute is beyond any per-request
retry, and because only a whole operation is safe to repeat: a pack's upload starts
again from the deletion of its old manifest and ends with the new one (a reader never
finds a manifest over partial values), a pack's fetch again from its manifest, every
byte hashed again against its digest. A streamed read (the outer step's) retries each
ranged GET on its own: the same bytes from the same offset, and the digest is checked
over the whole stream. Each process logs one line when a store's outage starts and
one when it ends.

Every request costs a round trip to the store, so none is sent that the store can do
without (the counts per operation are in ``benchmarks/store_requests.py``): a pack's
data objects are read with ranged GETs of the sizes its manifest gives (no HEAD
first; the last range asks for one byte more, so an object of another length is still
refused), a small object in one GET; whether paths exist, what is under them and what
to delete are one listing per directory (not a HEAD, then a listing, path by path);
data objects are uploaded concurrently, between the old manifest's deletion and the
new one's upload; a published file's version (its ETag) comes from its upload's reply.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import xxhash

from fleet.codec.manifest import MANIFEST_FILE
from fleet.errors import (
    CodecError,
    DigestMismatchError,
    ManifestError,
    NotAPackError,
    PathOutsideRootError,
    ShardHashMismatchError,
    ShardMissingError,
    StorageError,
    StorageIOError,
    StorageUnavailableError,
    ValuesLengthError,
)
from fleet.storage.cache import WorkerCache
from fleet.storage.refs import PackRef
from fleet.storage.store import COMMIT_FILES, CountedReader, Entry, Store, TransferCounters

if TYPE_CHECKING:
    from fleet.codec.pack import PackReader
    from fleet.codec.pseudo_gradient import PseudoGradientReader

log = logging.getLogger("fleet.storage")

P = ParamSpec("P")
T = TypeVar("T")

#: Tries of one S3 request by botocore's "standard" retry mode (connection errors,
#: timeouts, 5xx replies, throttling such as SlowDown; jittered exponential backoff)
#: before its failure reaches the store, which runs the whole operation again.
REQUEST_ATTEMPTS = 3
#: Tries of s3fs's own retry loop around botocore's (1: none of its own).
S3FS_TRIES = 1
#: First and largest pause between two tries of a whole store operation, seconds.
RETRY_PAUSE_S = (0.25, 4.0)
#: S3 error codes that mean "try again later" (whatever the HTTP status).
_BUSY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
    }
)

#: Bytes per read when fetching into the cache.
FETCH_BLOCK_BYTES = 8 << 20
#: A published file up to this size is sent in one PUT from memory (s3fs does the same
#: below twice its 50 MiB part size); its reply carries the version the cache keys by.
SMALL_FILE_BYTES = 64 << 20


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
    """``options`` for s3fs, with what fleet adds (the user's own settings win):
    botocore's standard retry mode (:data:`REQUEST_ATTEMPTS` tries), and a session whose
    clients count every HTTP request they send into ``counters`` (botocore's
    ``before-send`` event: once per try)."""
    from aiobotocore.session import AioSession  # type: ignore[import-untyped]

    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"mode": "standard", "max_attempts": REQUEST_ATTEMPTS})
    options["config_kwargs"] = config
    if options.get("session") is None:
        session_args = {k: options.pop(k) for k in _SESSION_ARGS if k in options}
        options["session"] = AioSession(**session_args)

    def sent(**_: Any) -> None:  # a before-send handler returns None: the request goes out
        counters.request()

    options["session"].register("before-send.s3", sent)
    return options


def _responses(exc: BaseException) -> Iterator[dict[str, Any]]:
    """The botocore responses (``{"Error": ..., "ResponseMetadata": ...}``) carried by
    ``exc`` and the exceptions it was raised from (s3fs raises OSErrors from them)."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            yield response


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _transient_classes() -> tuple[type[BaseException], ...]:
    """Exception classes of a store that is away for now: the built-in connection errors
    and timeouts, botocore's connection and HTTP errors (refused, reset, timed out, a
    reply cut short or unparseable), aiohttp's, http.client's."""
    from http.client import HTTPException

    found: list[type[BaseException]] = [ConnectionError, TimeoutError, HTTPException]
    try:
        from botocore.exceptions import (  # type: ignore[import-untyped]
            ConnectionError as BotoConnectionError,
        )
        from botocore.exceptions import HTTPClientError
        from botocore.parsers import ResponseParserError  # type: ignore[import-untyped]

        found += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(found)


def transient(exc: BaseException) -> bool:
    """True if ``exc`` (or what it was raised from) says the store is away for now, so
    the request may succeed when tried again: a connection refused, reset or timed out,
    a reply cut short, HTTP 5xx or 429, or a throttling code such as ``SlowDown``. Not a
    missing object, a refused credential or a bad request."""
    classes = _transient_classes()
    if any(isinstance(e, classes) for e in _chain(exc)):
        return True
    for response in _responses(exc):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        if (isinstance(status, int) and (status >= 500 or status == 429)) or code in _BUSY_CODES:
            return True
    return False


def _cause(exc: BaseException) -> str:
    """One line for the root of ``exc``: ``EndpointConnectionError: Could not ...``."""
    root = exc
    for e in _chain(exc):
        root = e
    text = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {text}"[:300] if text else type(root).__name__


class _Outage:
    """A process's view of one store's availability: it logs one line when an outage
    starts and one when it ends (not one per retry)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.since: float | None = None
        self._lock = threading.Lock()

    def failed(self, cause: str, retry_s: float) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                retrying = f"; retrying for up to {retry_s:g} s" if retry_s > 0 else ""
                log.warning("store %s is unreachable (%s)%s", self.url, cause, retrying)

    def recovered(self) -> None:
        if self.since is None:  # no lock on the way of every request
            return
        with self._lock:
            if self.since is not None:
                log.warning(
                    "store %s is back after %.1f s", self.url, time.monotonic() - self.since
                )
                self.since = None


_OUTAGES: dict[str, _Outage] = {}
_OUTAGES_LOCK = threading.Lock()


def _outage_of(url: str) -> _Outage:
    """The process's one view of the store at ``url``, shared by all its ObjectStores."""
    with _OUTAGES_LOCK:
        return _OUTAGES.setdefault(url, _Outage(url))


#: Per thread: inside a store operation that is retried as a whole (a nested one is not
#: retried on its own: the outer one runs again from its start).
_IN_OPERATION = threading.local()


def _retried(
    what: str,
) -> Callable[[Callable[Concatenate[ObjectStore, P], T]], Callable[Concatenate[ObjectStore, P], T]]:
    """Make a method of :class:`ObjectStore` one store operation, run again as a whole
    through an outage (:meth:`ObjectStore._retrying`)."""

    def wrap(
        method: Callable[Concatenate[ObjectStore, P], T],
    ) -> Callable[Concatenate[ObjectStore, P], T]:
        @functools.wraps(method)
        def run(store: ObjectStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
            operation = f"{what} {args[0]}" if args and isinstance(args[0], str) else what
            return store._retrying(operation, lambda: method(store, *args, **kwargs))

        return run

    return wrap


def _invalid_range(exc: BaseException) -> bool:
    """True if ``exc`` is a store's refusal of a range that starts past the object's end
    (HTTP 416, ``InvalidRange``)."""
    return any(
        r.get("Error", {}).get("Code") == "InvalidRange"
        or r.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416
        for r in _responses(exc)
    )


def _common_prefix(names: Iterable[str]) -> str:
    """The longest string every name starts with (character by character)."""
    ordered = sorted(names)
    if not ordered:
        return ""
    first, last = ordered[0], ordered[-1]
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


class _RangedReader:
    """A read-only binary file on one object, read in ranged GETs with no HEAD first:
    each request asks for what a read needs plus ``block_size`` bytes ahead (as
    fsspec's read-ahead cache does), so at most that is held.

    With ``nbytes`` (the object's length as a manifest gives it), reads end there: the
    request that reaches it asks for one byte more, and an object longer than that is
    refused (:class:`~fleet.errors.ValuesLengthError`, its size then asked for); a
    missing or shorter object reads short (the caller sees its end early and says what
    was missing). Without ``nbytes``, reads end where the object does, and a missing
    object raises ``FileNotFoundError``.
    """

    def __init__(
        self, store: ObjectStore, rel: str, block_size: int, nbytes: int | None = None
    ) -> None:
        self._store = store
        self._rel = rel
        self._block_size = max(1, block_size)
        self._nbytes = nbytes
        self._pos = 0
        self._buf = b""
        self._buf_at = 0
        self._end: int | None = None  # where the object ended, once a read found it

    def _get(self, start: int, end: int) -> bytes:
        try:
            return self._store._get_range(self._rel, start, end)
        except FileNotFoundError:
            if self._nbytes is None and start == 0:
                raise
            return b""
        except OSError as exc:
            if _invalid_range(exc):  # a range from the object's very end
                return b""
            raise

    def _take(self, n: int) -> bytes:
        """Up to ``n`` bytes from the position (one request at most)."""
        offset = self._pos - self._buf_at
        if 0 <= offset < len(self._buf):
            chunk = self._buf[offset : offset + n]
        else:
            limit = self._end if self._nbytes is None else self._nbytes
            if limit is not None and self._pos >= limit:
                return b""
            end = self._pos + n + self._block_size
            if self._nbytes is not None and end >= self._nbytes:
                end = self._nbytes + 1  # to the end, and one byte more: is it longer?
            self._buf, self._buf_at = b"", self._pos
            data = self._get(self._pos, end)
            if self._nbytes is not None and self._pos + len(data) > self._nbytes:
                where = f"{self._store.url}/{self._rel}"
                raise ValuesLengthError(where, self._nbytes, self._store.size(self._rel))
            if len(data) < end - self._pos:
                self._end = self._pos + len(data)
            self._buf = data
            chunk = data[:n]
        self._pos += len(chunk)
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self._take(max(self._block_size, 1 << 20)):
                parts.append(chunk)
            return b"".join(parts)
        out = bytearray()
        while len(out) < size:
            chunk = self._take(size - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            end = self._nbytes if self._nbytes is not None else self._store.size(self._rel)
            offset += end
        elif whence != 0:
            raise ValueError(f"whence {whence}")
        self._pos = max(0, offset)
        return self._pos

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._buf = b""

    def __enter__(self) -> _RangedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PackSource:
    """The store as a :class:`~fleet.codec.readers.FileSource` for reading one pack: the
    sizes of its data files come from the manifest read through it (no HEAD for them),
    and they are read in ranged GETs that check those sizes (:class:`_RangedReader`)."""

    def __init__(self, store: ObjectStore) -> None:
        self.url = store.url
        self._store = store
        self._sizes: dict[str, int] = {}

    def read_bytes(self, rel: str) -> bytes:
        from fleet.codec.readers import pack_files

        data = self._store.read_bytes(rel)
        if posixpath.basename(rel) == MANIFEST_FILE:
            folder = posixpath.dirname(rel)
            try:
                spec = pack_files(json.loads(data), f"{self.url}/{folder}")
            except (ValueError, CodecError):  # the reader says what is wrong with it
                return data
            self._sizes = {posixpath.join(folder, name): n for name, n in spec.files}
        return data

    def size(self, rel: str) -> int:
        if rel in self._sizes:  # checked while read
            return self._sizes[rel]
        return self._store.size(rel)

    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        reader = _RangedReader(self._store, rel, block_size, self._sizes.get(rel))
        return reader  # type: ignore[return-value]


class ObjectStore(Store):
    """A shared root at an fsspec URL, read through a worker cache (see the module
    docstring).

    Args:
        url: ``scheme://bucket/prefix``.
        storage_options: keyword arguments for the fsspec file system.
        cache: where reads are cached; required for :meth:`local_pack`,
            :meth:`local_file`, :meth:`local_shard` and :meth:`output`.
        retry_s: seconds an operation keeps retrying through an outage of the store
            (default: ``FleetSettings.store_retry_s``, ``FLEET_STORE_RETRY_S``).

    Every operation that reaches the store raises
    :class:`~fleet.errors.StorageUnavailableError` once it has failed for ``retry_s``
    seconds on a store that is away (see the module docstring).

    Raises:
        StorageError: the file system is unknown or cannot be made.
    """

    is_local = False

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None,
        cache: WorkerCache | None,
        *,
        retry_s: float | None = None,
    ) -> None:
        from fleet.settings import FleetSettings

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache = cache
        default = FleetSettings.model_fields["store_retry_s"].default
        self.retry_s = float(default if retry_s is None else retry_s)
        self.counters = TransferCounters()
        self._outage = _outage_of(self.url)
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        fs = self.fs  # fail early on an unknown scheme or a missing driver
        self.root = fs._strip_protocol(self.url).rstrip("/")
        #: s3fs: listings by prefix, GETs with no HEAD first (see the module docstring)
        self._s3 = _is_s3fs(type(fs))

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
                    if _is_s3fs(cls):
                        self._fs.retries = S3FS_TRIES
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
        """``fn(*args, **kwargs)``, a call of the file system.

        Raises:
            FileNotFoundError: as the file system raised it.
            StorageUnavailableError: the store is away for now (:func:`transient`).
            StorageIOError: it failed otherwise.
        """
        try:
            result = fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            if transient(exc):
                raise StorageUnavailableError(self.url, what, _cause(exc), 0.0) from exc
            if isinstance(exc, OSError | RuntimeError | ValueError):
                where = f"{self.url} ({what})"
                raise StorageIOError(where, type(exc).__name__, str(exc)) from exc
            raise
        self._outage.recovered()
        return result

    def _retrying(self, operation: str, run: Callable[[], T]) -> T:
        """``run()``, one store operation, run again from its start while it fails with
        :class:`StorageUnavailableError`, with exponential backoff
        (:data:`RETRY_PAUSE_S`), for up to :attr:`retry_s` seconds from its first
        failure; inside another operation, once (the outer one is retried).

        Raises:
            StorageUnavailableError: still failing after :attr:`retry_s` seconds.
        """
        if getattr(_IN_OPERATION, "active", False):
            return run()
        _IN_OPERATION.active = True
        try:
            first_failure: float | None = None
            pause_s = RETRY_PAUSE_S[0]
            while True:
                try:
                    return run()
                except StorageUnavailableError as exc:
                    now = time.monotonic()
                    first_failure = now if first_failure is None else first_failure
                    self._outage.failed(exc.cause, self.retry_s)
                    left_s = self.retry_s - (now - first_failure)
                    if left_s <= 0:
                        raise StorageUnavailableError(
                            self.url, operation, exc.cause, self.retry_s
                        ) from exc
                    time.sleep(min(pause_s, left_s))
                    pause_s = min(2 * pause_s, RETRY_PAUSE_S[1])
        finally:
            _IN_OPERATION.active = False

    # ------------------------------------------------------------------ reads

    def exists(self, rel: str) -> bool:
        return bool(self.existing([rel]))

    @_retried("exists")
    def existing(self, rels: list[str]) -> list[str]:
        """As :meth:`Store.existing`: on s3, one listing per directory the paths are in."""
        rels = [self.relative(rel) for rel in rels]
        if not self._s3:
            found = []
            for rel in rels:
                key = self.key(rel)
                self.fs.invalidate_cache(key)
                if self._call("exists", self.fs.exists, key):
                    found.append(rel)
            return found
        keys = self._objects_at(rels, "exists")
        return [rel for rel in rels if keys.get(rel)]

    def _objects_at(self, rels: list[str], what: str) -> dict[str, list[dict[str, Any]]]:
        """The objects at or under each of ``rels`` (s3: one listing per parent directory
        of the paths, of the names it holds that start like theirs)."""
        by_parent: dict[str, list[str]] = {}
        for rel in dict.fromkeys(rels):
            by_parent.setdefault(posixpath.dirname(rel), []).append(rel)
        out: dict[str, list[dict[str, Any]]] = {rel: [] for rel in rels}
        for parent, group in by_parent.items():
            stem = _common_prefix(posixpath.basename(rel) for rel in group)
            listed = self._find(self.key(parent), stem, what)
            for rel in group:
                key = self.key(rel)
                out[rel] = [
                    info
                    for name, info in listed.items()
                    if info.get("type") != "directory"
                    and (name == key or name.startswith(key + "/"))
                ]
        return out

    def _find(self, folder: str, stem: str, what: str, *, depth_one: bool = False) -> Any:
        """The objects (``depth_one``: and directories, one level down) under the key
        ``folder`` whose names start with ``stem``, by name: one listing (a page per
        1,000 names), as a prefix of ``folder``'s parent, so s3fs neither caches it nor
        falls back to a HEAD when it is empty."""
        parent, _, name = folder.rpartition("/")
        if parent:
            folder, stem = parent, f"{name}/{stem}"
        kwargs: dict[str, Any] = {"detail": True}
        if depth_one:
            kwargs.update(maxdepth=1, withdirs=True)
        if stem:
            kwargs["prefix"] = stem
        else:  # the bucket itself
            self.fs.invalidate_cache(folder)
        try:
            return self._call(what, self.fs.find, folder, **kwargs)
        except FileNotFoundError:
            return {}

    @_retried("read")
    def read_bytes(self, rel: str) -> bytes:
        # s3fs would send a HEAD first, to pick concurrent ranged GETs for a large object
        kwargs = {"max_concurrency": 1} if self._s3 else {}
        key = self.key(self.relative(rel))
        data = bytes(self._call("read", self.fs.cat_file, key, **kwargs))
        self.counters.received(len(data))
        return data

    @_retried("read")
    def _get_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the object ``rel``, fewer where it ends
        first: one GET.

        Raises:
            FileNotFoundError: no such object.
            OSError: the range starts at or past its end (see :func:`_invalid_range`).
        """
        kwargs = {"max_concurrency": 1} if self._s3 else {}
        key = self.key(rel)
        data = bytes(self._call("read", self.fs.cat_file, key, start=start, end=end, **kwargs))
        self.counters.received(len(data))
        return data

    def _entry(self, info: dict[str, Any]) -> Entry:
        name = str(info["name"]).rstrip("/")
        rel = name[len(self.root) + 1 :] if name.startswith(self.root + "/") else name
        is_dir = info.get("type") == "directory"
        return Entry(rel, 0 if is_dir else int(info.get("size") or 0), _mtime(info), is_dir)

    @_retried("list")
    def listdir(self, rel: str) -> list[Entry]:
        key = self.key(self.relative(rel) if rel else "")
        if self._s3:
            infos = list(self._find(key, "", "list", depth_one=True).values())
        else:
            self.fs.invalidate_cache(key)
            try:
                infos = self._call("list", self.fs.ls, key, detail=True)
            except FileNotFoundError:
                return []
        entries = [self._entry(i) for i in infos if str(i["name"]).rstrip("/") != key]
        return sorted(entries, key=lambda e: e.path)

    @_retried("walk")
    def walk(self, rel: str = "") -> list[Entry]:
        key = self.key(self.relative(rel) if rel else "")
        if self._s3:
            infos = self._find(key, "", "walk")
        else:
            self.fs.invalidate_cache(key)
            try:
                infos = self._call("walk", self.fs.find, key, detail=True)
            except FileNotFoundError:
                return []
        entries = [
            self._entry(i)
            for name, i in infos.items()
            if i.get("type") != "directory" and name.startswith(key + "/")
        ]
        return sorted(entries, key=lambda e: e.path)

    @_retried("open")
    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        key = self.key(self.relative(rel))
        opened = self._call(
            "open", self.fs.open, key, "rb", block_size=block_size, cache_type="readahead"
        )
        return CountedReader(opened, self.counters)  # type: ignore[return-value]

    @_retried("fetch pack")
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
        with (
            _RangedReader(self, rel, FETCH_BLOCK_BYTES, nbytes) as src,
            open(dest, "wb") as dst,
        ):
            while block := src.read(FETCH_BLOCK_BYTES):
                hasher.update(block)
                dst.write(block)
                got += len(block)
        if got != nbytes:
            raise ValuesLengthError(f"{self.url}/{rel}", nbytes, got)
        return hasher.digest()

    @_retried("open pack")
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
        all the same. From the store: its manifest in one GET, then ranged GETs of
        ``block_size`` bytes and more of each data file (no HEAD)."""
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
        return open_pack(
            _PackSource(self),
            self.relative(rel),
            block_size=block_size,
            check_finite=check_finite,
            layout_hash=layout_hash,
            values_digest=values_digest,
        )

    @_retried("info")
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

    @_retried("fetch")
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

    @_retried("fetch shard")
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
                    _RangedReader(self, rel, FETCH_BLOCK_BYTES) as src,
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
            reply = self.upload(local, rel)
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
                # keyed by the version the store gave it (its upload's ETag: no HEAD)
                info = reply if reply.get("ETag") else self._info(rel)
                cache.admit("files", self._file_key(rel, info), entry)

    @_retried("upload")
    def upload(self, local: Path, rel: str) -> dict[str, Any]:
        """Upload a local file or directory tree to ``rel``: data objects first (all at
        once), then the commit files (:data:`~fleet.storage.store.COMMIT_FILES`), after
        any old commit file there was deleted. Returns, for a file, the store's reply
        to its upload where it gives one (s3: its ``ETag``), else ``{}``.

        Raises:
            StorageError: the upload failed (what was uploaded has no commit file).
        """
        rel = self.relative(rel)
        if not local.is_dir():
            size = local.stat().st_size
            if self._s3 and size <= SMALL_FILE_BYTES:  # one PUT, whose reply has the ETag
                reply = self._call("upload", self.fs.pipe_file, self.key(rel), local.read_bytes())
            else:
                reply = self._call("upload", self.fs.put_file, str(local), self.key(rel))
            self.counters.sent(size)
            return dict(reply) if isinstance(reply, dict) else {}
        files = sorted(p for p in local.rglob("*") if p.is_file())
        commits = [p for p in files if p.parent == local and p.name in COMMIT_FILES]
        data = [p for p in files if p not in commits]
        if commits:
            old = [self.key(f"{rel}/{p.name}") for p in commits]
            with suppress(FileNotFoundError):
                self._call("unpublish", self.fs.rm, old)
        for batch in ([data] if len(data) > 1 else [[p] for p in data]) + [[p] for p in commits]:
            targets = [self.key(f"{rel}/{p.relative_to(local).as_posix()}") for p in batch]
            if len(batch) == 1:
                self._call("upload", self.fs.put_file, str(batch[0]), targets[0])
            else:  # concurrently (fsspec's batches)
                self._call("upload", self.fs.put, [str(p) for p in batch], targets)
            self.counters.sent(sum(p.stat().st_size for p in batch))
        return {}

    @_retried("write")
    def write_bytes(self, rel: str, data: bytes) -> None:
        self._call("write", self.fs.pipe_file, self.key(self.relative(rel)), data)
        self.counters.sent(len(data))

    @_retried("remove")
    def remove(self, rels: list[str]) -> int:
        """As :meth:`Store.remove`; on s3, one listing per directory the paths are in and
        one request per 1,000 objects deleted."""
        rels = [self.relative(rel) for rel in rels]
        if not self._s3:
            freed = 0
            for rel in rels:
                files = self.walk(rel) or [e for e in [self._maybe_file(rel)] if e is not None]
                if files:
                    freed += sum(e.size for e in files)
                    self._call("remove", self.fs.rm, [self.key(e.path) for e in files])
            return freed
        found = self._objects_at(rels, "remove")
        doomed = {
            str(info["name"]): int(info.get("size") or 0) for f in found.values() for info in f
        }
        if doomed:
            self._call("remove", self.fs.rm, sorted(doomed))
        return sum(doomed.values())

    def _maybe_file(self, rel: str) -> Entry | None:
        try:
            info = self._info(rel)
        except FileNotFoundError:
            return None
        return self._entry(info)

    @_retried("list uploads")
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

    @_retried("abort uploads")
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
