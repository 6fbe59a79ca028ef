"""Which store a shared root is: :func:`open_store` makes a
:class:`~fleet.storage.store.LocalStore` for a path and an
:class:`~fleet.storage.object_store.ObjectStore` for an fsspec URL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fleet.storage.cache import WorkerCache
from fleet.storage.object_store import ObjectStore
from fleet.storage.store import LocalStore, Store

if TYPE_CHECKING:
    from fleet.settings import FleetSettings


def open_store(settings: FleetSettings, *, cache: bool = True) -> Store:
    """The store of ``settings.shared_root``: a :class:`LocalStore` for a path, an
    :class:`~fleet.storage.object_store.ObjectStore` for a URL (``scheme://...``), with
    ``settings.storage_options``, a cache at ``settings.cache_dir`` and retries through
    outages for ``settings.store_retry_s`` seconds.

    Raises:
        StorageError: the URL's file system is unknown or cannot be opened (e.g. s3fs
            is not installed: ``pip install 'fleet-diloco[s3]'``).
    """
    root = os.fspath(settings.shared_root)
    if root.startswith("file://"):
        return LocalStore(root.removeprefix("file://"))
    if not is_url(root):
        return LocalStore(root)
    worker_cache = WorkerCache(settings.cache_dir, settings.cache_max_bytes) if cache else None
    return ObjectStore(root, settings.storage_options, worker_cache, retry_s=settings.store_retry_s)


def is_url(root: str) -> bool:
    """True if ``root`` names an fsspec file system (``scheme://...``), not a local path."""
    scheme, sep, _ = root.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"
