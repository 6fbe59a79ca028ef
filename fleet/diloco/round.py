"""One DiLoCo round, from its parts: place the replicas and launch their attempts
(:mod:`~fleet.diloco.attempts`), wait for a quorum (:mod:`~fleet.diloco.quorum`), run
the outer step (:mod:`~fleet.diloco.merge`), evaluate the new global model
(:mod:`~fleet.diloco.evaluation`), commit (:mod:`~fleet.diloco.commit`) and delete what
the commit superseded.
"""

from __future__ import annotations

import time

from fleet.diloco.attempts import Attempts
from fleet.diloco.commit import Timing, collect_garbage, commit, superseded
from fleet.diloco.context import RunContext
from fleet.diloco.evaluation import due, evaluate_global
from fleet.diloco.merge import merge
from fleet.diloco.placement import place_replicas
from fleet.diloco.quorum import Done, QuorumWait
from fleet.diloco.state import DriverState, RoundPlan, RoundRecord
from fleet.protocol import OuterStepResult


class Round:
    """Round ``index`` of a run, from ``state`` (and the plan of a previous owner, if it
    left this round in flight)."""

    def __init__(
        self,
        ctx: RunContext,
        state: DriverState,
        index: int,
        plan: RoundPlan | None,
        previous: RoundRecord | None,
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.previous = previous
        self.earlier: RoundRecord | None = None
        """The round before ``previous`` (an overlapped run deletes its replica packs)."""
        self.attempts = Attempts(ctx, state, index, plan)
        self.started = self.closed = time.monotonic()
        self.started_at = time.time()
        self.quorum: QuorumWait

    def run(self) -> tuple[RoundRecord, DriverState]:
        """Run the round to its commit; the round's record and the state after it.

        Raises:
            JobCancelled: the job was cancelled (running replicas are aborted).
            FencedOutError: another orchestrator took the job over.
            RoundFailed: no replica could be merged.
            DatasetError: the data cannot be read as it is.
        """
        self.launch()
        done = self.wait()
        return self.finish(done, None)

    def launch(self) -> None:
        """Place the replicas (on warm handles where they are), plan the leases, launch
        every attempt not adopted from a previous owner."""
        ctx, cfg, attempts = self.ctx, self.ctx.config, self.attempts
        self.started, self.started_at = time.monotonic(), time.time()
        attempts.release_abandoned()
        grace_s = ctx.fleet.registry.liveness_grace_s  # workers re-announce after an outage
        alive = [w.name for w in ctx.fleet.wait_for_workers(1, timeout_s=grace_s)]
        placement = place_replicas(cfg.replicas, alive, attempts.handles, cfg.workers)
        if attempts.plan.leases is None and ctx.data is not None:
            planned = ctx.data.plan(attempts.state, placement)
            attempts.plan = attempts.plan.model_copy(
                update={"leases": planned.leases, "cursor_after": planned.cursor_after}
            )
        ctx.store.save_plan(attempts.plan)
        attempts.ensure_handles(placement)
        pending = {
            i: attempts.start(i, placement[i])
            for i in range(cfg.replicas)
            if i not in attempts.adopted
        }
        self.quorum = QuorumWait(self.ctx, attempts, pending, self.started)

    def wait(self) -> Done:
        """Wait for the round's quorum (:class:`~fleet.diloco.quorum.QuorumWait`); the
        attempts to merge, by replica."""
        done = self.quorum.run()
        self.closed = time.monotonic()
        return done

    def finish(
        self,
        done: Done,
        beside: tuple[OuterStepResult, str] | None,
        *,
        ended: float | None = None,
    ) -> tuple[RoundRecord, DriverState]:
        """The outer step (unless ``beside``: its result, and worker, from an attempt of
        the next round in an overlapped run), the evaluation if due, the commit, and the
        garbage it left. ``ended``: when the round ended (monotonic s; default: after
        the commit)."""
        ctx, attempts = self.ctx, self.attempts
        if beside is None:
            result, merge_s, merged_on = merge(ctx, attempts, done)
        else:
            (result, merged_on), merge_s = beside, beside[0].seconds
        evaluation, eval_s = None, 0.0
        if due(ctx, self.index, self.attempts.state.started_at):
            handles = [attempts.handles[i] for i in sorted(done)]
            evaluation, eval_s = evaluate_global(ctx, result.global_pack, handles)
        end = time.monotonic() if ended is None else ended
        timing = Timing(self.started_at, self.started, self.closed, end, merge_s, eval_s)
        record, state = commit(
            ctx, attempts, done, result, merged_on, evaluation, timing, self.quorum.deadline_s
        )
        garbage = superseded(ctx, attempts, record, state, self.previous, self.earlier)
        collect_garbage(ctx.fleet, garbage)
        return record, state
