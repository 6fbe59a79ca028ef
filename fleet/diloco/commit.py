"""A round's commit: the new driver state and the round's record written in one fenced
transaction (:meth:`~fleet.diloco.state.RunStore.commit`), the leases of replicas not
merged given back to the epoch, the checkpoints that landed in the background taken up,
then what the commit superseded deleted in the background."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fleet.client import Fleet
from fleet.data.leases import give_back
from fleet.diloco.attempts import Attempts
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import RunContext
from fleet.diloco.quorum import Done
from fleet.diloco.state import DriverState, Evaluation, RoundRecord, WireBytes
from fleet.errors import FleetError
from fleet.jobs import JobStore
from fleet.protocol import (
    FullCheckpoint,
    OuterStepRequest,
    OuterStepResult,
    ReplicaCheckpoint,
    ReplicaStart,
)
from fleet.storage import result_marker

log = logging.getLogger("fleet.diloco")


@dataclass(frozen=True)
class Timing:
    """When a round started (unix s, and monotonic s), closed and ended (monotonic s),
    and the seconds its outer step and evaluation took."""

    started_at: float
    started: float
    closed: float
    ended: float
    outer_step_s: float
    eval_s: float


@dataclass(frozen=True)
class Stepped:
    """A round's outer step as it ran: its request, its result and its worker, and the
    bytes the evaluation's worker moved (by worker)."""

    request: OuterStepRequest
    result: OuterStepResult
    worker: str | None
    eval_wire: dict[str, WireBytes]


def commit(
    ctx: RunContext,
    attempts: Attempts,
    done: Done,
    stepped: Stepped,
    evaluation: Evaluation | None,
    timing: Timing,
    deadline_s: float | None,
) -> tuple[RoundRecord, DriverState, list[str]]:
    """Commit the round; its record, the state after it, and the shared-root paths the
    commit superseded (to delete).

    Raises:
        FencedOutError: another orchestrator owns the job now.
    """
    state, plan, cfg = attempts.state, attempts.plan, ctx.config
    merged = [attempts.outcome(a, "merged", result=r) for a, r in done.values()]
    outcomes = sorted(merged + attempts.outcomes, key=lambda o: (o.replica, o.attempt))
    result = stepped.result
    step = stepped.request.step.model_copy(
        update={"global_digest": result.global_digest, "state_digests": result.state_digests}
    )
    wire: dict[str, WireBytes] = {}
    for o in outcomes:
        w = wire.setdefault(o.worker, WireBytes())
        w.sent += o.sent_bytes
        w.received += o.received_bytes
    if stepped.worker is not None:
        w = wire.setdefault(stepped.worker, WireBytes())
        w.sent += result.sent_bytes
        w.received += result.received_bytes
    for name, extra in stepped.eval_wire.items():
        w = wire.setdefault(name, WireBytes())
        w.sent += extra.sent
        w.received += extra.received
    exchange = sum(w.sent + w.received for w in wire.values())
    busiest = max((w.sent + w.received for w in wire.values()), default=0)
    new_state = advance(ctx, attempts, done).model_copy(
        update={
            "global_digest": result.global_digest,
            "state_digests": result.state_digests,
            "steps": [*state.steps, step],
        }
    )
    new_state, garbage = take_up_checkpoints(cfg, ctx.jobs, ctx.store.job_id, new_state, result)
    record = RoundRecord(
        round=attempts.index,
        started_at=timing.started_at,
        closed_at=timing.started_at + (timing.closed - timing.started),
        wall_s=timing.ended - timing.started,
        outer_step_s=timing.outer_step_s,
        eval_s=timing.eval_s,
        outer_step_worker=stepped.worker,
        outer_step_requests=result.store_requests,
        input_digest=state.global_digest,
        step=step,
        parameter_count=result.parameter_count,
        checkpoint=result.checkpoint,
        replicas=outcomes,
        wire=wire,
        exchange_bytes=exchange,
        bytes_per_parameter=busiest / result.parameter_count if result.parameter_count else None,
        eval=evaluation,
        data=new_state.data,
        deadline_s=deadline_s,
    )
    ctx.store.commit(new_state, record)
    ctx.jobs.untrack_task(ctx.store.job_id, *(a.task_id for a in plan.attempts))
    ctx.deadline.observe(record)
    merged_ids = {(o.replica, o.attempt) for o in record.merged}
    for a in plan.attempts:  # attempts not merged: their packs and any checkpoint
        if (a.replica, a.attempt) not in merged_ids:
            garbage += [a.pack_path, result_marker(a.pack_path)]
            garbage += [a.checkpoint_path] if a.checkpoint_path else []
    return record, new_state, garbage


