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
from fleet.diloco.quorum import QuorumWait
from fleet.diloco.state import DriverState, RoundPlan, RoundRecord


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
        self.attempts = Attempts(ctx, state, index, plan)

    def run(self) -> tuple[RoundRecord, DriverState]:
        """Run the round to its commit; the round's record and the state after it.

        Raises:
            JobCancelled: the job was cancelled (running replicas are aborted).
            FencedOutError: another orchestrator took the job over.
            RoundFailed: no replica could be merged.
            DatasetError: the data cannot be read as it is.
        """
        ctx, cfg, attempts = self.ctx, self.ctx.config, self.attempts
        started, started_at = time.monotonic(), time.time()
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
        wait = QuorumWait(ctx, attempts, pending, started)
        done = wait.run()
        closed = time.monotonic()
        result, merge_s, merged_on = merge(ctx, attempts, done)
        evaluation, eval_s = None, 0.0
        if due(ctx, self.index):
            handles = [attempts.handles[i] for i in sorted(done)]
            evaluation, eval_s = evaluate_global(ctx, result.global_pack, handles)
        timing = Timing(started_at, started, closed, time.monotonic(), merge_s, eval_s)
        record, state = commit(
            ctx, attempts, done, result, merged_on, evaluation, timing, wait.deadline_s
        )
        collect_garbage(ctx.fleet, superseded(ctx, attempts, record, state, self.previous))
        return record, state
