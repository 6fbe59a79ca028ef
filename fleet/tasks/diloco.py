"""fleet's DiLoCo tasks: the outer step over packs (on a worker, streamed) and garbage
collection of a run's superseded packs."""

from __future__ import annotations

import time
from contextlib import ExitStack

import torch

from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import PackInput, Start, inputs_digest, stream_outer_step
from fleet.errors import CodecError, RequestValidationError, StorageError
from fleet.protocol import (
    CollectGarbageRequest,
    CollectGarbageResult,
    EagerStart,
    OuterStepRequest,
    OuterStepResult,
    VerifyPackRequest,
    VerifyPackResult,
    WorkloadRef,
)
from fleet.runtime import WorkerRuntime
from fleet.storage import PackRef, Store
from fleet.tasks.base import protocol_task

#: The key of the eager prediction among an outer step's outputs (no buffer's name).
PREDICTION = "<prediction>"


def _input(rt: WorkerRuntime, ref: PackRef) -> PackInput:
    return PackInput(rt.shared.relative(ref.path), ref.layout_hash, ref.values_digest)


def _start(rt: WorkerRuntime, start: EagerStart | None) -> Start | None:
    if start is None:
        return None
    fresh = _input(rt, start.fresh) if start.fresh is not None else None
    return Start(_input(rt, start.prediction), fresh, start.scale)


def _published(store: Store, rel: str, key: str) -> bool:
    """True if ``rel`` holds an intact pack an outer step computed from inputs ``key``
    (a corrupt one is computed again)."""
    try:
        if (store.read_manifest(rel).model_extra or {}).get("inputs_digest") != key:
            return False
        verify(store, rel)
    except (CodecError, StorageError):
        return False
    return True


def verify(
    store: Store, rel: str, *, layout_hash: str | None = None, values_digest: str | None = None
) -> None:
    """Read a pack once, 1 MiB at a time, checking its digest and finite values.

    Raises:
        CodecError: the pack is corrupt (naming it).
    """
    block = torch.empty(1 << 18, dtype=torch.float32)
    with store.pack_reader(
        rel, check_finite=True, layout_hash=layout_hash, values_digest=values_digest
    ) as reader:
        while reader.remaining:
            reader.read_into(block)


@protocol_task("outer_step")
def outer_step(
    rt: WorkerRuntime, req: OuterStepRequest, ref: WorkloadRef | None
) -> OuterStepResult:
    """DiLoCo's outer step (:func:`compute_outer_step`)."""
    return compute_outer_step(rt, req)


def compute_outer_step(
    rt: WorkerRuntime, req: OuterStepRequest, *, single_thread: bool = True
) -> OuterStepResult:
    """DiLoCo's outer step (:func:`fleet.diloco.outer.stream_outer_step`): reads the
    global, replica and optimizer-buffer packs chunk by chunk, checks their digests
    while reading, and publishes the next global pack and buffers (and the eager
    prediction, with ``output_prediction_path``). Outputs already published from the
    same inputs are returned as they are (a redelivered or re-run merge does not compute
    twice). Also run beside an overlapped round's inner steps
    (``RunInnerLoopRequest.outer_step``; ``single_thread=False`` there).

    Raises:
        RequestValidationError: ``output_state_paths`` are not the optimizer's buffers.
        CodecError: an input is corrupt (the error names it).
    """
    store = rt.shared
    optimizer = outer_optimizer(req.outer)
    if set(req.output_state_paths) != set(optimizer.buffers):
        raise RequestValidationError(
            "outer_step",
            [
                {
                    "loc": ["output_state_paths"],
                    "msg": f"the outer optimizer keeps {list(optimizer.buffers)}",
                    "type": "value_error",
                }
            ],
        )
    outputs = {
        "": store.relative(req.output_global_path),
        **{name: store.relative(path) for name, path in req.output_state_paths.items()},
    }
    predicted = store.relative(req.output_prediction_path) if req.output_prediction_path else None
    published = dict(outputs, **({PREDICTION: predicted} if predicted else {}))
    key = inputs_digest(
        req.model_dump(mode="json", exclude={"chunk_bytes", "output_prediction_path"})
    )
    if all(_published(store, rel, key) for rel in published.values()):
        return OuterStepResult(
            global_pack=store.pack_ref(outputs[""]),
            state={name: store.pack_ref(rel) for name, rel in outputs.items() if name},
            prediction=store.pack_ref(predicted) if predicted else None,
            bytes_read=0,
            bytes_written=0,
            seconds=0.0,
            reused=True,
        )
    with ExitStack() as stack:
        local = {name: stack.enter_context(store.output(rel)) for name, rel in published.items()}
        output = stream_outer_step(
            _input(rt, req.global_pack),
            [_input(rt, r.pack) for r in req.replicas],
            [r.weight for r in req.replicas],
            {name: _input(rt, pack) for name, pack in req.state.items()},
            optimizer,
            req.merge_policy,
            local[""],
            {name: path for name, path in local.items() if name and name != PREDICTION},
            chunk_bytes=req.chunk_bytes,
            inputs_key=key,
            store=store,
            out_prediction=local.get(PREDICTION),
            starts=[_start(rt, r.start) for r in req.replicas],
            single_thread=single_thread,
        )
    prediction = None
    if predicted is not None and output.prediction_manifest is not None:
        prediction = PackRef.of(predicted, output.prediction_manifest)
    return OuterStepResult(
        global_pack=PackRef.of(req.output_global_path, output.global_manifest),
        state={
            name: PackRef.of(req.output_state_paths[name], manifest)
            for name, manifest in output.state_manifests.items()
        },
        prediction=prediction,
        bytes_read=output.bytes_read,
        bytes_written=output.bytes_written,
        exchange_bytes=output.exchange_bytes,
        seconds=output.seconds,
    )


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
    present = [rel for rel in rels if rt.shared.exists(rel)]
    freed = rt.shared.remove(rels)
    return CollectGarbageResult(deleted=present, freed_bytes=freed)