def advance(ctx: RunContext, attempts: Attempts, done: Done) -> DriverState:
    """The state after the round's replicas, all but its outer step: each merged
    replica's last attempt (and the state checkpoint it scheduled, pending until it
    lands), the handles, the data cursor (with the leases of replicas not merged given
    back)."""
    state, plan, config = attempts.state, attempts.plan, ctx.config
    replicas = list(state.replicas)
    pending = list(state.pending_checkpoints) or [None] * config.replicas
    for i, (attempt, _) in done.items():
        replicas[i] = ReplicaStart(
            round=attempts.index, attempt=attempt.attempt, checkpoint=replicas[i].checkpoint
        )
        if attempt.checkpoint_path is not None:
            pending[i] = ReplicaCheckpoint(round=attempts.index, attempt=attempt.attempt)
    data = plan.cursor_after
    if data is not None and plan.leases is not None:
        data = give_back(data, [lease for lease in plan.leases if lease.replica not in done])
    return state.model_copy(
        update={
            "next_round": attempts.index + 1,
            "replicas": replicas,
            "pending_checkpoints": pending,
            "handles": attempts.handles,
            "abandoned": attempts.abandoned,
            "unclaimed_builds": attempts.unclaimed_builds,
            "data": data,
        }
    )


def take_up_checkpoints(
    config: DiLoCoConfig,
    jobs: JobStore,
    job_id: str,
    state: DriverState,
    result: OuterStepResult | None = None,
) -> tuple[DriverState, list[str]]:
    """``state`` with the checkpoints that have landed taken up (the one ``result``
    published and waited for, and those the workers recorded in Redis), at most
    ``keep_checkpoints`` full ones kept with the steps since the oldest; and the
    shared-root paths that became superseded (older checkpoints and the
    pseudo-gradients before the oldest kept one)."""
    landed = jobs.checkpoints(job_id)
    by_round = {c.round: c for c in state.checkpoints}
    for name, value in landed.items():
        if name.startswith("global/"):
            full = FullCheckpoint.model_validate_json(value)
            if full.round <= state.next_round:
                by_round.setdefault(full.round, full)
    if result is not None and result.checkpoint is not None:
        by_round.setdefault(result.checkpoint.round, result.checkpoint)
    ordered = [by_round[r] for r in sorted(by_round)]
    checkpoints = ordered[-config.keep_checkpoints :]
    garbage: list[str] = []
    forget: list[str] = []
    for gone in ordered[: -config.keep_checkpoints]:  # older ones, even if they landed late
        garbage += [gone.global_pack.path, *(p.path for p in gone.state.values())]
        forget.append(f"global/{gone.round}")
    steps = [s for s in state.steps if s.round >= checkpoints[0].round]
    for s in state.steps:
        if s.round < checkpoints[0].round:
            garbage += [p for w in s.replicas for p in (w.pack.path, result_marker(w.pack.path))]
    replicas, pending = list(state.replicas), list(state.pending_checkpoints)
    for i, waiting in enumerate(pending):
        if waiting is None:
            continue
        record = landed.get(f"replica/{i}/{waiting.round}/{waiting.attempt}")
        if record is None:
            continue
        new = ReplicaCheckpoint.model_validate_json(record)
        old = replicas[i].checkpoint
        if old is not None:
            garbage += [
                p for p in (old.optimizer, old.residual.path if old.residual else None) if p
            ]
        replicas[i] = replicas[i].model_copy(update={"checkpoint": new})
        pending[i] = None
        if old is not None:
            forget.append(f"replica/{i}/{old.round}/{old.attempt}")
    jobs.forget_checkpoints(job_id, *forget)
    updated = state.model_copy(
        update={
            "checkpoints": checkpoints,
            "steps": steps,
            "replicas": replicas,
            "pending_checkpoints": pending,
        }
    )
    return updated, garbage


def collect_garbage(fleet: Fleet, paths: list[str]) -> None:
    """Ask any worker to delete ``paths`` (shared-root relative), without waiting."""
    paths = sorted({p for p in paths if p})
    if paths:
        try:
            fleet.submit(
                fleet.prepare("collect_garbage", {"paths": paths}, dict), ignore_result=True
            )
        except FleetError as exc:
            log.warning("garbage collection not sent: %s", exc)
