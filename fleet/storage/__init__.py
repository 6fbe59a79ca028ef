"""fleet's storage layer: the shared root behind one interface, :class:`Store`, with a
local-path backend (:class:`LocalStore`) and an fsspec object-store backend
(:class:`~fleet.storage.object_store.ObjectStore`, ``s3://...``) read through a worker
cache (:class:`~fleet.storage.cache.WorkerCache`). :func:`open_store` picks one from
the settings. See :mod:`fleet.storage.store`."""

from fleet.storage.local import (
    SharedRoot,
    atomic_write_bytes,
    fsync_path,
    publishing,
    remove_paths,
    temp_sibling,
)
from fleet.storage.refs import RESULT_SUFFIX, TEMP_MARKER, PackRef, result_marker
from fleet.storage.store import COMMIT_FILES, Entry, LocalStore, Store, is_url, open_store

__all__ = [
    "COMMIT_FILES",
    "RESULT_SUFFIX",
    "TEMP_MARKER",
    "Entry",
    "LocalStore",
    "PackRef",
    "SharedRoot",
    "Store",
    "atomic_write_bytes",
    "fsync_path",
    "is_url",
    "open_store",
    "publishing",
    "remove_paths",
    "result_marker",
    "temp_sibling",
]
