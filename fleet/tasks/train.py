"""Protocol methods that train and measure: train_window, evaluate, run_inner_loop.

``train_window`` and ``run_inner_loop`` are long tasks: they publish progress and stop
between steps when aborted or past their deadline (:mod:`fleet.progress`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from fleet import progress
from fleet.codec.codecs import codec_for
from fleet.codec.manifest import read_manifest
from fleet.errors import (
    CodecError,
    DeadlineExceeded,
    MetricValueError,
    StepBudgetError,
    StorageError,
)
from fleet.files import publishing
from fleet.protocol import (
    EvaluateRequest,
    MetricsResult,
    OuterStepRequest,
    OuterStepResult,
    RunInnerLoopRequest,
    RunInnerLoopResult,
    TrainWindowRequest,
    WorkloadRef,
)
from fleet.runtime import HeldModel, WorkerRuntime
from fleet.storage import PackRef, result_marker
from fleet.tasks.base import protocol_task
from fleet.tasks.data import local_batches
from fleet.tasks.models import load_pack_into_held, publish_state_pack
from fleet.torch_state import TORCH_OPTIMIZER_STATE, save_torch

log = logging.getLogger("fleet.train")

#: fleet's inner loop logs a progress line every this many steps.
LOG_EVERY_STEPS = 10


def check_metrics(hook: str, metrics: object) -> dict[str, bool | int | float | str]:
    """Metric values must be bool, int, float or str (docs/protocol.md section 2).

    Raises:
        MetricValueError: another type, or ``metrics`` is not a dict with str keys.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise MetricValueError(hook, "<metrics>", type(metrics).__name__)
    for key, value in metrics.items():
        if not isinstance(key, str) or not isinstance(value, bool | int | float | str):
            raise MetricValueError(hook, str(key), type(value).__name__)
    return dict(metrics)


