"""The evaluation of a round's new global model, on a worker: into a replica's warm
handle when one is alive (loading the pack there), else on a handle imported for it."""

from __future__ import annotations

import contextlib
import logging
import time

from fleet.diloco.context import RunContext
from fleet.diloco.state import Evaluation, HandleRef
from fleet.errors import CodecError, FleetError
from fleet.storage import PackRef


def due(ctx: RunContext, round_index: int, started_at: float) -> bool:
    """True if round ``round_index``'s global model is evaluated: every ``eval_every``
    rounds, and the last round, which is also the one that ends with the run's
    ``max_wall_s`` spent (``started_at``: when the run started, unix s), so a run
    stopped by its budget ends on an evaluated model."""
    cfg = ctx.config
    last = round_index == cfg.rounds - 1
    budget = cfg.max_wall_s
    if budget is not None and time.time() - started_at >= budget:
        last = True
    return bool(cfg.eval_every) and (not (round_index + 1) % cfg.eval_every or last)


def evaluate_global(
    ctx: RunContext, global_pack: PackRef, handles: list[HandleRef | None]
) -> tuple[Evaluation, float]:
    """Evaluate ``global_pack`` on the first alive handle of ``handles``, else on a new
    one; the evaluation and its seconds.

    Raises:
        CodecError: the pack is corrupt.
        FleetError: no worker could evaluate it.
    """
    cfg, fleet = ctx.config, ctx.fleet
    timeout = cfg.replica_call_timeout_s
    started = time.monotonic()
    alive = {w.name for w in fleet.workers()}
    for handle in handles:
        if handle is None or handle.worker not in alive:
            continue
        try:
            fleet.load_parameter_pack(handle.model_id, global_pack, timeout_s=timeout)
            metrics = fleet.evaluate(handle.model_id, cfg.eval_split, timeout_s=timeout)
            evaluation = Evaluation(at=time.time(), worker=handle.worker, metrics=metrics)
            return evaluation, time.monotonic() - started
        except FleetError as exc:
            if isinstance(exc, CodecError):
                raise
            ctx.log("evaluation on %s failed: %s", handle.worker, exc, level=logging.WARNING)
    imported = fleet.import_parameter_pack(
        global_pack, cfg.device, workload=cfg.workload, config=cfg.config, timeout_s=timeout
    )
    try:
        metrics = fleet.evaluate(imported, cfg.eval_split, timeout_s=timeout)
        evaluation = Evaluation(at=time.time(), worker=imported.worker, metrics=metrics)
        return evaluation, time.monotonic() - started
    finally:
        with contextlib.suppress(FleetError):
            fleet.release_model(imported.model_id, timeout_s=30)
