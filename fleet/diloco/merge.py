"""The orchestrator's side of DiLoCo's outer step: the one place its request is built
(:func:`outer_step_request`), and its run on a worker (:func:`run_outer_step`: the
worker whose replica finished first, else the pool; again on the pool if that worker
dies, which publishes the same bits, as the outputs' paths and inputs are fixed). A
replica pack the step refuses (corrupt, non-finite) is dropped like a lost replica and
the step runs again without it (:func:`merge`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fleet.diloco.attempts import Attempts
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import RunContext
from fleet.diloco.layout import RunLayout
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.placement import merge_worker
from fleet.diloco.quorum import Done
from fleet.diloco.state import DriverState, RoundRecord
from fleet.errors import (
    CodecError,
    CorruptCheckpointError,
    ProtocolError,
    RoundFailed,
    StorageError,
)
from fleet.protocol import (
    EagerStart,
    OuterStepRequest,
    OuterStepResult,
    RunInnerLoopResult,
    WeightedPack,
    candidate_weight,
)
from fleet.storage import PackRef


def outer_step_request(
    config: DiLoCoConfig,
    layout: RunLayout,
    round_index: int,
    global_pack: PackRef,
    replicas: Sequence[tuple[PackRef, int, EagerStart | None]],
    state: dict[str, PackRef],
) -> OuterStepRequest:
    """The outer step of round ``round_index``: the global pack that entered it, the
    merged replicas' packs with their completed steps (and, in an overlapped round, the
    eager start point each trained from), the optimizer's buffers after
    the last round; it publishes round ``round_index + 1``'s global pack and buffers
    (and, in an overlapped run, the eager prediction of round ``round_index + 2``)."""
    buffers = outer_optimizer(config.outer).buffers
    return OuterStepRequest(
        global_pack=global_pack,
        replicas=[
            WeightedPack(
                pack=pack,
                weight=candidate_weight(config.merge_policy, float(steps), 1.0),
                start=start,
            )
            for pack, steps, start in replicas
        ],
        state={name: pack for name, pack in state.items() if name in buffers},
        outer=config.outer,
        merge_policy=config.merge_policy,  # type: ignore[arg-type]
        output_global_path=layout.global_pack(round_index + 1),
        output_state_paths={name: layout.outer_buffer(round_index + 1, name) for name in buffers},
        chunk_bytes=config.merge_chunk_bytes,
        output_prediction_path=layout.prediction(round_index + 2) if config.overlap else None,
    )


def round_request(ctx: RunContext, attempts: Attempts, done: Done) -> OuterStepRequest:
    """The outer step of ``attempts``' round over the attempts in ``done``, from the
    state that entered it (:func:`outer_step_request`)."""
    state = attempts.state
    return outer_step_request(
        ctx.config,
        ctx.layout,
        attempts.index,
        state.global_pack,
        [
            (_pack_of(done[i][1]), done[i][1].steps_completed, done[i][0].start)
            for i in sorted(done)
        ],
        state.outer_state,
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


def merge(
    ctx: RunContext, attempts: Attempts, done: Done
) -> tuple[OuterStepResult, float, str | None]:
    """The round's outer step over the attempts in ``done`` (dropping, from ``done``, any
    whose pack it refuses). Returns the result, its seconds and its worker.

    Raises:
        RoundFailed: every replica pack was refused.
    """
    started = time.monotonic()
    while done:
        order = sorted(done)
        request = round_request(ctx, attempts, done)
        worker = merge_worker(attempts.finished, [w.name for w in ctx.fleet.workers()])
        try:
            result, worker = run_outer_step(ctx, request, worker)
            return result, time.monotonic() - started, worker
        except (CodecError, StorageError) as exc:
            path = str(getattr(exc, "path", "") or "")
            bad = [i for i in order if _names(path, done[i][0].pack_path)]
            if not bad:
                raise
            for i in bad:
                attempt, _ = done.pop(i)
                attempts.outcomes.append(
                    attempts.outcome(attempt, "dropped", error=f"{type(exc).__name__}: {exc}")
                )
                ctx.log(
                    "replica %d: its pack was refused by the outer step (%s); dropped",
                    i,
                    exc,
                    level=logging.WARNING,
                )
    raise RoundFailed(attempts.index, ["every replica pack was refused by the outer step"])


def verify_checkpoint(ctx: RunContext, state: DriverState, records: list[RoundRecord]) -> None:
    """Before resuming, check the committed global pack and outer buffers (digest,
    length, finite values) on a worker; a corrupt one is recomputed from its round's
    inputs (the outer step again: the same bits), or the job fails naming the round.

    ``records`` are the run's committed rounds.

    Raises:
        CorruptCheckpointError: corrupt, and its inputs are not intact either.
    """
    packs = [state.global_pack, *state.outer_state.values()]
    packs += [state.prediction] if state.prediction is not None else []
    try:
        for pack in packs:
            fields = {"pack": pack.model_dump(), "check_finite": True}
            ctx.fleet.run(ctx.fleet.prepare("verify_pack", fields, dict), True, None)
        return
    except CodecError as exc:
        bad = exc
    round_index = state.next_round
    ctx.log(
        "round %d's checkpoint is corrupt (%s); recomputing it",
        round_index,
        bad,
        level=logging.WARNING,
    )
    last = records[-1] if records else None
    if last is None or last.input_global is None:
        raise CorruptCheckpointError(
            ctx.store.job_id, round_index, state.global_pack.path, str(bad)
        )
    request = outer_step_request(
        ctx.config,
        ctx.layout,
        last.round,
        last.input_global,
        [(r.pack, r.steps_completed or 0, r.start) for r in last.merged if r.pack is not None],
        last.input_state,
    )
    try:
        result, _ = run_outer_step(ctx, request, None)
    except CodecError as exc:
        raise CorruptCheckpointError(
            ctx.store.job_id, round_index, state.global_pack.path, f"{bad}; its inputs: {exc}"
        ) from exc
    if result.global_pack != last.global_pack or result.state != last.outer_state:
        raise CorruptCheckpointError(
            ctx.store.job_id,
            round_index,
            state.global_pack.path,
            "the recomputed packs differ from the committed ones",
        )
    ctx.log("round %d's checkpoint recomputed: the same bits", round_index)


def _pack_of(result: RunInnerLoopResult) -> PackRef:
    if result.pack is None:
        raise ProtocolError("run_inner_loop returned no pack")
    return result.pack


def _names(error_path: str, pack_path: str) -> bool:
    """True if an error's path (as the worker saw it) is the pack ``pack_path`` or one of
    its files."""
    path = error_path.rstrip("/")
    return (
        path == pack_path
        or path.endswith("/" + pack_path)
        or path.startswith(pack_path + "/")
        or f"/{pack_path}/" in path
    )
