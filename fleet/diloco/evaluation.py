"""The evaluation of a round's new global model, on the worker that made it (the outer
step's worker holds it: nothing crosses a link), into a replica's warm handle there if
it has one; on any worker otherwise (which catches up to the model first)."""

from __future__ import annotations

import logging
import time

from fleet.diloco.context import RunContext
from fleet.diloco.state import Evaluation, HandleRef, WireBytes
from fleet.errors import CodecError, FleetError
from fleet.protocol import EvaluateGlobalResult, GlobalModelSpec


def is_final(ctx: RunContext, round_index: int, started_at: float) -> bool:
    """True if round ``round_index`` is the run's last: the last of ``rounds``, or the one
    that ends with the run's ``max_wall_s`` spent (``started_at``: when the run started,
    unix s)."""
    cfg = ctx.config
    budget = cfg.max_wall_s
    spent = budget is not None and time.time() - started_at >= budget
    return round_index == cfg.rounds - 1 or spent


def due(ctx: RunContext, round_index: int, started_at: float) -> bool:
    """True if round ``round_index``'s global model is evaluated: every ``eval_every``
    rounds, and the last round (:func:`is_final`), so a run stopped by its budget ends
    on an evaluated model."""
    cfg = ctx.config
    last = is_final(ctx, round_index, started_at)
    return bool(cfg.eval_every) and (not (round_index + 1) % cfg.eval_every or last)


def evaluate_global(
    ctx: RunContext, spec: GlobalModelSpec, worker: str | None, handles: list[HandleRef | None]
) -> tuple[Evaluation, float, dict[str, WireBytes]]:
    """Evaluate the global model ``spec`` on ``worker`` (the outer step's, which holds
    it), into a handle it holds if any; else on any worker. Returns the evaluation, its
    seconds, and the bytes its worker moved (by worker).

    Raises:
        CodecError: a pack it needs is corrupt.
        FleetError: no worker could evaluate it.
    """
    cfg, fleet = ctx.config, ctx.fleet
    started = time.monotonic()
    alive = {w.name for w in fleet.workers()}
    tries: list[tuple[str | None, str | None]] = []
    if worker is not None and worker in alive:
        held = next((h.model_id for h in handles if h is not None and h.worker == worker), None)
        tries.append((worker, held))
    tries.append((None, None))
    last: FleetError | None = None
    for target, model_id in tries:
        fields = {
            "run": ctx.store.job_id,
            "global_model": spec.model_dump(mode="json"),
            "split": cfg.eval_split,
            "model_id": model_id,
            "device": cfg.device,
        }
        call = fleet.prepare(
            "evaluate_global",
            fields,
            EvaluateGlobalResult.model_validate,
            worker=target,
            workload=cfg.workload,
            config=cfg.config,
        )
        future = fleet.submit(call)
        try:
            result = future.result(cfg.replica_call_timeout_s)
        except FleetError as exc:
            if isinstance(exc, CodecError):
                raise
            ctx.log("evaluation on %s failed: %s", target or "the pool", exc, level=logging.WARNING)
            last = exc
            continue
        ran_on = future.worker or target or "?"
        evaluation = Evaluation(at=time.time(), worker=ran_on, metrics=result.metrics)
        wire = {ran_on: WireBytes(sent=result.sent_bytes, received=result.received_bytes)}
        return evaluation, time.monotonic() - started, wire
    assert last is not None
    raise last
