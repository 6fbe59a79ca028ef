"""fleet's data tasks: a dataset as a worker sees it, and the BatchRefs a workload gets.

BatchRefs in requests name shards by paths relative to the shared root; the worker
resolves them under its own mount (refusing paths that escape the root) before a hook
sees them, so workers may mount the shared root at different places: the
``shard_paths`` of a ``cached_microshard_group``, and ``payload.shard_paths`` /
``payload.dataset_root`` of a ``micro_epoch`` (docs/protocol.md section 5.5).
"""

from __future__ import annotations

from typing import Any

from fleet.data.dataset import DatasetIndex, read_dataset
from fleet.errors import DatasetPathError, PathOutsideRootError
from fleet.protocol import BatchRef, DatasetIndexRequest, ShardChecks, WorkloadRef
from fleet.runtime import WorkerRuntime
from fleet.storage import SharedRoot
from fleet.tasks.base import protocol_task


@protocol_task("dataset_index")
def dataset_index(
    rt: WorkerRuntime, req: DatasetIndexRequest, ref: WorkloadRef | None
) -> DatasetIndex:
    """The dataset at ``path`` with every shard's existence and size checked
    (:func:`fleet.data.dataset.read_dataset`)."""
    return read_dataset(rt.shared, req.path, glob=req.glob)


def _absolute(shared: SharedRoot, paths: Any) -> Any:
    if not isinstance(paths, list):
        return paths
    try:
        return [str(shared.resolve(p)) if isinstance(p, str) else p for p in paths]
    except PathOutsideRootError as exc:
        raise DatasetPathError("(batches)", exc.path) from None


def resolve_batches(shared: SharedRoot, batches: list[BatchRef]) -> list[dict[str, Any]]:
    """The BatchRefs as JSON for a hook, with shard paths absolute on this worker.

    Raises:
        DatasetPathError: a shard path escapes the shared root.
    """
    out = []
    for batch in batches:
        data = batch.model_dump(mode="json")
        if data["kind"] == "cached_microshard_group":
            data["shard_paths"] = _absolute(shared, data["shard_paths"])
        elif isinstance(data.get("payload"), dict):
            payload = dict(data["payload"])
            payload["shard_paths"] = _absolute(shared, payload.get("shard_paths"))
            if isinstance(payload.get("dataset_root"), str):
                payload["dataset_root"] = _absolute(shared, [payload["dataset_root"]])[0]
            data["payload"] = {
                k: v for k, v in payload.items() if v is not None or k in data["payload"]
            }
        out.append(data)
    return out


def check_shards(rt: WorkerRuntime, checks: ShardChecks | None) -> None:
    """Check the content hash of each shard a call will read, once per worker process.

    Raises:
        ShardHashMismatchError, ShardMissingError, DatasetPathError: before any step.
    """
    if checks is None:
        return
    for shard in checks.shards:
        try:
            path = rt.shared.resolve(shard.path)
        except PathOutsideRootError:
            raise DatasetPathError(checks.dataset, shard.path) from None
        rt.shards.check(checks.dataset, shard.microshard_id, path, shard.content_hash)
