"""One DiLoCo round, from its parts: place the replicas and launch their attempts
(:mod:`~fleet.diloco.attempts`), wait for a quorum (:mod:`~fleet.diloco.quorum`), run
the outer step on the first finished replica's worker (:mod:`~fleet.diloco.step`),
evaluate the new global model there or, after the commit, beside the next round on an
idle worker (:mod:`~fleet.diloco.evaluation`), commit (:mod:`~fleet.diloco.commit`) and
delete what the commit superseded.
"""

from __future__ import annotations

import time

from fleet.diloco.attempts import Attempts
from fleet.diloco.commit import Stepped, Timing, commit
from fleet.diloco.context import RunContext
from fleet.diloco.evaluation import BackgroundEvaluations, due, evaluate_global, is_final
from fleet.diloco.placement import place_replicas, training_workers
from fleet.diloco.quorum import QuorumWait
from fleet.diloco.state import DriverState, RoundPlan, RoundRecord
from fleet.diloco.step import step_round


class Round:
    """Round ``index`` of a run, from ``state`` (and the plan of a previous owner, if it
    left this round in flight); its evaluation goes to ``evaluations`` when an idle
    worker can run it beside the next round."""

    def __init__(
        self,
        ctx: RunContext,
        state: DriverState,
        index: int,
        plan: RoundPlan | None,
        evaluations: BackgroundEvaluations,
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.attempts = Attempts(ctx, state, index, plan)
        self.evaluations = evaluations

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
        alive = training_workers(alive, cfg.eval_worker if cfg.eval_overlap else None)
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
        quorum = QuorumWait(ctx, attempts, pending, started)
        done = quorum.run()
        closed = time.monotonic()
        run_started = attempts.state.started_at
        request, result, step_s, worker = step_round(
            ctx, attempts, done, final=(final := is_final(ctx, self.index, run_started))
        )
        stepped = Stepped(request, result, worker, {})
        evaluation, eval_s, beside = None, 0.0, None
        # decided once, with the step: the round is evaluated if it is final or due
        evaluate = final or due(ctx, self.index, run_started)
        if evaluate and not final:
            beside = self.evaluations.worker_for(set(placement))
        if evaluate and beside is None:
            step = request.step.model_copy(
                update={
                    "global_digest": result.global_digest,
                    "state_digests": result.state_digests,
                }
            )
            after = attempts.state.model_copy(
                update={
                    "next_round": self.index + 1,
                    "global_digest": result.global_digest,
                    "state_digests": result.state_digests,
                    "steps": [*attempts.state.steps, step],
                }
            )
            evaluation, eval_s, eval_wire = evaluate_global(
                ctx, after.global_model(), worker, attempts.handles
            )
            stepped = Stepped(request, result, worker, eval_wire)
        timing = Timing(started_at, started, closed, time.monotonic(), step_s, eval_s)
        record, state, garbage = commit(
            ctx, attempts, done, stepped, evaluation, timing, quorum.deadline_s
        )
        if beside is not None:
            self.evaluations.submit(self.index, state.global_model(), beside, worker)
        self.evaluations.collect(garbage)
        return record, state
