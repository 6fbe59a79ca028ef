"""Protocol methods that train and measure: train_window, evaluate, run_inner_loop.

``train_window`` and ``run_inner_loop`` are long tasks: they publish progress and stop
between steps when aborted or past their deadline (:mod:`fleet.progress`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fleet import progress
from fleet.errors import DeadlineExceeded, MetricValueError, StepBudgetError
from fleet.protocol import (
    EvaluateRequest,
    MetricsResult,
    RunInnerLoopRequest,
    RunInnerLoopResult,
    TrainWindowRequest,
    WorkloadRef,
)
from fleet.runtime import HeldModel, WorkerRuntime
from fleet.storage import temp_sibling
from fleet.tasks.base import protocol_task
from fleet.tasks.models import load_pack_into_held, publish_state_pack

log = logging.getLogger("fleet.train")

#: fleet's inner loop logs a progress line every this many steps.
LOG_EVERY_STEPS = 10

#: ``inner_optimizer_state_encoding`` of the optimizer state fleet's own loop writes.
TORCH_OPTIMIZER_STATE = "torch-optimizer-state-dict-v1"


def check_metrics(hook: str, metrics: object) -> dict[str, bool | int | float | str]:
    """Metric values must be bool, int, float or str (PROTOCOL.md section 2).

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


@protocol_task("train_window", TrainWindowRequest, long=True)
def train_window(
    rt: WorkerRuntime, req: TrainWindowRequest, ref: WorkloadRef | None
) -> MetricsResult:
    """Run the workload's ``train_window(state, batches)`` on a held model."""
    held = rt.held(req.model_id)
    batches = [b.model_dump(mode="json") for b in req.batches]
    metrics = check_metrics("train_window", held.workload.call("train_window", held.state, batches))
    rt.registry.touch(req.model_id, bump_generation=True)
    monitor = progress.current()
    if monitor is not None:
        monitor.step(1, loss=_loss(metrics), examples=_examples(metrics), force=True)
    return MetricsResult(metrics=metrics)


@protocol_task("evaluate", EvaluateRequest)
def evaluate(rt: WorkerRuntime, req: EvaluateRequest, ref: WorkloadRef | None) -> MetricsResult:
    """Run the workload's ``evaluate(state, split)`` on a held model."""
    held = rt.held(req.model_id)
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
    held: HeldModel, req: RunInnerLoopRequest, opt_path: Path | None
) -> dict[str, Any]:
    """fleet's inner loop for workloads without a ``run_inner_loop`` hook: one
    ``train_window(state, [batch])`` per step, cycling through ``batches`` (or ``[]``,
    letting the workload draw its own data), reporting progress between steps. An
    optimizer at ``state["optimizer"]`` is restored from / saved to ``opt_path``."""
    optimizer = _optimizer_of(held.state)
    if optimizer is not None and opt_path is not None and opt_path.exists():
        optimizer.load_state_dict(torch.load(opt_path, weights_only=True))
    batches = [b.model_dump(mode="json") for b in req.batches]
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
        opt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(opt_path)
        torch.save(optimizer.state_dict(), tmp)
        os.replace(tmp, opt_path)
        out["inner_optimizer_state_path"] = str(opt_path)
        out["inner_optimizer_state_encoding"] = TORCH_OPTIMIZER_STATE
    return out


@protocol_task("run_inner_loop", RunInnerLoopRequest, long=True)
def run_inner_loop(
    rt: WorkerRuntime, req: RunInnerLoopRequest, ref: WorkloadRef | None
) -> RunInnerLoopResult:
    """Run ``num_inner_steps`` steps on a held model and publish the result as a pack at
    ``output_parameter_pack_path`` (PROTOCOL.md section 2).

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
    held = rt.held(req.model_id)
    started_at = time.time()
    started = time.perf_counter()
    if req.input_parameter_pack_path is not None:
        load_pack_into_held(
            held, rt.shared.resolve(req.input_parameter_pack_path), req.state_dict_filter
        )
    loaded = time.perf_counter()
    out_path = rt.shared.resolve(req.output_parameter_pack_path)
    opt_path = (
        rt.shared.resolve(req.inner_optimizer_state_path)
        if req.inner_optimizer_state_path
        else None
    )
    stamp = _pack_stamp(out_path)
    if held.workload.has("run_inner_loop"):
        params = req.model_dump(mode="json", by_alias=True)
        params["output_parameter_pack_path"] = str(out_path)
        params["inner_optimizer_state_path"] = str(opt_path) if opt_path else None
        result = held.workload.call("run_inner_loop", held.state, params) or {}
        if result.get("state") is not None:
            held.state = result["state"]
    else:
        result = _fleet_inner_loop(held, req, opt_path)
    computed = time.perf_counter()
    steps = int(result.get("steps_completed", req.num_inner_steps))
    if req.require_exact_steps and steps != req.num_inner_steps:
        raise StepBudgetError(steps, req.num_inner_steps)
    if _pack_stamp(out_path) in (None, stamp):
        publish_state_pack(
            held.workload, held.state, out_path, req.model_schema_hash, req.state_dict_filter
        )
    pack = rt.shared.pack_ref(out_path)
    published = time.perf_counter()
    rt.registry.touch(req.model_id, bump_generation=True)
    rt.registry.publish_pack(req.model_id, pack)
    opt_out = result.get("inner_optimizer_state_path")
    return RunInnerLoopResult(
        steps_completed=steps,
        metrics=check_metrics("run_inner_loop", result.get("metrics")),
        inner_optimizer_state_path=rt.shared.relative(opt_out) if opt_out else None,
        inner_optimizer_state_encoding=result.get("inner_optimizer_state_encoding"),
        pack=pack,
        load_s=loaded - started,
        compute_s=computed - loaded,
        publish_s=published - computed,
        started_at=started_at,
        finished_at=started_at + (published - started),
    )
