"""An inner loop on a held model, the one home of it (docs/protocol.md section 2,
``run_inner_loop``): the workload's ``run_inner_loop`` hook if it has one, else fleet's
own loop of ``train_window`` steps; both timed where the steps happen. Used by the
``run_inner_loop`` task and by a DiLoCo replica's round (:mod:`fleet.diloco.replica`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fleet import progress
from fleet.errors import DeadlineExceeded, MetricValueError, StepBudgetError
from fleet.runtime import HeldModel
from fleet.torch_state import INNER_STATE_ENCODING, load_inner_state, save_inner_state

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


def metric_loss(metrics: dict[str, Any]) -> float | None:
    """The ``loss`` metric as a float, if it is a number."""
    value = metrics.get("loss")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def metric_examples(metrics: dict[str, Any]) -> int:
    """The examples a step saw (``examples``, ``samples`` or ``batch_size``; 0 if none)."""
    for key in ("examples", "samples", "batch_size"):
        value = metrics.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _optimizer_of(state: Any) -> torch.optim.Optimizer | None:
    optimizer = state.get("optimizer") if isinstance(state, dict) else None
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def fleet_loop(
    held: HeldModel,
    num_inner_steps: int,
    require_exact_steps: bool,
    batches: list[dict[str, Any]],
    opt_path: Path | None,
) -> dict[str, Any]:
    """fleet's inner loop for workloads without a ``run_inner_loop`` hook: one
    ``train_window(state, [batch])`` per step, cycling through ``batches`` (or ``[]``,
    letting the workload draw its own data), reporting progress between steps. An
    optimizer at ``state["optimizer"]`` (and a scheduler at ``state["scheduler"]``) is
    restored from ``opt_path`` if the file exists and saved there after the steps."""
    optimizer = _optimizer_of(held.state)
    scheduler = held.state.get("scheduler") if isinstance(held.state, dict) else None
    if optimizer is not None and opt_path is not None and opt_path.exists():
        load_inner_state(optimizer, scheduler, opt_path)
    metrics: dict[str, Any] = {}
    losses: list[float] = []
    steps = 0
    try:
        for step in range(num_inner_steps):
            window = [batches[step % len(batches)]] if batches else []
            metrics = check_metrics(
                "train_window", held.workload.call("train_window", held.state, window)
            )
            loss = metric_loss(metrics)
            if loss is not None and math.isfinite(loss):
                losses.append(loss)
            steps = step + 1
            if steps % LOG_EVERY_STEPS == 0 or steps == num_inner_steps:
                log.info("step %d/%d loss %s", steps, num_inner_steps, loss)
            progress.report(steps, loss=loss, examples=metric_examples(metrics))
    except DeadlineExceeded:
        if require_exact_steps:
            raise
    out: dict[str, Any] = {"steps_completed": steps, "metrics": dict(metrics)}
    if losses:
        out["metrics"]["mean_loss"] = sum(losses) / len(losses)
    if optimizer is not None and opt_path is not None:
        save_inner_state(optimizer, scheduler, opt_path)
        out["inner_optimizer_state_path"] = str(opt_path)
        out["inner_optimizer_state_encoding"] = INNER_STATE_ENCODING
    return out


@dataclass(frozen=True)
class LoopOutcome:
    """An inner loop's result (the hook's dict, with ``steps_completed`` filled in), its
    checked metrics, and where its time went (seconds): ``compute_s`` from the loop's
    start to its last reported step (all of it when it reports none), ``save_s`` after
    that (the loop's own saves)."""

    result: dict[str, Any]
    steps: int
    metrics: dict[str, bool | int | float | str]
    compute_s: float
    save_s: float


def run_loop(
    held: HeldModel,
    params: dict[str, Any],
    batches: list[dict[str, Any]],
    opt_path: Path | None,
) -> LoopOutcome:
    """Run the inner loop on ``held``: the workload's ``run_inner_loop(state, params)``
    hook (``params`` as the protocol gives it, with local paths), or :func:`fleet_loop`.
    A state the hook returns replaces the held one.

    Raises:
        StepBudgetError: ``params["require_exact_steps"]`` and another step count.
        DeadlineExceeded: past the deadline with ``require_exact_steps``.
        TaskAborted: asked to abort.
        MetricValueError: a metric of another type than bool, int, float or str.
    """
    steps_wanted = int(params["num_inner_steps"])
    exact = bool(params.get("require_exact_steps", False))
    started = time.monotonic()
    if held.workload.has("run_inner_loop"):
        result = held.workload.call("run_inner_loop", held.state, params) or {}
        if result.get("state") is not None:
            held.state = result["state"]
    else:
        result = fleet_loop(held, steps_wanted, exact, batches, opt_path)
    ended = time.monotonic()
    monitor = progress.current()
    last = monitor.last_step_at if monitor is not None else None
    last = ended if last is None or last < started else last
    steps = int(result.get("steps_completed", steps_wanted))
    if exact and steps != steps_wanted:
        raise StepBudgetError(steps, steps_wanted)
    return LoopOutcome(
        result=result,
        steps=steps,
        metrics=check_metrics("run_inner_loop", result.get("metrics")),
        compute_s=last - started,
        save_s=ended - last,
    )


__all__ = [
    "LOG_EVERY_STEPS",
    "LoopOutcome",
    "check_metrics",
    "fleet_loop",
    "metric_examples",
    "metric_loss",
    "run_loop",
]
