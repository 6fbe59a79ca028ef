"""fleet's storage layer: the shared root behind one interface, :class:`Store`, with a
local-path backend (:class:`LocalStore`) and an fsspec object-store backend
(:class:`~fleet.storage.object_store.ObjectStore`, ``s3://...``) read through a worker
cache (:class:`~fleet.storage.cache.WorkerCache`). :func:`open_store` picks one from
the settings. See :mod:`fleet.storage.store`."""

from fleet.files import TEMP_MARKER
from fleet.storage.local import SharedRoot, remove_paths
from fleet.storage.refs import RESULT_SUFFIX, PackRef, result_marker
from fleet.storage.roots import is_url, open_store
from fleet.storage.store import COMMIT_FILES, Entry, LocalStore, Store

__all__ = [
    "COMMIT_FILES",
    "RESULT_SUFFIX",
    "TEMP_MARKER",
    "Entry",
    "LocalStore",
    "PackRef",
    "SharedRoot",
    "Store",
    "is_url",
    "open_store",
    "remove_paths",
    "result_marker",
]
