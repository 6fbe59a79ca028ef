"""fleet's DiLoCo tasks (docs/protocol.md section 5.7), thin wrappers over
:mod:`fleet.diloco.replica` (a replica's round) and :mod:`fleet.diloco.globals` (a
worker's global models): the outer step, the evaluation of a global model, publishing
one in full, releasing a run's local state; and the shared-root chores that go with a
run (verifying a pack, garbage collection)."""

from __future__ import annotations

import time
import uuid

from fleet.codec.manifest import read_manifest
from fleet.devices import resolve_device
from fleet.diloco.globals import GlobalModels, HeldGlobal, copy_tree, run_dir
from fleet.diloco.replica import replica_round as run_replica_round
from fleet.diloco.uploads import Upload, background_uploads
from fleet.inner_loop import check_metrics
from fleet.jobs import JobStore
from fleet.model_packs import load_pack_into_held, state_from_pack
from fleet.protocol import (
    CollectGarbageRequest,
    CollectGarbageResult,
    EvaluateGlobalRequest,
    EvaluateGlobalResult,
    OuterStepRequest,
    OuterStepResult,
    PublishGlobalRequest,
    PublishGlobalResult,
    ReleaseRunRequest,
    ReleaseRunResult,
    ReplicaRoundRequest,
    ReplicaRoundResult,
    VerifyPackRequest,
    VerifyPackResult,
    WorkloadRef,
)
from fleet.runtime import WorkerRuntime
from fleet.storage import Store
from fleet.tasks.base import protocol_task


def _models(rt: WorkerRuntime, run: str) -> GlobalModels:
    return GlobalModels(rt.shared, run_dir(rt.settings.cache_dir, run))


@protocol_task("replica_round")
def replica_round(
    rt: WorkerRuntime, req: ReplicaRoundRequest, ref: WorkloadRef | None
) -> ReplicaRoundResult:
    """One attempt of a DiLoCo replica's round (:func:`fleet.diloco.replica.replica_round`)."""
    return run_replica_round(rt, req)


@protocol_task("outer_step")
def outer_step(
    rt: WorkerRuntime, req: OuterStepRequest, ref: WorkloadRef | None
) -> OuterStepResult:
    """DiLoCo's outer step on this worker: from the round's global model (held, or
    caught up), apply ``req.step`` (:meth:`fleet.diloco.globals.GlobalModels.step`) and
    keep the new model and buffers here; with ``checkpoint_path``, publish them in full
    (waiting, or in the background, recorded in Redis once landed).

    Raises:
        GlobalDigestMismatchError: a committed step rebuilt here gave other bits.
        BaseMismatchError: a pseudo-gradient of another base model (naming it).
        CodecError, StorageError: a pack is missing or corrupt (the error names it).
    """
    store = rt.shared
    counted, requests_before = store.counters.snapshot(), store.counters.requests
    started = time.perf_counter()
    models = _models(rt, req.run)
    base = models.resolve(req.global_model, chunk_bytes=req.chunk_bytes)
    stepped = models.step(base, req.step, chunk_bytes=req.chunk_bytes)
    manifest = read_manifest(stepped.path)
    round_index = req.step.round + 1
    checkpoint = None
    if req.checkpoint_path is not None:
        if req.checkpoint_wait:
            checkpoint = models.publish(stepped, req.checkpoint_path, round_index)
        else:
            _publish_in_background(rt, models, stepped, req.checkpoint_path, req.run, round_index)
    models.prune()
    sent, received = store.counters.since(counted)
    return OuterStepResult(
        global_digest=stepped.values_digest,
        state_digests=stepped.state_digests,
        layout_hash=manifest.layout_hash,
        parameter_count=manifest.parameter_count,
        model_schema_hash=manifest.model_schema_hash,
        checkpoint=checkpoint,
        checkpoint_scheduled=req.checkpoint_path is not None and not req.checkpoint_wait,
        steps_replayed=base.steps_replayed,
        sent_bytes=sent,
        received_bytes=received,
        store_requests=store.counters.requests - requests_before,
        seconds=time.perf_counter() - started,
    )


def _publish_in_background(
    rt: WorkerRuntime, models: GlobalModels, model: HeldGlobal, path: str, run: str, index: int
) -> None:
    """Publish ``model`` in full at ``path`` off the critical path, from private hard links
    (the run directory may prune the model meanwhile); record it once landed."""
    jobs = JobStore(rt.registry)
    staging = models.root / ".uploads" / uuid.uuid4().hex
    copy_tree(model.path, staging / "global", link=True)
    for name, buffer in model.state.items():
        copy_tree(buffer, staging / name, link=True)
    staged = HeldGlobal(
        staging / "global", model.values_digest, {n: staging / n for n in model.state}
    )

    def upload() -> None:
        checkpoint = models.publish(staged, path, index)
        jobs.record_checkpoint(run, f"global/{index}", checkpoint.model_dump_json())

    background_uploads().submit(Upload(f"global/{index}", upload, staging))


