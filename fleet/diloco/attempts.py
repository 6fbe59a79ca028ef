"""A round's attempts: each replica's warm handle, every ``replica_round`` launched
(recorded in the round's plan first, so a new owner of the job adopts or aborts it),
re-runs on another worker, aborts, and the outcome of each.

A replica's attempt runs from the round's global model (held by its worker, or reached
there: :mod:`fleet.diloco.globals`) and the replica's state its worker kept from its
last merged attempt (else its last published checkpoint), on its lease of microshards,
and writes to paths unique to (round, replica, attempt)
(:class:`~fleet.diloco.layout.RunLayout`): a re-run on the same worker reproduces the
same bits and never overwrites another attempt.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleet.calls import POLL_INTERVAL_S, FleetFuture, ModelHandle
from fleet.data.batches import synthetic_batches
from fleet.diloco.context import FATAL, RunContext
from fleet.diloco.fragments import fragment_spec
from fleet.diloco.liveness import Liveness
from fleet.diloco.placement import replacement_worker
from fleet.diloco.state import (
    Attempt,
    DriverState,
    HandleRef,
    ReplicaOutcome,
    ReplicaStatus,
    RoundPlan,
    UnclaimedBuild,
)
from fleet.errors import CodecError, FleetError, FleetTimeout, WorkerNotFound
from fleet.protocol import (
    GlobalModelSpec,
    ModelIdResult,
    OuterStepSpec,
    ReplicaRoundRequest,
    ReplicaRoundResult,
)


@dataclass
class Running:
    """An attempt in flight and the future of its task."""

    attempt: Attempt
    future: FleetFuture[ReplicaRoundResult]


def state_checkpoint_due(
    state_checkpoint_every: int, replicas: int, replica: int, round_index: int
) -> bool:
    """True if replica ``replica`` publishes its state after round ``round_index``: every
    ``state_checkpoint_every`` rounds, staggered so replicas take turns (their uploads
    do not share a round's link)."""
    offset = replica * state_checkpoint_every // max(replicas, 1)
    return (round_index + 1 + offset) % state_checkpoint_every == 0


class Attempts:
    """The attempts of round ``index`` (and the plan of a previous owner, if it left the
    round in flight: its finished attempts are adopted, its running ones aborted)."""

    def __init__(
        self, ctx: RunContext, state: DriverState, index: int, inherited: RoundPlan | None
    ) -> None:
        self.ctx, self.cfg, self.state, self.index = ctx, ctx.config, state, index
        self.handles: list[HandleRef | None] = list(state.handles)
        self.abandoned: list[HandleRef] = list(state.abandoned)
        self.unclaimed_builds: list[UnclaimedBuild] = list(state.unclaimed_builds)
        self.liveness = Liveness(ctx.fleet, ctx.fleet.registry.liveness_grace_s)
        """Whether a worker building a model is lost (a round's poll loop hands its own)."""
        self.outcomes: list[ReplicaOutcome] = []
        self.finished: list[str] = []
        """Workers whose attempt finished, in order (the outer step runs on the first)."""
        self.adopted: dict[int, tuple[Attempt, ReplicaRoundResult]] = {}
        self.plan = self._adopt(inherited)
        self.late: tuple[GlobalModelSpec, OuterStepSpec] | None = None
        """Pipelined Streaming DiLoCo, until the previous round commits: the global model
        entering the previous round and that round's outer step, not yet committed
        (:meth:`launch_before_commit`); attempts launched meanwhile apply it themselves."""

    def launch_before_commit(self, entering: GlobalModelSpec, step: OuterStepSpec) -> None:
        """Launch this round's attempts before the previous round (``entering`` it, with
        outer step ``step``) commits: their requests carry the step as ``late_step``,
        and the plan is saved only at :meth:`previous_committed` (a new owner resumes
        the previous round and aborts these)."""
        self.late = (entering, step)

    def previous_committed(self, state: DriverState) -> None:
        """The previous round committed ``state``: later attempts start from its global
        model; the plan, with the attempts launched before, is saved now."""
        self.state, self.late = state, None
        self.ctx.store.save_plan(self.plan)

    def follow_aborted(self, launched: Attempts) -> None:
        """This round starts again after its attempts ``launched`` before the previous
        round committed were aborted (the outer step they applied was not the one
        committed): their outcomes go to this round's record, their packs to its
        garbage, and their numbers are not used again (one still stopping writes
        nowhere this round's attempts do)."""
        self.outcomes += launched.outcomes
        self.plan.attempts += [
            a.model_copy(update={"aborted": True}) for a in launched.plan.attempts
        ]

    def _adopt(self, inherited: RoundPlan | None) -> RoundPlan:
        if inherited is None or inherited.round != self.index:
            return RoundPlan(round=self.index, started_at=time.time())
        self.plan = inherited
        for attempt in (a for a in inherited.attempts if not a.aborted):
            result = attempt.result or self.ctx.fleet.finished_result(
                "replica_round", attempt.task_id, ReplicaRoundResult.model_validate
            )
            if result is not None and attempt.replica not in self.adopted:
                attempt.result = result
                self.adopted[attempt.replica] = (attempt, result)
                self.finished.append(attempt.worker)
        stale = [
            a
            for a in inherited.attempts
            if not a.aborted and self.adopted.get(a.replica, (None,))[0] != a
        ]
        if stale:
            self.ctx.fleet.registry.request_abort(*(a.task_id for a in stale))
            self.outcomes += [self.outcome(a, "aborted", error="previous owner") for a in stale]
        if inherited.attempts:
            self.ctx.log(
                "round %d: adopted %d finished and aborted %d running attempts of a previous owner",
                self.index,
                len(self.adopted),
                len(stale),
            )
        return inherited

    # ------------------------------------------------------------------ handles

    def ensure_handles(self, placement: list[str]) -> None:
        """A live handle on its placed worker for every replica: warm ones are kept, the
        others are built there by the workload, in parallel (their weights come with the
        round's global model); abandoned handles are released."""
        futures: dict[int, FleetFuture[ModelHandle]] = {}
        for i, worker in enumerate(placement):
            handle = self.handles[i]
            if i in self.adopted:
                continue
            record = self.ctx.fleet.handle_record(handle.model_id) if handle else None
            if handle is not None and record is not None and record.status == "live":
                if handle.worker == worker:
                    continue
                self.release(handle)
            self.handles[i] = None
            futures[i] = self._submit_build(worker)
        for i, future in futures.items():
            try:
                built = self._await_build(placement[i], future)
                self.handles[i] = HandleRef(model_id=built.model_id, worker=built.worker)
            except FleetError as exc:
                if isinstance(exc, (*FATAL, CodecError)):
                    raise
                self.ctx.log(
                    "replica %d: no model on %s (%s)",
                    i,
                    placement[i],
                    exc,
                    level=logging.WARNING,
                )

    def _submit_build(self, worker: str) -> FleetFuture[ModelHandle]:
        cfg = self.cfg
        return self.ctx.fleet.init_model(
            cfg.device, workload=cfg.workload, config=cfg.config, worker=worker, wait=False
        )

    def _await_build(
        self,
        worker: str,
        future: FleetFuture[ModelHandle],
        lost: Callable[[str], bool] | None = None,
    ) -> ModelHandle:
        """The handle ``future`` builds on ``worker``, waited for up to
        ``replica_call_timeout_s``; given up as soon as its worker is lost (``lost``, by
        default this round's own liveness): a worker that froze after it was chosen must
        not hold the round for that long. A build given up on is released if it answers
        later (:meth:`release_abandoned`).

        Raises:
            WorkerNotFound: the worker was lost before the build answered.
            FleetTimeout: no answer within ``replica_call_timeout_s``.
            RemoteTaskError: the build failed on the worker.
        """
        lost = lost or self.liveness.lost
        give_up_at = time.monotonic() + self.cfg.replica_call_timeout_s
        while not future.ready():
            timed_out = time.monotonic() > give_up_at
            if timed_out or lost(worker):
                self._unclaimed(worker, future)
                if timed_out:
                    raise FleetTimeout(
                        "init_model", future.task_id, self.cfg.replica_call_timeout_s
                    )
                raise WorkerNotFound(worker)
            time.sleep(POLL_INTERVAL_S)
        return future.result(self.cfg.replica_call_timeout_s)

    def _unclaimed(self, worker: str, future: FleetFuture[ModelHandle]) -> None:
        self.unclaimed_builds.append(UnclaimedBuild(task_id=future.task_id, worker=worker))

    def release_abandoned(self) -> None:
        """Release the handles of attempts given up on whose worker answers again (a
        partitioned worker that came back); forget those whose owner is gone for good.
        Likewise the handles of builds given up on that answered since."""
        self._release_unclaimed_builds()
        kept = []
        for handle in self.abandoned:
            record = self.ctx.fleet.handle_record(handle.model_id)
            if record is None:
                continue
            if record.status == "live":
                self.release(handle)
                self.ctx.log("released %s, abandoned on %s", handle.model_id, handle.worker)
            elif self.ctx.fleet.registry.worker(handle.worker) is not None:
                kept.append(handle)  # its worker may still come back
        self.abandoned = kept

    def _release_unclaimed_builds(self) -> None:
        fleet, kept = self.ctx.fleet, []
        for build in self.unclaimed_builds:
            built = fleet.finished_result("init_model", build.task_id, ModelIdResult.model_validate)
            if built is not None:
                self.release(HandleRef(model_id=built.model_id, worker=build.worker))
                self.ctx.log("released %s, built on %s after it was given up on",
                             built.model_id, build.worker)  # fmt: skip
            elif fleet.task_state(build.task_id) not in ("FAILURE", "REVOKED") and (
                fleet.registry.worker(build.worker) is not None
            ):
                kept.append(build)  # still building, or its worker may come back
        self.unclaimed_builds = kept

    def release(self, handle: HandleRef) -> None:
        with contextlib.suppress(FleetError):  # its worker may be gone with it
            self.ctx.fleet.release_model(handle.model_id, timeout_s=30)

    def abandon(self, replica: int) -> None:
        """Give up on ``replica``'s handle (its worker seems lost)."""
        handle = self.handles[replica]
        if handle is not None:
            self.abandoned.append(handle)
        self.handles[replica] = None

    # ------------------------------------------------------------------ launch

    def start(
        self,
        replica: int,
        worker: str,
        exclude: Iterable[str] = (),
        lost: Callable[[str], bool] | None = None,
    ) -> Running:
        """Launch an attempt of ``replica`` on ``worker`` (building a model there if it
        has no handle); when that fails, on each other alive worker in turn. A build
        stops waiting once its worker is lost (``lost``: a worker's name -> True once
        lost; by default this round's own liveness).

        Raises:
            FleetError: no alive worker could start it (the last error).
        """
        tried = set(exclude)
        while True:
            try:
                handle = self.handles[replica]
                if handle is None or handle.worker != worker:
                    built = self._await_build(worker, self._submit_build(worker), lost)
                    handle = HandleRef(model_id=built.model_id, worker=built.worker)
                    self.handles[replica] = handle
                return self._launch(replica, handle)
            except FleetError as exc:
                if isinstance(exc, (*FATAL, CodecError)):
                    raise
                self.ctx.log(
                    "replica %d: cannot start on %s (%s)",
                    replica,
                    worker,
                    exc,
                    level=logging.WARNING,
                )
                self.handles[replica] = None
                tried.add(worker)
                alive = [w.name for w in self.ctx.fleet.workers() if w.name not in tried]
                nxt = replacement_worker(alive, {}, set(), self.cfg.workers)
                if nxt is None:
                    raise
                worker = nxt

    def request(self, replica: int, handle: HandleRef, attempt_no: int) -> ReplicaRoundRequest:
        """The ``replica_round`` request of that attempt."""
        cfg, layout, data = self.cfg, self.ctx.layout, self.ctx.data
        lease = self.plan.lease_of(replica)
        if data is None:
            batches = synthetic_batches(self.ctx.store.job_id, cfg, self.index, replica)
        else:
            batches = data.batches(self.index, replica, lease)
        due = state_checkpoint_due(cfg.state_checkpoint_every, cfg.replicas, replica, self.index)
        fragment = fragment_spec(cfg, self.index)
        if self.late is not None and fragment is not None and cfg.streaming is not None:
            global_model = self.late[0]
            fragment = fragment.model_copy(
                update={"late_step": self.late[1], "delay_steps": cfg.streaming.delay_steps}
            )
        else:
            global_model = self.state.global_model()
        return ReplicaRoundRequest.model_validate(
            {
                "run": self.ctx.store.job_id,
                "replica": replica,
                "round": self.index,
                "attempt": attempt_no,
                "model_id": handle.model_id,
                "batches": batches,
                "shard_checks": data.shard_checks(lease) if data is not None else None,
                "num_inner_steps": cfg.inner_steps,
                "require_exact_steps": cfg.require_exact_steps,
                "model_schema_hash": cfg.model_schema_hash,
                "global_model": global_model,
                "start": self.state.replicas[replica],
                "exchange": cfg.pseudo_gradient.spec(),
                "fragment": fragment,
                "output_path": layout.replica_pack(self.index, replica, attempt_no),
                "checkpoint_path": layout.replica_state(replica, self.index, attempt_no)
                if due
                else None,
            }
        )

    def _launch(self, replica: int, handle: HandleRef) -> Running:
        attempt_no = self.plan.next_attempt(replica)
        req = self.request(replica, handle, attempt_no)
        fleet = self.ctx.fleet
        future = fleet.submit(
            fleet.prepare("replica_round", req, ReplicaRoundResult.model_validate)
        )
        attempt = Attempt(
            replica=replica,
            attempt=attempt_no,
            worker=handle.worker,
            task_id=future.task_id,
            pack_path=req.output_path,
            checkpoint_path=req.checkpoint_path,
            started_at=time.time(),
        )
        self.plan.attempts.append(attempt)
        if self.late is None:
            self.ctx.store.save_plan(self.plan)
        return Running(attempt, future)

    def abort(self, running: Iterable[Running], error: str | None) -> None:
        """Abort these attempts (their tasks stop at their next step, or are
        interrupted: :mod:`fleet.progress`) and record them ``aborted``."""
        running = list(running)
        self.ctx.fleet.registry.request_abort(*(r.attempt.task_id for r in running))
        self.outcomes += [self.outcome(r.attempt, "aborted", error=error) for r in running]

    # ------------------------------------------------------------------ outcomes

    def outcome(
        self,
        attempt: Attempt,
        status: ReplicaStatus,
        *,
        result: ReplicaRoundResult | None = None,
        error: str | None = None,
    ) -> ReplicaOutcome:
        """The record of ``attempt`` ending with ``status``."""
        outcome = ReplicaOutcome(
            replica=attempt.replica,
            attempt=attempt.attempt,
            worker=attempt.worker,
            status=status,
            started_at=attempt.started_at,
            finished_at=time.time(),
            error=error,
            lease=self.plan.lease_of(attempt.replica),
        )
        if result is None:
            return outcome
        loss = result.metrics.get("mean_loss", result.metrics.get("loss"))
        return outcome.model_copy(
            update={
                "started_at": result.started_at or attempt.started_at,
                "finished_at": result.finished_at or outcome.finished_at,
                "steps_completed": result.steps_completed,
                "loss": float(loss)
                if isinstance(loss, int | float) and not isinstance(loss, bool)
                else None,
                "compute_s": result.compute_s,
                "load_s": result.load_s,
                "save_s": result.save_s,
                "encode_s": result.encode_s,
                "publish_s": result.publish_s,
                "sent_bytes": result.sent_bytes,
                "received_bytes": result.received_bytes,
                "store_requests": result.store_requests,
                "peak_rss_bytes": result.peak_rss_bytes,
                "global_source": result.global_source,
                "base_digest": result.base_digest,
                "steps_replayed": result.steps_replayed,
                "state_source": result.state_source,
                "pack": result.pack,
                "late_mix_step": result.late_mix_step,
                "late_mix_s": result.late_mix_s,
                "metrics": result.metrics,
            }
        )
