"""Protocol methods that train and measure: train_window, evaluate, run_inner_loop.

``train_window`` and ``run_inner_loop`` are long tasks: they publish progress and stop
between steps when aborted or past their deadline (:mod:`fleet.progress`). The inner
loop itself is :mod:`fleet.inner_loop`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from fleet import progress
from fleet.codec.manifest import read_manifest
from fleet.data.localize import local_batches
from fleet.files import publishing
from fleet.inner_loop import check_metrics, metric_examples, metric_loss, run_loop
from fleet.model_packs import load_pack_into_held, publish_state_pack
from fleet.protocol import (
    EvaluateRequest,
    MetricsResult,
    RunInnerLoopRequest,
    RunInnerLoopResult,
    TrainWindowRequest,
    WorkloadRef,
)
from fleet.runtime import WorkerRuntime
from fleet.storage import PackRef
from fleet.tasks.base import protocol_task

log = logging.getLogger("fleet.train")


@protocol_task("train_window")
def train_window(
    rt: WorkerRuntime, req: TrainWindowRequest, ref: WorkloadRef | None
) -> MetricsResult:
    """Run the workload's ``train_window(state, batches)`` on a held model."""
    held = rt.held(req.model_id)
    batches = local_batches(rt, req.batches, req.shard_checks)
    metrics = check_metrics("train_window", held.workload.call("train_window", held.state, batches))
    rt.registry.touch(req.model_id, bump_generation=True)
    monitor = progress.current()
    if monitor is not None:
        monitor.step(1, loss=metric_loss(metrics), examples=metric_examples(metrics), force=True)
    return MetricsResult(metrics=metrics)


@protocol_task("evaluate")
def evaluate(rt: WorkerRuntime, req: EvaluateRequest, ref: WorkloadRef | None) -> MetricsResult:
    """Run the workload's ``evaluate(state, split)`` on a held model."""
    held = rt.held(req.model_id, tracks_loaded=True)
    split = req.split if isinstance(req.split, str) else req.split.model_dump()
    metrics = check_metrics("evaluate", held.workload.call("evaluate", held.state, split))
    rt.registry.touch(req.model_id)
    return MetricsResult(metrics=metrics)


def pack_stamp(path: Path) -> int | None:
    """The modification time (ns) of a pack's manifest, or None if there is none: tells
    whether a hook wrote the pack."""
    try:
        return (path / "manifest.json").stat().st_mtime_ns
    except FileNotFoundError:
        return None


@protocol_task("run_inner_loop")
def run_inner_loop(
    rt: WorkerRuntime, req: RunInnerLoopRequest, ref: WorkloadRef | None
) -> RunInnerLoopResult:
    """Run ``num_inner_steps`` steps on a held model and publish the result as a pack at
    ``output_parameter_pack_path`` (docs/protocol.md section 2).

    The workload's ``run_inner_loop(state, params)`` hook runs if defined (paths in
    ``params`` resolved to absolute paths on this worker); otherwise fleet's own loop
    of ``train_window`` steps (:mod:`fleet.inner_loop`). If the hook did not write the
    output pack, the worker writes it from the (possibly replaced) state. fleet: with
    ``input_parameter_pack`` the pack is loaded into the model first.

    Raises:
        StepBudgetError: ``require_exact_steps`` and another step count.
        DeadlineExceeded: past the deadline with ``require_exact_steps``.
        TaskAborted: asked to abort.
    """
    out_rel = rt.shared.relative(req.output_parameter_pack_path)
    key = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
    recorded = rt.shared.recorded_result(out_rel, key, RunInnerLoopResult)
    if recorded is not None:  # a redelivered message: it ran already, to completion
        log.info("already ran: returning the published %s", req.output_parameter_pack_path)
        return recorded  # type: ignore[no-any-return]
    held = rt.held(req.model_id, tracks_loaded=True)
    started_at = time.time()
    started = time.perf_counter()
    batches = local_batches(rt, req.batches, req.shard_checks)
    opt_rel = (
        rt.shared.relative(req.inner_optimizer_state_path)
        if req.inner_optimizer_state_path
        else None
    )
    with ExitStack() as outputs:
        if req.input_parameter_pack is not None:
            pack = req.input_parameter_pack
            local = rt.shared.local_pack(pack.path, pack)
            load_pack_into_held(held, local, req.state_dict_filter, pack)
        held.loaded = held.state_key = None  # the steps change it
        # local paths the loop writes; on an object store, staged and uploaded on exit
        out_path = outputs.enter_context(rt.shared.output(out_rel))
        opt_path = None
        if opt_rel is not None:
            opt_path = outputs.enter_context(rt.shared.output(opt_rel, required=False))
            _stage_optimizer_state(rt, req, opt_rel, opt_path)
        loaded = time.perf_counter()
        stamp = pack_stamp(out_path)
        params = req.model_dump(mode="json", by_alias=True, exclude={"shard_checks"})
        params["batches"] = batches
        params["output_parameter_pack_path"] = str(out_path)
        params["inner_optimizer_state_path"] = str(opt_path) if opt_path else None
        loop = run_loop(held, params, batches, opt_path)
        if pack_stamp(out_path) in (None, stamp):
            publish_state_pack(
                held.workload, held.state, out_path, req.model_schema_hash, req.state_dict_filter
            )
        manifest = read_manifest(out_path)
        pack, exchange_bytes = PackRef.of(out_rel, manifest), manifest.values_nbytes
        opt_out_rel = _optimizer_rel(
            rt, loop.result.get("inner_optimizer_state_path"), opt_path, opt_rel
        )
    published = time.perf_counter()
    rt.registry.touch(req.model_id, bump_generation=True)
    rt.registry.publish_pack(req.model_id, pack)
    outcome = RunInnerLoopResult(
        steps_completed=loop.steps,
        metrics=loop.metrics,
        inner_optimizer_state_path=opt_out_rel,
        inner_optimizer_state_encoding=loop.result.get("inner_optimizer_state_encoding"),
        pack=pack,
        exchange_bytes=exchange_bytes,
        load_s=loaded - started,
        compute_s=loop.compute_s,
        publish_s=published - loaded - loop.compute_s,
        started_at=started_at,
        finished_at=started_at + (published - started),
    )
    rt.shared.record_result(out_rel, key, outcome)
    return outcome


def _stage_optimizer_state(
    rt: WorkerRuntime, req: RunInnerLoopRequest, rel: str, opt_path: Path
) -> None:
    """Put the state the loop starts from at ``opt_path`` (the local path of ``rel``): a
    copy of ``inner_optimizer_state_source_path`` (the replica's state of the last
    round); without one, on an object store, the state already at ``rel`` if any (on a
    local root the loop reads it there itself).

    Raises:
        FileNotFoundError: the source state is missing.
    """
    source_rel = req.inner_optimizer_state_source_path
    if source_rel is None and rt.shared.is_local:
        return
    try:
        source = rt.shared.local_file(rt.shared.relative(source_rel or rel))
    except FileNotFoundError:
        if source_rel is None:  # no state yet: the loop starts a fresh optimizer
            return
        raise
    if source != opt_path:
        with publishing(opt_path) as tmp:
            shutil.copyfile(source, tmp)


def _optimizer_rel(
    rt: WorkerRuntime, reported: Any, opt_path: Path | None, opt_rel: str | None
) -> str | None:
    """The shared-root path of the optimizer state the loop reported writing."""
    if not reported:
        return None
    if opt_path is not None and Path(str(reported)) == opt_path:
        return opt_rel
    return rt.shared.relative(str(reported))
