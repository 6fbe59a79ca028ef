"""Overlapped DiLoCo rounds (``DiLoCoConfig.overlap``, ``fleet diloco --overlap``): round
``r``'s outer step runs while round ``r + 1``'s inner steps do, with *eager updates*
(Kale et al. 2025, "Eager Updates For Overlapped Communication and Computation in
DiLoCo", arXiv:2502.12996), so no replica waits for the outer step.

Two rounds are in flight. Once round ``r``'s quorum closes, round ``r + 1`` is launched
at once:

- each replica starts from its *eager start point* (:mod:`fleet.diloco.eager`): where
  the outer step of round ``r - 1`` predicted the global model goes before round
  ``r``'s pseudo-gradients, moved by the replica's own share of round ``r``'s (the
  first round after a start or a resume starts from the committed global model);
- one of its attempts (the replica of round ``r``'s first finished worker) runs round
  ``r``'s outer step beside its inner steps, on the same worker, in a thread
  (``RunInnerLoopRequest.outer_step``): the merge work stays on the fleet's workers.

When round ``r + 1``'s quorum closes, round ``r`` is committed with that outer step's
result (or, if its attempt did not bring one back, after running the step on its own:
:func:`~fleet.diloco.merge.merge`, the same bits), and round ``r + 2`` is launched. The
global model still follows the synchronous algorithm's outer steps exactly, each from
the replicas' pseudo-gradients relative to their own start points; only where each
replica starts is estimated.

Guarantees as in a synchronous run: every round is committed once, in order, fenced;
a round's leases are consumed at its commit (a round launched before the previous
one's commit is planned from the state that commit will write: :func:`~fleet.diloco.
commit.advance`); a resumed run continues from the last committed round, adopting the
finished attempts of the round in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fleet.diloco.commit import advance
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import RunContext
from fleet.diloco.merge import round_request
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.quorum import Done
from fleet.diloco.round import Round
from fleet.diloco.state import DriverState, RoundPlan, RoundRecord
from fleet.protocol import EagerStart, OuterStepResult


def eager_starts(config: DiLoCoConfig, committed: DriverState, done: Done) -> dict[int, EagerStart]:
    """Each replica's start point for the round after the one whose attempts ``done``
    holds (not yet committed), with ``committed`` the state entering that round.

    ``prediction - g * w * fresh`` (:mod:`fleet.diloco.eager`), with ``g`` the outer
    optimizer's :attr:`~fleet.diloco.optim.OuterOptimizer.delta_gain`, ``w = 1 /
    len(done)`` (equal shares) and ``fresh`` the replica's pseudo-gradient in ``done``;
    a replica not in ``done`` starts from the prediction as it is. Before any outer step
    ran (a run's first rounds) the prediction is the global model itself.
    """
    gain = outer_optimizer(config.outer).delta_gain
    if gain is None:  # refused by the config's validator
        raise ValueError(f"outer optimizer {config.outer.name!r} has no delta_gain")
    prediction = committed.prediction or committed.global_pack
    return {
        i: EagerStart(
            prediction=prediction,
            fresh=done[i][1].pack if i in done else None,
            scale=gain / len(done),
        )
        for i in range(config.replicas)
    }


class Pipeline:
    """The overlapped rounds of a run, from its committed ``state`` (and the plan of a
    round a previous owner left in flight). ``on_commit`` is called with each committed
    round's record and the state after it, and returns False to launch no further
    round (a wall-clock budget)."""

    def __init__(
        self,
        ctx: RunContext,
        on_commit: Callable[[RoundRecord, DriverState], bool],
    ) -> None:
        self.ctx = ctx
        self.on_commit = on_commit

    def run(
        self,
        state: DriverState,
        plan: RoundPlan | None,
        last: RoundRecord | None,
        earlier: RoundRecord | None = None,
    ) -> tuple[DriverState, RoundRecord | None]:
        """Run the rounds from ``state.next_round`` (``last`` and ``earlier``: the last two
        committed rounds); the final state and last record.

        Raises: as :meth:`fleet.diloco.round.Round.run`.
        """
        cfg = self.ctx.config
        committed = state
        pending: tuple[Round, Done] | None = None
        for index in range(state.next_round, cfg.rounds):
            current = self._launch(index, committed, last, pending, plan)
            if pending is None:
                current.earlier = earlier
            plan = None
            done = current.wait()
            going = True
            if pending is not None:
                last, committed = self._commit(pending, current, done)
                current.attempts.state = committed  # its outer step starts from here
                current.earlier, current.previous = current.previous, last  # its commit's GC
                self.ctx.store.save_plan(current.attempts.plan)  # the commit dropped it
                going = self.on_commit(last, committed)
            pending = (current, done)
            if not going:
                break
        if pending is not None:  # the last round: its outer step on its own
            last, committed = pending[0].finish(pending[1], None)
            self.on_commit(last, committed)
        return committed, last

    def _launch(
        self,
        index: int,
        committed: DriverState,
        last: RoundRecord | None,
        pending: tuple[Round, Done] | None,
        plan: RoundPlan | None,
    ) -> Round:
        """Launch round ``index``: after ``pending`` (the round before, not yet
        committed) with eager start points and its outer step carried, else (the first
        round of this owner) from the committed global model."""
        ctx, cfg = self.ctx, self.ctx.config
        if pending is None:
            current = Round(ctx, committed, index, plan, last)
        else:
            before, done = pending
            current = Round(ctx, advance(cfg, before.attempts, done), index, None, last)
            current.attempts.starts = eager_starts(cfg, committed, done)
            first = min(done, key=lambda i: done[i][1].finished_at or 0.0)
            current.attempts.carry = (first, round_request(ctx, before.attempts, done))
        current.launch()
        return current

    def _commit(
        self, pending: tuple[Round, Done], current: Round, done: Done
    ) -> tuple[RoundRecord, DriverState]:
        """Commit the round before ``current`` with the outer step an attempt of
        ``current`` ran beside its inner steps, or, if none brought it back, after
        running it on its own."""
        before, before_done = pending
        beside: tuple[OuterStepResult, str] | None = None
        carry = current.attempts.carry
        if carry is not None and carry[0] in done:
            attempt, result = done[carry[0]]
            if result.outer_step is not None:
                beside = (result.outer_step, attempt.worker)
            else:
                self.ctx.log(
                    "round %d's outer step beside round %d failed (%s); running it again",
                    before.index,
                    current.index,
                    result.outer_step_error,
                    level=logging.WARNING,
                )
        return before.finish(before_done, beside, ended=current.started)


__all__ = ["Pipeline", "eager_starts"]
