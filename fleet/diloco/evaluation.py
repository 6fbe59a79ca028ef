"""The evaluation of a round's new global model.

Off the critical path (``eval_overlap``, the default): the round commits without it and
the next round starts at once, while an idle worker (``eval_worker``, or one that ran no
replica of the round) evaluates the committed model, catching up to it from the shared
root. Its result lands in Redis against its round (:class:`BackgroundEvaluations`,
:func:`fleet.diloco.state.rounds_of`). The run's last round is evaluated before the run
ends, and the run waits for the evaluations still in flight. One whose worker is lost,
that its worker has not taken up within a heartbeat TTL of its submission (a worker
stuck, or busy with another job, while its heartbeat goes on), or that has no result
within ``replica_call_timeout_s``, is given up, at the next commit or at the end, and
evaluated where the model is held; so the garbage its packs hold back is not held for
the rest of the run.

On the critical path (no idle worker, ``eval_overlap`` off, or the last round): on the
worker that made the model (the outer step's worker holds it: nothing crosses a link),
into a replica's warm handle there if it has one; on any worker otherwise.

Why not a thread beside a replica's inner steps on a busy worker: a workload's
evaluation would then share torch's global random generator with the training beside
it (a DataLoader draws its base seed from it at every ``iter``), and the replica's
round would no longer re-run bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fleet.calls import FleetFuture
from fleet.diloco.commit import collect_garbage
from fleet.diloco.context import RunContext
from fleet.diloco.liveness import Liveness
from fleet.diloco.state import Evaluation, HandleRef, LandedEvaluation, WireBytes
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


def due(ctx: RunContext, round_index: int, final: bool) -> bool:
    """True if round ``round_index``'s global model is evaluated: every ``eval_every``
    rounds, and the last round, so a run stopped by its budget ends on an evaluated
    model. ``final`` is :func:`is_final` as the round decided it before its outer step:
    asked again after the step, a budget spent during the step would make a round that
    ran as not final evaluated as if it were (beside training, while the run goes on
    for one more round, evaluated too)."""
    every = ctx.config.eval_every
    return final or (bool(every) and not (round_index + 1) % every)


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
        future = _submit(ctx, spec, target, model_id)
        try:
            result = future.result(cfg.replica_call_timeout_s)
        except FleetError as exc:
            if isinstance(exc, CodecError):
                raise
            ctx.log("evaluation on %s failed: %s", target or "the pool", exc, level=logging.WARNING)
            last = exc
            continue
        evaluation, wire = _landed(future, result, target)
        return evaluation, time.monotonic() - started, wire
    assert last is not None
    raise last


def _submit(
    ctx: RunContext,
    spec: GlobalModelSpec,
    worker: str | None,
    model_id: str | None,
    *,
    own_models: bool = False,
) -> FleetFuture[EvaluateGlobalResult]:
    cfg = ctx.config
    fields = {
        "run": ctx.store.job_id,
        "global_model": spec.model_dump(mode="json"),
        "split": cfg.eval_split,
        "model_id": model_id,
        "device": cfg.device,
        "own_models": own_models,
    }
    call = ctx.fleet.prepare(
        "evaluate_global",
        fields,
        EvaluateGlobalResult.model_validate,
        worker=worker,
        workload=cfg.workload,
        config=cfg.config,
    )
    return ctx.fleet.submit(call)


def _landed(
    future: FleetFuture[EvaluateGlobalResult], result: EvaluateGlobalResult, target: str | None
) -> tuple[Evaluation, dict[str, WireBytes]]:
    ran_on = future.worker or target or "?"
    at = result.finished_at or time.time()  # the worker's clock, where it reports one
    evaluation = Evaluation(at=at, worker=ran_on, metrics=result.metrics)
    return evaluation, {ran_on: WireBytes(sent=result.sent_bytes, received=result.received_bytes)}


@dataclass
class _InFlight:
    round: int
    worker: str
    future: FleetFuture[EvaluateGlobalResult]
    started: float
    spec: GlobalModelSpec
    holder: str | None
    """The worker that holds the model (the outer step's), to evaluate on if this fails."""


class BackgroundEvaluations:
    """The evaluations of a run's committed rounds that run beside later rounds'
    training (module docstring): at most one in flight per worker (a round finding
    every idle worker still evaluating is evaluated before the next round starts, so
    evaluations never pile up behind training); each one's result recorded against its
    round in Redis as it lands (:meth:`fleet.jobs.JobStore.record_evaluation`). The
    packs an evaluation in flight may read are not deleted under it: the commits'
    garbage waits until none is in flight (:meth:`collect`)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.in_flight: list[_InFlight] = []
        self.deferred_garbage: list[str] = []
        self.failed_on: set[str] = set()
        """Workers an evaluation failed on (e.g. one whose allowlist refuses the
        workload): not asked again in this run."""
        self._liveness = Liveness(ctx.fleet, ctx.fleet.registry.liveness_grace_s)

    def collect(self, garbage: list[str]) -> None:
        """Delete ``garbage`` (shared-root paths a commit superseded) and what was
        deferred before, once no evaluation is in flight; until then, defer it."""
        self.deferred_garbage += garbage
        if not self.in_flight and self.deferred_garbage:
            collect_garbage(self.ctx.fleet, self.deferred_garbage)
            self.deferred_garbage = []

    def worker_for(self, busy: set[str]) -> str | None:
        """The worker to evaluate on now: ``eval_worker`` if alive, else an alive worker
        not in ``busy`` (the round's replicas' workers), in either case one not
        evaluating already (finished evaluations are recorded first); None if there is
        none (or ``eval_overlap`` is off)."""
        cfg = self.ctx.config
        if not cfg.eval_overlap:
            return None
        self.harvest()
        evaluating = {e.worker for e in self.in_flight} | self.failed_on
        alive = sorted(w.name for w in self.ctx.fleet.workers() if w.name not in evaluating)
        if cfg.eval_worker is not None:
            return cfg.eval_worker if cfg.eval_worker in alive else None
        return next((w for w in alive if w not in busy), None)

    def submit(
        self, round_index: int, spec: GlobalModelSpec, worker: str, holder: str | None
    ) -> None:
        """Start evaluating round ``round_index``'s committed global model ``spec`` on
        ``worker``; should that fail, it is evaluated on ``holder`` (the worker that
        holds the model) when the failure is seen."""
        future = _submit(self.ctx, spec, worker, None, own_models=True)
        started = time.monotonic()
        self.in_flight.append(_InFlight(round_index, worker, future, started, spec, holder))
        self.ctx.log("round %d's evaluation runs on %s beside training", round_index, worker)

    def pending(self) -> set[int]:
        """The rounds whose evaluation is in flight."""
        return {e.round for e in self.in_flight}

    def harvest(self, *, wait: bool = False) -> list[int]:
        """Record the evaluations that finished, and give up those whose worker is lost,
        stuck or too slow (:meth:`_give_up`); the rounds that landed. With ``wait``,
        every one in flight first finishes or is given up (:meth:`_settle`). One that
        failed or was given up is run again at once where the model is held
        (:func:`evaluate_global`, as on the critical path), and its worker is not asked
        again in this run; failing there too, its round is left without an evaluation
        (logged).

        Raises:
            BrokerUnavailableError: Redis cannot be reached.
            JobCancelled, FencedOutError: while waiting (``wait``), see
                :meth:`~fleet.diloco.context.RunContext.poll`.
        """
        cfg, landed, still = self.ctx.config, [], []
        given_up = self._settle() if wait else self._give_up(self._liveness)
        for e in self.in_flight:
            failure = given_up.get(e.future.task_id)
            if failure is None and not e.future.ready():
                still.append(e)
                continue
            if failure is None:
                try:
                    result = e.future.result(cfg.replica_call_timeout_s)
                except FleetError as exc:
                    failure = str(exc)
            if failure is None:
                evaluation, wire = _landed(e.future, result, e.worker)
                eval_s = time.monotonic() - e.started
                if result.finished_at is not None and result.started_at is not None:
                    eval_s = result.finished_at - result.started_at  # on its worker
            else:
                self.failed_on.add(e.worker)
                self.ctx.log(
                    "round %d's evaluation on %s failed (%s): evaluating it on %s",
                    e.round,
                    e.worker,
                    failure,
                    e.holder or "the pool",
                    level=logging.WARNING,
                )
                try:
                    evaluation, eval_s, wire = evaluate_global(self.ctx, e.spec, e.holder, [])
                except FleetError as again:
                    self.ctx.log(
                        "round %d is left without an evaluation: %s",
                        e.round,
                        again,
                        level=logging.WARNING,
                    )
                    continue
            record = LandedEvaluation(
                evaluation=evaluation,
                eval_s=eval_s,
                sent_bytes=sum(w.sent for w in wire.values()),
                received_bytes=sum(w.received for w in wire.values()),
            )
            self.ctx.jobs.record_evaluation(
                self.ctx.store.job_id, e.round, record.model_dump_json()
            )
            landed.append(e.round)
        self.in_flight = still
        return landed

    def _settle(self) -> dict[str, str]:
        """Wait until every evaluation in flight has finished or is given up
        (:meth:`_give_up`). Returns why each was given up, by task id.

        Raises:
            JobCancelled, FencedOutError: see :meth:`~fleet.diloco.context.RunContext.poll`.
        """
        given_up: dict[str, str] = {}
        for liveness in self.ctx.poll():
            given_up |= self._give_up(liveness, given_up)
            if all(e.future.task_id in given_up or e.future.ready() for e in self.in_flight):
                return given_up
        raise AssertionError("unreachable: poll() yields forever")

    def _give_up(
        self, liveness: Liveness, given_up: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Give up the evaluations in flight (not finished, not in ``given_up``) whose
        worker is lost; that no worker took up within a heartbeat TTL
        (``FLEET_HEARTBEAT_TTL_S``) of their submission (a worker stuck, or busy with
        another job's task, while its heartbeat goes on); or that have no result within
        ``replica_call_timeout_s`` of their submission. Each one is asked to abort (it
        stops before it starts, if it ever does). Returns why each was given up, by
        task id."""
        pickup_s = self.ctx.fleet.registry.heartbeat_ttl_s
        timeout_s = self.ctx.config.replica_call_timeout_s
        now, reasons = time.monotonic(), {}
        for e in self.in_flight:
            if e.future.task_id in (given_up or {}) or e.future.ready():
                continue
            if liveness.lost(e.worker):
                reason = "its worker was lost"
            elif now - e.started > pickup_s and not e.future.started():
                reason = f"not taken up within {pickup_s:g} s"
            elif now - e.started > timeout_s:
                reason = f"no result within {timeout_s:g} s"
            else:
                continue
            e.future.cancel()
            reasons[e.future.task_id] = reason
        return reasons
