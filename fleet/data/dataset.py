"""Microshard datasets: a directory under the shared root (local or on an object
store), read as it is.

Two layouts:

- burn_p2p's: a ``fetch-manifest.json`` beside the shard files, ``{dataset_view_id,
  entries: [{microshard_id, ordinal, locator, content_hash, bytes_len}]}``, where
  ``locator`` is the shard's file name and ``content_hash`` its sha2-256 multihash in
  hex (``"1220"`` + the sha256 digest), as burn_p2p writes it;
- a plain directory of shard files (e.g. what burn_p2p's torch MNIST demo writes:
  ``00000.bin``, ...): every non-hidden file (matching ``glob`` if given), sorted by
  name, is one microshard, its name the id and its sorted position the ordinal.

:func:`read_dataset` checks that every shard exists with its recorded size (cheap, at
the start of a run); content hashes are checked when a shard is first leased on a
worker (:class:`ShardChecker`), or all at once by :func:`verify_dataset`
(``fleet dataset verify``). Every problem is a typed
:class:`~fleet.errors.DatasetError` naming the shard.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.data.shard_hash import SHA256_MULTIHASH, hash_stream
from fleet.errors import (
    DatasetFormatError,
    DatasetPathError,
    PathOutsideRootError,
    ShardHashMismatchError,
    ShardMissingError,
    ShardSizeMismatchError,
)
from fleet.files import atomic_write_bytes
from fleet.storage import LocalStore, Store

MANIFEST = "fetch-manifest.json"


class Microshard(BaseModel):
    """One microshard: its id, ordinal, file (shared-root relative), size in bytes and
    content hash (sha2-256 multihash hex; None when the layout records none)."""

    model_config = ConfigDict(frozen=True)

    microshard_id: str
    ordinal: int
    path: str
    bytes_len: int
    content_hash: str | None = None


class DatasetIndex(BaseModel):
    """A dataset as read: its directory (shared-root relative), view id, layout and
    microshards in ordinal order."""

    path: str
    view_id: str
    layout: Literal["burn-p2p-fetch-manifest", "directory"]
    microshards: list[Microshard]

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes_len for m in self.microshards)


class _Entry(BaseModel):
    microshard_id: str
    ordinal: int = Field(ge=0)
    locator: str
    content_hash: str
    bytes_len: int = Field(ge=0)


class _FetchManifest(BaseModel):
    dataset_view_id: str
    entries: list[_Entry]


def _rel(store: Store, dataset: str, path: str, shard: str | None) -> str:
    try:
        rel = store.relative(path)
        if isinstance(store, LocalStore):
            store.resolve(rel)  # a symlink out of the root
        return rel
    except PathOutsideRootError:
        raise DatasetPathError(dataset, shard) from None


def read_dataset(store: Store, path: str, *, glob: str | None = None) -> DatasetIndex:
    """Read the dataset at ``path`` (relative to the shared root, local or on an object
    store) and check that every shard exists with its recorded size (one listing).

    Raises:
        DatasetPathError: the dataset or a shard locator escapes the shared root.
        DatasetFormatError: no such directory, no shards, or a bad fetch-manifest.json.
        ShardMissingError: a listed shard has no file.
        ShardSizeMismatchError: a shard is not as long as the manifest says.
    """
    rel = _rel(store, path, path, None)
    files = {e.path: e for e in store.walk(rel)}
    if not files and not store.exists(rel):
        raise DatasetFormatError(rel, "no such directory")
    manifest = posixpath.join(rel, MANIFEST)
    if manifest in files:
        try:
            raw = _FetchManifest.model_validate(json.loads(store.read_bytes(manifest)))
        except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetFormatError(rel, f"{MANIFEST} is not valid: {exc}") from None
        shards = []
        for entry in sorted(raw.entries, key=lambda e: e.ordinal):
            file = _rel(store, rel, posixpath.join(rel, entry.locator), entry.locator)
            found = files.get(file)
            if found is None:
                raise ShardMissingError(rel, entry.microshard_id, file)
            if found.size != entry.bytes_len:
                raise ShardSizeMismatchError(rel, entry.microshard_id, entry.bytes_len, found.size)
            shards.append(
                Microshard(
                    microshard_id=entry.microshard_id,
                    ordinal=entry.ordinal,
                    path=file,
                    bytes_len=found.size,
                    content_hash=entry.content_hash.lower(),
                )
            )
        view_id = raw.dataset_view_id
        layout: Literal["burn-p2p-fetch-manifest", "directory"] = "burn-p2p-fetch-manifest"
    else:
        top = sorted(
            (
                e
                for e in files.values()
                if posixpath.dirname(e.path) == rel
                and not e.name.startswith(".")
                and (glob is None or fnmatch.fnmatch(e.name, glob))
            ),
            key=lambda e: e.name,
        )
        shards = [
            Microshard(
                microshard_id=e.name,
                ordinal=i,
                path=_rel(store, rel, e.path, e.name),
                bytes_len=e.size,
            )
            for i, e in enumerate(top)
        ]
        listing = json.dumps([(m.microshard_id, m.bytes_len) for m in shards])
        view_id = "dir-" + hashlib.sha256(listing.encode()).hexdigest()[:16]
        layout = "directory"
    if not shards:
        raise DatasetFormatError(rel, "no microshards" + (f" matching {glob!r}" if glob else ""))
    return DatasetIndex(path=rel, view_id=view_id, layout=layout, microshards=shards)


def verify_dataset(store: Store, index: DatasetIndex) -> int:
    """Check every shard's content hash (shards without one are skipped), streaming each
    from the store; return how many were checked.

    Raises:
        ShardHashMismatchError: the first shard whose content differs.
    """
    checked = 0
    for shard in index.microshards:
        if shard.content_hash is None:
            continue
        with store.open_read(shard.path) as f:
            actual = hash_stream(f)
        if actual != shard.content_hash:
            raise ShardHashMismatchError(
                index.path, shard.microshard_id, shard.content_hash, actual
            )
        checked += 1
    return checked


def write_dataset(
    out_dir: Path, shards: Sequence[bytes], *, manifest: bool = True, view_id: str | None = None
) -> DatasetIndex:
    """Write ``shards`` as a microshard dataset in ``out_dir`` (``00000.bin``, ...), each
    file published atomically, and with ``manifest`` burn_p2p's ``fetch-manifest.json``
    (content hashes, sizes; written last, so a dataset with a manifest is complete).
    Returns its index (its paths are the file names, relative to ``out_dir``).

    Raises:
        StorageError: the file system failed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, shards_out = [], []
    for ordinal, data in enumerate(shards):
        name, shard_id = f"{ordinal:05d}.bin", f"{out_dir.name}-{ordinal:05d}"
        atomic_write_bytes(out_dir / name, data)
        content = SHA256_MULTIHASH + hashlib.sha256(data).hexdigest()
        entries.append(
            {
                "microshard_id": shard_id,
                "ordinal": ordinal,
                "locator": name,
                "content_hash": content,
                "bytes_len": len(data),
            }
        )
        shards_out.append(
            Microshard(
                microshard_id=shard_id if manifest else name,
                ordinal=ordinal,
                path=name,
                bytes_len=len(data),
                content_hash=content if manifest else None,
            )
        )
    digest = hashlib.sha256(json.dumps([e["content_hash"] for e in entries]).encode()).hexdigest()
    view = view_id or f"{out_dir.name}-{digest[:16]}"
    if manifest:
        body = json.dumps({"dataset_view_id": view, "entries": entries}, indent=2)
        atomic_write_bytes(out_dir / MANIFEST, body.encode())
    layout: Literal["burn-p2p-fetch-manifest", "directory"] = (
        "burn-p2p-fetch-manifest" if manifest else "directory"
    )
    return DatasetIndex(path=out_dir.name, view_id=view, layout=layout, microshards=shards_out)
