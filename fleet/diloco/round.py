"""One DiLoCo round, from its parts: place the replicas and launch their attempts
(:mod:`~fleet.diloco.attempts`), wait for a quorum (:mod:`~fleet.diloco.quorum`), run
the outer step on the first finished replica's worker (:mod:`~fleet.diloco.step`),
evaluate the new global model there or, after the commit, beside the next round on an
idle worker (:mod:`~fleet.diloco.evaluation`), commit (:mod:`~fleet.diloco.commit`) and
delete what the commit superseded.

Pipelined rounds (Streaming DiLoCo with ``streaming.delay_steps`` > 0): once round
``r``'s quorum closed, round ``r + 1``'s attempts are launched (:class:`Launched`),
each applying round ``r``'s outer step itself beside its first inner steps
(:class:`~fleet.diloco.replica.LateMix`), and then the step is queued, behind the
attempt on its worker, where it finds what that attempt computed; round ``r`` commits
once, when the step returns (a round later than unpipelined), and round ``r + 1``
goes on with the attempts already running. Should the committed step differ from the
one they apply (a pseudo-gradient refused), they are aborted and round ``r + 1``
starts afresh from the commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fleet.diloco.attempts import Attempts, Running
from fleet.diloco.commit import Stepped, Timing, advance, commit
from fleet.diloco.context import RunContext
from fleet.diloco.evaluation import BackgroundEvaluations, due, evaluate_global, is_final
from fleet.diloco.placement import place_replicas, training_workers
from fleet.diloco.quorum import Done, QuorumWait
from fleet.diloco.state import DriverState, RoundPlan, RoundRecord
from fleet.diloco.step import round_step, step_round
from fleet.protocol import OuterStepRequest


@dataclass
class Launched:
    """A round's attempts launched before the previous round committed (pipelined), and
    when that happened (unix s, monotonic s)."""

    attempts: Attempts
    pending: dict[int, Running]
    started_at: float
    started: float

    def abort(self, why: str) -> None:
        """Abort the attempts (the round will not run as launched)."""
        self.attempts.abort(self.pending.values(), why)
        self.attempts.ctx.jobs.untrack_task(
            self.attempts.ctx.store.job_id, *(r.attempt.task_id for r in self.pending.values())
        )


class Round:
    """Round ``index`` of a run, from ``state`` (and the plan of a previous owner, if it
    left this round in flight, or its attempts ``launched`` before ``state`` was
    committed, or those launched but ``aborted``, whose numbers it does not reuse); its
    evaluation goes to ``evaluations`` when an idle worker can run it beside the next
    round."""

    def __init__(
        self,
        ctx: RunContext,
        state: DriverState,
        index: int,
        plan: RoundPlan | None,
        evaluations: BackgroundEvaluations,
        launched: Launched | None = None,
        aborted: Attempts | None = None,
    ) -> None:
        self.ctx = ctx
        self.index = index
        self.launched = launched
        if launched is not None:
            self.attempts = launched.attempts
            self.attempts.previous_committed(state)
        else:
            self.attempts = Attempts(ctx, state, index, plan)
            if aborted is not None:
                self.attempts.follow_aborted(aborted)
        self.evaluations = evaluations
        self.next: Launched | None = None
        """The next round's attempts, when this round launched them (pipelined)."""
        self.next_aborted: Attempts | None = None
        """The next round's attempts, launched by this round and then aborted: the outer
        step they apply was not the one committed (the next round starts again)."""

    def _place(self, attempts: Attempts) -> list[str]:
        """Each replica's worker, its lease planned and its handle there."""
        ctx, cfg = self.ctx, self.ctx.config
        grace_s = ctx.fleet.registry.liveness_grace_s  # workers re-announce after an outage
        alive = [w.name for w in ctx.fleet.wait_for_workers(1, timeout_s=grace_s)]
        alive = training_workers(alive, cfg.eval_worker if cfg.eval_overlap else None)
        placement = place_replicas(cfg.replicas, alive, attempts.handles, cfg.workers)
        if attempts.plan.leases is None and ctx.data is not None:
            planned = ctx.data.plan(attempts.state, placement)
            attempts.plan = attempts.plan.model_copy(
                update={"leases": planned.leases, "cursor_after": planned.cursor_after}
            )
        if attempts.late is None:
            ctx.store.save_plan(attempts.plan)
        attempts.ensure_handles(placement)
        return placement

    def _launch_next(self, done: Done, request: OuterStepRequest) -> None:
        """Launch the next round's attempts, with this round's outer step (not computed
        yet) for them to apply themselves."""
        ctx = self.ctx
        started_at, started = time.time(), time.monotonic()
        nxt = Attempts(ctx, advance(ctx, self.attempts, done), self.index + 1, None)
        nxt.launch_before_commit(self.attempts.state.global_model(), request.step)
        placement = self._place(nxt)
        pending = {i: nxt.start(i, w) for i, w in enumerate(placement)}
        self.next = Launched(nxt, pending, started_at, started)
        ctx.log("round %d launched before round %d's outer step", self.index + 1, self.index)

    def _pipelines(self, final: bool) -> bool:
        streaming = self.ctx.config.streaming
        return streaming is not None and streaming.delay_steps > 0 and not final

    def run(self) -> tuple[RoundRecord, DriverState]:
        """Run the round to its commit; the round's record and the state after it (and,
        pipelined, :attr:`next`).

        Raises:
            JobCancelled: the job was cancelled (running replicas are aborted).
            FencedOutError: another orchestrator took the job over.
            RoundFailed: no replica could be merged.
            DatasetError: the data cannot be read as it is.
        """
        try:
            return self._run()
        except BaseException:
            if self.next is not None:
                self.next.abort("the previous round failed")
            raise

    def _run(self) -> tuple[RoundRecord, DriverState]:
        ctx, cfg, attempts = self.ctx, self.ctx.config, self.attempts
        attempts.release_abandoned()
        if self.launched is None:
            started, started_at = time.monotonic(), time.time()
            placement = self._place(attempts)
            pending = {
                i: attempts.start(i, placement[i])
                for i in range(cfg.replicas)
                if i not in attempts.adopted
            }
        else:
            started, started_at = self.launched.started, self.launched.started_at
            pending = self.launched.pending
            placement = [r.attempt.worker for r in pending.values()]
        quorum = QuorumWait(ctx, attempts, pending, started)
        done = quorum.run()
        closed = time.monotonic()
        run_started = attempts.state.started_at
        final = is_final(ctx, self.index, run_started)
        pipelined = self._pipelines(final)
        if pipelined:  # first: the step queues behind them, each applies it itself
            self._launch_next(done, round_step(ctx, attempts, done, final=final))
        request, result, step_s, worker = step_round(ctx, attempts, done, final=final)
        if self.next is not None and self.next.attempts.late is not None:
            launched_with = self.next.attempts.late[1]
            if launched_with.replicas != request.step.replicas:
                self.next.abort("the outer step they apply was not committed")
                self.next_aborted, self.next = self.next.attempts, None
                ctx.log("round %d starts again: the committed outer step of round %d "
                        "differs from the one its attempts apply", self.index + 1,
                        self.index, level=logging.WARNING)  # fmt: skip
        stepped = Stepped(request, result, worker, {})
        evaluation, eval_s, beside = None, 0.0, None
        # decided once, with the step: the round is evaluated if it is final or due
        evaluate = due(ctx, self.index, final)
        if evaluate and not final:
            beside = self.evaluations.worker_for(set(placement))
            if beside is None and pipelined and cfg.eval_overlap and worker is not None:
                beside = worker  # behind its next attempt: never in front of the commit
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