def _loss(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("loss")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _examples(metrics: dict[str, Any]) -> int:
    for key in ("examples", "samples", "batch_size"):
        value = metrics.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


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
        monitor.step(1, loss=_loss(metrics), examples=_examples(metrics), force=True)
    return MetricsResult(metrics=metrics)


@protocol_task("evaluate")
def evaluate(rt: WorkerRuntime, req: EvaluateRequest, ref: WorkloadRef | None) -> MetricsResult:
    """Run the workload's ``evaluate(state, split)`` on a held model."""
    held = rt.held(req.model_id, reads_only=True)
    split = req.split if isinstance(req.split, str) else req.split.model_dump()
    metrics = check_metrics("evaluate", held.workload.call("evaluate", held.state, split))
    rt.registry.touch(req.model_id)
    return MetricsResult(metrics=metrics)


def _pack_stamp(path: Path) -> int | None:
    try:
        return (path / "manifest.json").stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _optimizer_of(state: Any) -> torch.optim.Optimizer | None:
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _fleet_inner_loop(
    held: HeldModel, req: RunInnerLoopRequest, batches: list[dict[str, Any]], opt_path: Path | None
) -> dict[str, Any]:
    """fleet's inner loop for workloads without a ``run_inner_loop`` hook: one
    ``train_window(state, [batch])`` per step, cycling through ``batches`` (or ``[]``,
    letting the workload draw its own data), reporting progress between steps. An
    optimizer at ``state["optimizer"]`` is restored from / saved to ``opt_path``."""
    optimizer = _optimizer_of(held.state)
    if optimizer is not None and opt_path is not None and opt_path.exists():
        optimizer.load_state_dict(torch.load(opt_path, weights_only=True))
    metrics: dict[str, Any] = {}
    losses: list[float] = []
    steps = 0
    try:
        for step in range(req.num_inner_steps):
            window = [batches[step % len(batches)]] if batches else []
            metrics = check_metrics(
                "train_window", held.workload.call("train_window", held.state, window)
            )
            loss = _loss(metrics)
            if loss is not None and math.isfinite(loss):
                losses.append(loss)
            steps = step + 1
            if steps % LOG_EVERY_STEPS == 0 or steps == req.num_inner_steps:
                log.info("step %d/%d loss %s", steps, req.num_inner_steps, loss)
            progress.report(steps, loss=loss, examples=_examples(metrics))
    except DeadlineExceeded:
        if req.require_exact_steps:
            raise
    out: dict[str, Any] = {"steps_completed": steps, "metrics": dict(metrics)}
    if losses:
        out["metrics"]["mean_loss"] = sum(losses) / len(losses)
    if optimizer is not None and opt_path is not None:
        save_torch(optimizer.state_dict(), opt_path)
        out["inner_optimizer_state_path"] = str(opt_path)
        out["inner_optimizer_state_encoding"] = TORCH_OPTIMIZER_STATE
    return out


@protocol_task("run_inner_loop")
def run_inner_loop(
    rt: WorkerRuntime, req: RunInnerLoopRequest, ref: WorkloadRef | None
) -> RunInnerLoopResult:
    """Run ``num_inner_steps`` steps on a held model and publish the result as a pack at
    ``output_parameter_pack_path`` (docs/protocol.md section 2).

    The workload's ``run_inner_loop(state, params)`` hook runs if defined (paths in
    ``params`` resolved to absolute paths on this worker); otherwise fleet's own loop
    of ``train_window`` steps. If the hook did not write the output pack, the worker
    writes it from the (possibly replaced) state. fleet: with ``input_parameter_pack_path``
    the pack is loaded into the model first.

    Raises:
        StepBudgetError: ``require_exact_steps`` and another step count.
        DeadlineExceeded: past the deadline with ``require_exact_steps``.
        TaskAborted: asked to abort.
    """
    out_rel = rt.shared.relative(req.output_parameter_pack_path)
    key = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
    recorded = _recorded_result(rt, out_rel, key)
    if recorded is not None:  # a redelivered message: it ran already, to completion
        log.info("already ran: returning the published %s", req.output_parameter_pack_path)
        return recorded
    held = rt.held(req.model_id, reads_only=True)
    started_at = time.time()
    started = time.perf_counter()
    beside = BackgroundOuterStep(rt, req.outer_step) if req.outer_step is not None else None
    batches = local_batches(rt, req.batches, req.shard_checks)
    opt_rel = (
        rt.shared.relative(req.inner_optimizer_state_path)
        if req.inner_optimizer_state_path
        else None
    )
    with ExitStack() as outputs:
        base = _start_point(rt, req, held, outputs)
        held.loaded = None  # the steps change it
        # local paths the loop writes; on an object store, staged and uploaded on exit
        out_path = outputs.enter_context(rt.shared.output(out_rel))
        params_path = out_path
        if req.pseudo_gradient is not None:  # the parameters stay on this worker
            scratch = outputs.enter_context(tempfile.TemporaryDirectory(prefix="fleet-delta-"))
            params_path = Path(scratch) / "parameters"
        opt_path = None
        if opt_rel is not None:
            opt_path = outputs.enter_context(rt.shared.output(opt_rel, required=False))
            _stage_optimizer_state(rt, req, opt_rel, opt_path)
        loaded = time.perf_counter()
        stamp = _pack_stamp(params_path)
        if held.workload.has("run_inner_loop"):
            params = req.model_dump(
                mode="json",
                by_alias=True,
                exclude={"shard_checks", "pseudo_gradient", "eager_start", "outer_step"},
            )
            params["batches"] = batches
            params["output_parameter_pack_path"] = str(params_path)
            params["inner_optimizer_state_path"] = str(opt_path) if opt_path else None
            result = held.workload.call("run_inner_loop", held.state, params) or {}
            if result.get("state") is not None:
                held.state = result["state"]
        else:
            result = _fleet_inner_loop(held, req, batches, opt_path)
        computed = time.perf_counter()
        steps = int(result.get("steps_completed", req.num_inner_steps))
        if req.require_exact_steps and steps != req.num_inner_steps:
            raise StepBudgetError(steps, req.num_inner_steps)
        if _pack_stamp(params_path) in (None, stamp):
            publish_state_pack(
                held.workload, held.state, params_path, req.model_schema_hash, req.state_dict_filter
            )
        error_feedback = None
        if req.pseudo_gradient is None:
            manifest = read_manifest(out_path)
            pack, exchange_bytes = PackRef.of(out_rel, manifest), manifest.values_nbytes
        else:
            assert base is not None  # the request's validator
            pack, error_feedback, exchange_bytes = _publish_delta(
                rt, req, base, params_path, out_path, out_rel, outputs
            )
        opt_out = result.get("inner_optimizer_state_path")
        opt_out_rel = _optimizer_rel(rt, opt_out, opt_path, opt_rel)
    published = time.perf_counter()
    outer_result, outer_error = beside.join() if beside is not None else (None, None)
    rt.registry.touch(req.model_id, bump_generation=True)
    if req.pseudo_gradient is None:
        rt.registry.publish_pack(req.model_id, pack)
    outcome = RunInnerLoopResult(
        steps_completed=steps,
        metrics=check_metrics("run_inner_loop", result.get("metrics")),
        inner_optimizer_state_path=opt_out_rel,
        inner_optimizer_state_encoding=result.get("inner_optimizer_state_encoding"),
        pack=pack,
        exchange_bytes=exchange_bytes,
        error_feedback=error_feedback,
        load_s=loaded - started,
        compute_s=computed - loaded,
        publish_s=published - computed,
        started_at=started_at,
        finished_at=started_at + (published - started),
        outer_step=outer_result,
        outer_step_error=outer_error,
    )
    record = {"request": key, "result": outcome.model_dump(mode="json")}
    rt.shared.write_bytes(result_marker(out_rel), json.dumps(record).encode())
    return outcome


class BackgroundOuterStep:
    """An overlapped run's outer step, run in a thread beside the inner steps
    (``RunInnerLoopRequest.outer_step``). Its arithmetic, file reads and hashing release
    the GIL; its outputs are published atomically, so one cut short by an abort leaves
    nothing a reader would take."""

    def __init__(self, rt: WorkerRuntime, req: OuterStepRequest) -> None:
        from fleet.tasks.diloco import compute_outer_step

        self._result: OuterStepResult | None = None
        self._error: str | None = None

        def run() -> None:
            try:
                self._result = compute_outer_step(rt, req, single_thread=False)
            except Exception as exc:  # reported to the orchestrator, which runs it again
                log.warning("the outer step beside the inner steps failed: %s", exc)
                self._error = f"{type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=run, name="fleet-outer-step", daemon=True)
        self._thread.start()

    def join(self) -> tuple[OuterStepResult | None, str | None]:
        """Wait for it; its result, or why it failed."""
        self._thread.join()
        return self._result, self._error


def _start_point(
    rt: WorkerRuntime, req: RunInnerLoopRequest, held: HeldModel, outputs: ExitStack
) -> tuple[Path, str | None] | None:
    """Load the attempt's start point into the model: ``input_parameter_pack``, or the
    eager start point computed here (:func:`fleet.diloco.eager.eager_start_point`,
    into a scratch directory of ``outputs``). Returns the start pack's local path and
    digest (the base of a pseudo-gradient), or None when the model starts as it is."""
    if req.input_parameter_pack is not None:
        pack = req.input_parameter_pack
        local = rt.shared.local_pack(pack.path, pack)
        load_pack_into_held(held, local, req.state_dict_filter, pack)
        return local, pack.values_digest
    if req.eager_start is None:
        return None
    from fleet.diloco.eager import eager_start_point

    scratch = outputs.enter_context(tempfile.TemporaryDirectory(prefix="fleet-start-"))
    local = Path(scratch) / "start"
    manifest = eager_start_point(rt.shared, req.eager_start, local)
    load_pack_into_held(held, local, req.state_dict_filter, PackRef.of("start", manifest))
    return local, manifest.values_digest


def _publish_delta(
    rt: WorkerRuntime,
    req: RunInnerLoopRequest,
    base: tuple[Path, str | None],
    params_path: Path,
    out_path: Path,
    out_rel: str,
    outputs: ExitStack,
) -> tuple[PackRef, PackRef | None, int]:
    """Encode the replica's pseudo-gradient (and residual) from its local parameter pack
    (:func:`fleet.diloco.exchange.publish_pseudo_gradient`) into ``out_path``; the
    pack's ref, the residual's ref and the pack's data bytes."""
    from fleet.diloco.exchange import publish_pseudo_gradient

    spec = req.pseudo_gradient
    assert spec is not None
    base_path, base_digest = base
    source = spec.error_feedback_source
    residual_rel = (
        rt.shared.relative(spec.error_feedback_path) if spec.error_feedback_path else None
    )
    out_residual = outputs.enter_context(rt.shared.output(residual_rel)) if residual_rel else None
    published = publish_pseudo_gradient(
        base_path,
        params_path,
        out_path,
        codec_for(spec.codec, spec.block_size),
        residual=rt.shared.local_pack(source.path, source) if source and residual_rel else None,
        out_residual=out_residual,
        base_digest=base_digest,
    )
    pg = published.pseudo_gradient
    ref = PackRef(
        path=out_rel,
        layout_hash=pg.layout_hash,
        values_digest=pg.values_digest,
        model_schema_hash=pg.model_schema_hash,
        parameter_count=pg.parameter_count,
    )
    residual = None
    if published.residual is not None and residual_rel is not None:
        residual = PackRef.of(residual_rel, published.residual)
    return ref, residual, pg.exchange_bytes


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


def _recorded_result(rt: WorkerRuntime, out_rel: str, key: str) -> RunInnerLoopResult | None:
    """The result a previous run of this very request recorded beside its output pack,
    if that pack is still the one it published."""
    try:
        recorded = json.loads(rt.shared.read_bytes(result_marker(out_rel)))
        if recorded.get("request") != key:
            return None
        result = RunInnerLoopResult.model_validate(recorded["result"])
        published = rt.shared.read_manifest_json(out_rel)
    except (OSError, ValueError, CodecError, StorageError):
        return None
    digest = published.get("values_digest") if isinstance(published, dict) else None
    if result.pack is None or digest != result.pack.values_digest:
        return None
    return result
