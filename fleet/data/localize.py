"""BatchRefs made local for a hook on this worker (docs/protocol.md section 5.5): every
shard path a file the hook can open, fetched and checked where it lives on the shared
root, an absolute path kept as given (inside ``FLEET_DATA_ROOTS`` when set)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fleet.errors import DatasetPathError, PathOutsideRootError
from fleet.protocol import BatchRef, ShardChecks, ShardExpectation
from fleet.runtime import WorkerRuntime
from fleet.storage import LocalStore


def _shard_path(
    rt: WorkerRuntime, path: Any, expected: dict[str, ShardExpectation], dataset: str
) -> Any:
    """A shard path as a hook reads it: an absolute path as given (a file on this worker,
    protocol section 5.5; inside ``FLEET_DATA_ROOTS`` when that is set), a relative one
    resolved under the shared root (a cached, verified copy on an object store)."""
    if not isinstance(path, str):
        return path
    if os.path.isabs(path):
        roots = rt.settings.data_roots
        if roots and not any(Path(path).resolve().is_relative_to(r.resolve()) for r in roots):
            raise DatasetPathError(dataset, path, data_roots=[str(r) for r in roots])
        return path
    try:
        rel = rt.shared.relative(path)
    except PathOutsideRootError:
        raise DatasetPathError(dataset, path) from None
    shard = expected.get(rel)
    if shard is None:
        return str(rt.shared.local_shard(rel, None, dataset=dataset, shard_id=rel))
    return str(
        rt.shared.local_shard(
            rel, shard.content_hash, dataset=dataset, shard_id=shard.microshard_id
        )
    )


def local_batches(
    rt: WorkerRuntime, batches: list[BatchRef], checks: ShardChecks | None = None
) -> list[dict[str, Any]]:
    """The BatchRefs as JSON for a hook, with every shard path local on this worker:
    relative paths under the shared root (fetched into the worker cache and checked
    against ``checks``' content hashes on an object store; hash-checked once per process
    on a local root), absolute paths as given. Shards named by ``checks`` are checked
    first, before any step.

    Raises:
        DatasetPathError: a relative path escapes the shared root, or an absolute one
            lies outside ``FLEET_DATA_ROOTS``.
        ShardHashMismatchError, ShardMissingError: a shard is corrupt or gone.
    """
    dataset = checks.dataset if checks is not None else "(batches)"
    expected: dict[str, ShardExpectation] = {}
    for shard in checks.shards if checks is not None else []:
        try:
            rel = rt.shared.relative(shard.path)
        except PathOutsideRootError:
            raise DatasetPathError(dataset, shard.path) from None
        expected[rel] = shard
        rt.shared.local_shard(
            rel, shard.content_hash, dataset=dataset, shard_id=shard.microshard_id
        )

    def local(paths: Any) -> Any:
        if not isinstance(paths, list):
            return paths
        return [_shard_path(rt, p, expected, dataset) for p in paths]

    out = []
    for batch in batches:
        data = batch.model_dump(mode="json")
        if data["kind"] == "cached_microshard_group":
            data["shard_paths"] = local(data["shard_paths"])
        elif isinstance(data.get("payload"), dict):
            payload = dict(data["payload"])
            payload["shard_paths"] = local(payload.get("shard_paths"))
            root = payload.get("dataset_root")
            # a local directory only where there is one: on an object store the dataset
            # has no local directory (its shards are cached one by one), so it stays
            # shared-root relative
            if (
                isinstance(root, str)
                and not os.path.isabs(root)
                and isinstance(rt.shared, LocalStore)
            ):
                try:
                    payload["dataset_root"] = str(rt.shared.resolve(root))
                except PathOutsideRootError:
                    raise DatasetPathError(dataset, root) from None
            data["payload"] = {
                k: v for k, v in payload.items() if v is not None or k in data["payload"]
            }
        out.append(data)
    return out
