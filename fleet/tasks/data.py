"""fleet's data tasks: a dataset as a worker sees it, and the BatchRefs a workload gets.

BatchRefs in requests name shards by paths relative to the shared root, or by absolute
paths on the worker's own disk; the worker makes them local paths before a hook sees
them (:func:`local_batches`): relative ones resolved under its own mount, or fetched
into its cache from an object store, refusing paths that escape the root; absolute
ones passed through (within ``FLEET_DATA_ROOTS`` if set). This covers the
``shard_paths`` of a ``cached_microshard_group``, and ``payload.shard_paths`` /
``payload.dataset_root`` of a ``micro_epoch`` (docs/protocol.md section 5.5).
"""

from __future__ import annotations

from fleet.data.dataset import DatasetIndex, read_dataset
from fleet.protocol import (
    DatasetIndexRequest,
    WorkloadRef,
)
from fleet.runtime import WorkerRuntime
from fleet.tasks.base import protocol_task


@protocol_task("dataset_index")
def dataset_index(
    rt: WorkerRuntime, req: DatasetIndexRequest, ref: WorkloadRef | None
) -> DatasetIndex:
    """The dataset at ``path`` with every shard's existence and size checked
    (:func:`fleet.data.dataset.read_dataset`)."""
    return read_dataset(rt.shared, req.path, glob=req.glob)
