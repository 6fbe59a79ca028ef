"""A round's commit: the new driver state and the round's record written in one fenced
transaction (:meth:`~fleet.diloco.state.RunStore.commit`), the leases of replicas not
merged given back to the epoch, then the packs the commit superseded deleted in the
background."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fleet.client import Fleet
from fleet.data.leases import give_back
from fleet.diloco.attempts import Attempts
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import RunContext
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.quorum import Done
from fleet.diloco.state import DriverState, Evaluation, OptState, RoundRecord
from fleet.errors import FleetError
from fleet.protocol import OuterStepResult
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
    merge_s: float
    eval_s: float


def commit(
    ctx: RunContext,
    attempts: Attempts,
    done: Done,
    result: OuterStepResult,
    merged_on: str | None,
    evaluation: Evaluation | None,
    timing: Timing,
    deadline_s: float | None,
) -> tuple[RoundRecord, DriverState]:
    """Commit the round; its record and the state after it.

    Raises:
        FencedOutError: another orchestrator owns the job now.
    """
    state, plan = attempts.state, attempts.plan
    merged = [attempts.outcome(a, "merged", result=r) for a, r in done.values()]
    outcomes = sorted(merged + attempts.outcomes, key=lambda o: (o.replica, o.attempt))
    new_state = advance(ctx.config, attempts, done).model_copy(
        update={
            "global_pack": result.global_pack,
            "outer_state": result.state,
            "prediction": result.prediction,
        }
    )
    data = new_state.data
    record = RoundRecord(
        round=attempts.index,
        started_at=timing.started_at,
        closed_at=timing.started_at + (timing.closed - timing.started),
        wall_s=timing.ended - timing.started,
        merge_s=timing.merge_s,
        eval_s=timing.eval_s,
        merge_worker=merged_on,
        input_global=state.global_pack,
        input_state=state.outer_state,
        global_pack=result.global_pack,
        outer_state=result.state,
        replicas=outcomes,
        eval=evaluation,
        data=data,
        exchange_bytes=sum(o.exchange_bytes or 0 for o in merged),
        deadline_s=deadline_s,
    )
    ctx.store.commit(new_state, record)
    ctx.jobs.untrack_task(ctx.store.job_id, *(a.task_id for a in plan.attempts))
    ctx.deadline.observe(record)
    return record, new_state


def advance(config: DiLoCoConfig, attempts: Attempts, done: Done) -> DriverState:
    """The state after the round's replicas, all but its outer step's outputs (the
    global pack, buffers and prediction stay those entering the round): each merged
    replica's optimizer state and residual, the handles, the data cursor (with the
    leases of replicas not merged given back). An overlapped run launches the next
    round from it before the outer step is done (:mod:`fleet.diloco.pipeline`)."""
    state, plan = attempts.state, attempts.plan
    replica_opt = list(state.replica_opt)
    residuals = list(state.replica_residual) or [None] * config.replicas
    for i, (_, res) in done.items():
        path = res.inner_optimizer_state_path
        replica_opt[i] = (
            OptState(path=path, encoding=res.inner_optimizer_state_encoding) if path else None
        )
        residuals[i] = res.error_feedback
    data = plan.cursor_after
    if data is not None and plan.leases is not None:
        data = give_back(data, [lease for lease in plan.leases if lease.replica not in done])
    return state.model_copy(
        update={
            "next_round": attempts.index + 1,
            "replica_opt": replica_opt,
            "replica_residual": residuals,
            "handles": attempts.handles,
            "abandoned": attempts.abandoned,
            "data": data,
        }
    )


def superseded(
    ctx: RunContext,
    attempts: Attempts,
    record: RoundRecord,
    state: DriverState,
    previous: RoundRecord | None,
    earlier: RoundRecord | None = None,
) -> list[str]:
    """What the commit of ``record`` (giving ``state``) superseded: the attempts that
    were not merged, the last round's optimizer states and residuals no longer
    committed, its replica packs (an overlapped run: those of the round before it,
    ``earlier``, and the last round's predictions: the last outer step's inputs are
    kept until the next commit, to recompute a corrupt checkpoint), and global packs
    and outer buffers older than ``keep_rounds`` (not checkpoints)."""
    layout, cfg = ctx.layout, ctx.config
    merged = {(o.replica, o.attempt) for o in record.merged}
    kept = {o.path for o in state.replica_opt if o is not None}
    kept |= {r.path for r in state.replica_residual if r is not None}
    paths: list[str | None] = []
    for a in attempts.plan.attempts:
        if (a.replica, a.attempt) not in merged:
            paths += [a.pack_path, result_marker(a.pack_path), a.opt_path, a.residual_path]
        elif a.opt_path not in kept:  # the loop kept no optimizer file
            paths.append(a.opt_path)
    if previous is not None:
        for o in previous.merged:
            paths += [p.path for p in (o.opt_state, o.residual) if p and p.path not in kept]
    retired = earlier if cfg.overlap else previous
    paths += replica_packs(retired)
    if cfg.overlap and previous is not None:
        paths += predictions(previous)
    old = attempts.index + 1 - cfg.keep_rounds
    if old >= 0 and not is_checkpoint(cfg, old):
        paths.append(layout.global_pack(old))
        paths += [layout.outer_buffer(old, name) for name in outer_optimizer(cfg.outer).buffers]
    return [p for p in paths if p]


def replica_packs(record: RoundRecord | None) -> list[str]:
    """The merged replicas' packs of ``record`` and their result markers."""
    if record is None:
        return []
    packs = [o.pack.path for o in record.merged if o.pack is not None]
    return packs + [result_marker(p) for p in packs]


def predictions(record: RoundRecord | None) -> list[str]:
    """The predictions ``record``'s merged replicas started from (overlapped rounds;
    never a global pack, which a start falls back to before any outer step ran)."""
    if record is None:
        return []
    return sorted(
        {
            o.start.prediction.path
            for o in record.merged
            if o.start is not None and o.start.prediction.path.endswith("/prediction")
        }
    )


def is_checkpoint(config: DiLoCoConfig, round_index: int) -> bool:
    """True if the global pack entering ``round_index`` is kept as a checkpoint."""
    return bool(config.checkpoint_every) and round_index % config.checkpoint_every == 0


def collect_garbage(fleet: Fleet, paths: list[str]) -> None:
    """Ask any worker to delete ``paths`` (shared-root relative), without waiting."""
    paths = sorted(set(paths))
    if paths:
        try:
            fleet.submit(
                fleet.prepare("collect_garbage", {"paths": paths}, dict), ignore_result=True
            )
        except FleetError as exc:
            log.warning("garbage collection not sent: %s", exc)
