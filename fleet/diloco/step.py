"""The orchestrator's side of DiLoCo's outer step (docs/protocol.md section 5.7): the one
place its request is built (:func:`round_step`), its run on a worker
(:func:`run_outer_step`: the worker whose replica finished first, which then holds the
new global model; again on the pool if that worker dies: the same inputs give the same
bits anywhere), the pseudo-gradients it refuses dropped like lost replicas
(:func:`step_round`), and the check of the newest full checkpoint before a resume
(:func:`verify_checkpoint`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fleet.diloco.attempts import Attempts
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import RunContext
from fleet.diloco.layout import names_pack
from fleet.diloco.placement import outer_step_worker
from fleet.diloco.quorum import Done
from fleet.diloco.state import DriverState
from fleet.errors import CodecError, CorruptCheckpointError, RoundFailed, StorageError
from fleet.protocol import (
    GlobalModelSpec,
    OuterStepRequest,
    OuterStepResult,
    OuterStepSpec,
    PublishGlobalResult,
    WeightedPack,
    candidate_weight,
)
from fleet.storage import PackRef


def outer_step_spec(
    config: DiLoCoConfig, round_index: int, replicas: Sequence[tuple[PackRef, int]]
) -> OuterStepSpec:
    """The outer step of round ``round_index`` over the merged replicas' pseudo-gradients
    and completed steps (each weighted by the merge policy), not yet computed."""
    return OuterStepSpec(
        round=round_index,
        replicas=[
            WeightedPack(pack=pack, weight=candidate_weight(config.merge_policy, float(steps), 1.0))
            for pack, steps in replicas
        ],
        outer=config.outer,
        merge_policy=config.merge_policy,  # type: ignore[arg-type]
    )


def round_step(ctx: RunContext, attempts: Attempts, done: Done, *, final: bool) -> OuterStepRequest:
    """The outer step of ``attempts``' round over the attempts in ``done``, from the
    global model that entered it; a full checkpoint of its result is published every
    ``checkpoint_every`` rounds in the background, and after the ``final`` round with
    the step waiting for it."""
    cfg, index = ctx.config, attempts.index
    step = outer_step_spec(
        cfg, index, [(done[i][1].pack, done[i][1].steps_completed) for i in sorted(done)]
    )
    due = final or (index + 1) % cfg.checkpoint_every == 0
    return OuterStepRequest(
        run=ctx.store.job_id,
        global_model=attempts.state.global_model(),
        step=step,
        chunk_bytes=cfg.outer_step_chunk_bytes,
        checkpoint_path=ctx.layout.checkpoint(index + 1) if due else None,
        checkpoint_wait=final,
    )


def run_outer_step(
    ctx: RunContext, request: OuterStepRequest, worker: str | None
) -> tuple[OuterStepResult, str | None]:
    """Run the outer step on ``worker`` (None: the pool queue); if that worker dies, on
    the pool queue. Returns the result and the worker that ran it."""
    while True:
        call = ctx.fleet.prepare(
            "outer_step", request, OuterStepResult.model_validate, worker=worker
        )
        future = ctx.fleet.submit(call)
        for liveness in ctx.poll():
            if future.ready():
                return future.result(timeout_s=60), future.worker or worker
            if worker is not None and liveness.lost(worker):
                ctx.log(
                    "the outer step's worker %s was lost; running it again on the pool",
                    worker,
                    level=logging.WARNING,
                )
                ctx.fleet.registry.request_abort(future.task_id)
                break
        worker = None


def step_round(
    ctx: RunContext, attempts: Attempts, done: Done, *, final: bool
) -> tuple[OuterStepRequest, OuterStepResult, float, str | None]:
    """The round's outer step over the attempts in ``done`` (dropping, from ``done``, any
    whose pseudo-gradient it refuses). Returns the request, the result, its seconds
    and its worker.

    Raises:
        RoundFailed: every pseudo-gradient was refused.
    """
    started = time.monotonic()
    while done:
        order = sorted(done)
        request = round_step(ctx, attempts, done, final=final)
        worker = outer_step_worker(attempts.finished, [w.name for w in ctx.fleet.workers()])
        try:
            result, worker = run_outer_step(ctx, request, worker)
            return request, result, time.monotonic() - started, worker
        except (CodecError, StorageError) as exc:
            path = str(getattr(exc, "path", "") or "")
            bad = [i for i in order if names_pack(path, done[i][0].pack_path)]
            if not bad:
                raise
            for i in bad:
                attempt, _ = done.pop(i)
                attempts.outcomes.append(
                    attempts.outcome(attempt, "dropped", error=f"{type(exc).__name__}: {exc}")
                )
                ctx.log(
                    "replica %d: its pseudo-gradient was refused by the outer step (%s); dropped",
                    i,
                    exc,
                    level=logging.WARNING,
                )
    raise RoundFailed(attempts.index, ["every pseudo-gradient was refused by the outer step"])


def verify_checkpoint(ctx: RunContext, state: DriverState) -> None:
    """Before resuming, check the newest full checkpoint (digest, length, finite values)
    on a worker; a corrupt one is rebuilt from the checkpoint before it and the steps
    since (the same bits, checked by digest) and published again, or the job fails
    naming the round.

    Raises:
        CorruptCheckpointError: corrupt, and it cannot be rebuilt.
    """
    checkpoint = state.checkpoint
    try:
        for pack in [checkpoint.global_pack, *checkpoint.state.values()]:
            fields = {"pack": pack.model_dump(), "check_finite": True}
            ctx.fleet.run(ctx.fleet.prepare("verify_pack", fields, dict), True, None)
        return
    except CodecError as exc:
        bad = exc
    ctx.log(
        "round %d's checkpoint is corrupt (%s); rebuilding it",
        checkpoint.round,
        bad,
        level=logging.WARNING,
    )
    if len(state.checkpoints) < 2:
        raise CorruptCheckpointError(
            ctx.store.job_id, checkpoint.round, checkpoint.global_pack.path, str(bad)
        )
    spec = state.model_at(checkpoint.round, state.checkpoints[-2])
    try:
        result = rebuild(ctx, spec, checkpoint.global_pack.path)
    except CodecError as exc:
        raise CorruptCheckpointError(
            ctx.store.job_id,
            checkpoint.round,
            checkpoint.global_pack.path,
            f"{bad}; rebuilding it: {exc}",
        ) from exc
    if result.checkpoint != checkpoint:
        raise CorruptCheckpointError(
            ctx.store.job_id,
            checkpoint.round,
            checkpoint.global_pack.path,
            "the rebuilt packs differ from the committed ones",
        )
    ctx.log("round %d's checkpoint rebuilt: the same bits", checkpoint.round)


def rebuild(ctx: RunContext, spec: GlobalModelSpec, path: str) -> PublishGlobalResult:
    """Have a worker reach the global model ``spec`` (catching up as needed) and publish
    it in full at ``path``.

    Raises:
        CodecError: a pack it needs is corrupt.
    """
    fields = {"run": ctx.store.job_id, "global_model": spec.model_dump(mode="json"), "path": path}
    call = ctx.fleet.prepare("publish_global", fields, PublishGlobalResult.model_validate)
    return ctx.fleet.run(call, True, None)