@protocol_task("evaluate_global")
def evaluate_global(
    rt: WorkerRuntime, req: EvaluateGlobalRequest, ref: WorkloadRef | None
) -> EvaluateGlobalResult:
    """Evaluate a run's global model (held here, or caught up) on ``split``: in the held
    model ``model_id`` (loaded in place) or in a model the workload builds for it.

    Raises:
        HandleNotFound: ``model_id`` is not held here.
        CodecError, StorageError: the global model cannot be had.
    """
    counted, started_at = rt.shared.counters.snapshot(), time.time()
    models = _models(rt, req.run)
    if req.own_models:
        models = GlobalModels(rt.shared, models.root / "evaluators" / rt.identity.name)
        model = models.resolve(req.global_model)
        models.prune()
    else:
        model = models.resolve(req.global_model)
    sent, received = rt.shared.counters.since(counted)
    split = req.split if isinstance(req.split, str) else req.split.model_dump()
    if req.model_id is not None:
        held = rt.held(req.model_id, tracks_loaded=True)
        load_pack_into_held(held, model.path, req.state_dict_filter, model.ref())
        workload, state = held.workload, held.state
    else:
        workload = rt.workload(ref)
        device = resolve_device(req.device)
        state = state_from_pack(workload, device, model.path, req.state_dict_filter, model.ref())
    metrics = check_metrics("evaluate", workload.call("evaluate", state, split))
    return EvaluateGlobalResult(
        metrics=metrics,
        sent_bytes=sent,
        received_bytes=received,
        started_at=started_at,
        finished_at=time.time(),
    )


@protocol_task("publish_global")
def publish_global(
    rt: WorkerRuntime, req: PublishGlobalRequest, ref: WorkloadRef | None
) -> PublishGlobalResult:
    """Publish a run's global model (held here, or caught up) in full at ``path``, with
    its buffers beside it, and wait for the upload.

    Raises:
        CodecError, StorageError: the model cannot be had, or the upload failed.
    """
    counted = rt.shared.counters.snapshot()
    models = _models(rt, req.run)
    model = models.resolve(req.global_model)
    checkpoint = models.publish(model, req.path, req.global_model.round)
    sent, received = rt.shared.counters.since(counted)
    return PublishGlobalResult(checkpoint=checkpoint, sent_bytes=sent, received_bytes=received)


@protocol_task("release_run")
def release_run(
    rt: WorkerRuntime, req: ReleaseRunRequest, ref: WorkloadRef | None
) -> ReleaseRunResult:
    """Delete this worker's state of a run that ended (its background uploads finish
    first)."""
    background_uploads().wait_idle(timeout_s=rt.settings.call_timeout_s)
    return ReleaseRunResult(freed_bytes=_models(rt, req.run).release())


def verify(
    store: Store, rel: str, *, layout_hash: str | None = None, values_digest: str | None = None
) -> None:
    """Read a pack on ``store`` once, checking its digest and finite values.

    Raises:
        CodecError: the pack is corrupt (naming it).
    """
    import torch

    block = torch.empty(1 << 18, dtype=torch.float32)
    with store.pack_reader(
        rel, check_finite=True, layout_hash=layout_hash, values_digest=values_digest
    ) as reader:
        while reader.remaining:
            reader.read_into(block)


@protocol_task("verify_pack")
def verify_pack(
    rt: WorkerRuntime, req: VerifyPackRequest, ref: WorkloadRef | None
) -> VerifyPackResult:
    """Check a pack against its PackRef (layout hash, digest), its length and, with
    ``check_finite``, that no value is NaN or infinite, in one streamed read.

    Raises:
        CodecError: the pack is missing, truncated, replaced, corrupt or non-finite.
    """
    started = time.perf_counter()
    verify(
        rt.shared,
        req.pack.path,
        layout_hash=req.pack.layout_hash,
        values_digest=req.pack.values_digest,
    )
    return VerifyPackResult(pack=req.pack, seconds=time.perf_counter() - started)


@protocol_task("collect_garbage")
def collect_garbage(
    rt: WorkerRuntime, req: CollectGarbageRequest, ref: WorkloadRef | None
) -> CollectGarbageResult:
    """Delete the given files and directories under the shared root (missing ones are
    skipped), then each parent directory that became empty."""
    rels = [rt.shared.relative(rel) for rel in req.paths]
    present = rt.shared.existing(rels)  # one listing per directory on an object store
    freed = rt.shared.remove(rels)
    return CollectGarbageResult(deleted=present, freed_bytes=freed)
