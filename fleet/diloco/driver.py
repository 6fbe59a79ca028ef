"""The DiLoCo driver: a run's loop over rounds, as a job (Douillard et al. 2023,
arXiv:2311.08105; docs/design.md decision 6).

What crosses a link each round is the replicas' encoded pseudo-gradients: the global
model and each replica's state stay on the workers that use them, published in full
only at checkpoints, off the critical path (docs/protocol.md section 5.7). Redis holds
the job and its records, so a restarted orchestrator continues from the last committed
round (``resume``), and any worker can run any replica or the outer step (catching up
from the last checkpoint when it lacks the round's global model). The orchestrator
itself needs neither torch nor a mount of the shared root: it only sends tasks. One
orchestrator owns a job at a time (:class:`~fleet.jobs.JobLease`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fleet.client import Fleet
from fleet.diloco.attempts import Attempts
from fleet.diloco.commit import collect_garbage, take_up_checkpoints
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import RunContext
from fleet.diloco.data import RunData
from fleet.diloco.divergence import RisingTrainingLoss
from fleet.diloco.evaluation import BackgroundEvaluations
from fleet.diloco.fragments import check_fragments
from fleet.diloco.layout import RunLayout
from fleet.diloco.placement import place_replicas, training_workers
from fleet.diloco.round import Launched, Round
from fleet.diloco.state import (
    DriverState,
    Evaluation,
    HandleRef,
    LandedEvaluation,
    RoundRecord,
    RunStore,
    rounds_of,
    with_landed,
)
from fleet.diloco.step import verify_checkpoint
from fleet.errors import (
    BrokerUnavailableError,
    FleetError,
    JobCancelled,
    JobStateError,
    RunConfigError,
)
from fleet.jobs import Job, JobLease, JobStore
from fleet.protocol import FullCheckpoint, ReplicaStart
from fleet.storage import result_marker

log = logging.getLogger("fleet.diloco")

#: Seconds between two tries to record a failure while Redis is away.
FAIL_RECORD_RETRY_S = 1.0


class DiLoCoRun:
    """One DiLoCo run as a job. ``start`` a new one or ``resume`` one by id, then ``run``.

    Args:
        fleet: a client of the fleet.
        on_round: called with each round's record after it is committed and, when its
            evaluation runs beside later rounds, once that landed (in round order).
    """

    def __init__(
        self,
        fleet: Fleet,
        config: DiLoCoConfig,
        job: Job,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.job_id = job.job_id
        self.jobs = JobStore(fleet.registry)
        self.layout = RunLayout(job.job_id)
        self.on_round = on_round
        fragments = config.streaming.fragments if config.streaming is not None else 1
        self.rising = RisingTrainingLoss(config.outer, window=fragments)

    @classmethod
    def start(
        cls,
        fleet: Fleet,
        config: DiLoCoConfig,
        *,
        job_id: str | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> DiLoCoRun:
        """A new DiLoCo job (status ``new``) for ``config``."""
        job = JobStore(fleet.registry).create(
            "diloco", config.model_dump(mode="json"), job_id=job_id
        )
        return cls(fleet, config, job, on_round=on_round)

    @classmethod
    def resume(
        cls,
        fleet: Fleet,
        job_id: str,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
        rounds: int | None = None,
    ) -> DiLoCoRun:
        """The DiLoCo job ``job_id``, to continue from its last committed round; with
        ``rounds``, run that many rounds in all (the job's config records the new count
        once :meth:`run` owns the job).

        Raises:
            JobNotFound: no such job.
            RunConfigError: ``rounds`` is below the rounds the job has committed.
        """
        jobs = JobStore(fleet.registry)
        job = jobs.get(job_id)
        config = DiLoCoConfig.model_validate(job.spec)
        if rounds is not None and rounds != config.rounds:
            committed = len(jobs.metrics(job_id))
            if rounds < committed:
                raise RunConfigError(
                    "--rounds",
                    f"job {job_id} has committed {committed} rounds already; got {rounds}",
                )
            config = config.model_copy(update={"rounds": rounds})
        return cls(fleet, config, job, on_round=on_round)

    def _log(self, message: str, *args: Any, level: int = logging.INFO) -> None:
        """Log to this process and, best effort, to the job's log."""
        line = message % args if args else message
        log.log(level, "[%s] %s", self.job_id, line)
        with contextlib.suppress(FleetError):
            self.jobs.append_log(
                self.job_id,
                worker="orchestrator",
                task_id="-",
                level=logging.getLevelName(level),
                logger="fleet.diloco",
                line=line,
            )

    # ------------------------------------------------------------------ the run

    def run(self) -> Job:
        """Run (or continue) the job to its end; return its final record. A cancelled job
        stops within one inner step of its running replicas.

        Raises:
            JobOwnedError: another live orchestrator runs the job.
            JobStateError: the job already completed.
            FleetError: the run failed (the job is marked ``failed`` with the reason).
        """
        if self.jobs.get(self.job_id).status == "completed":
            raise JobStateError(self.job_id, "completed", "running")
        with JobLease(self.jobs, self.job_id, self.fleet.settings.job_lease_ttl_s) as lease:
            fleet = self.fleet.for_job(self.job_id, fence=lease.token)
            stale = self.jobs.tracked_tasks(self.job_id)
            if stale:  # replicas of an orchestrator that died: stop them
                fleet.registry.request_abort(*stale)
                self.jobs.untrack_task(self.job_id, *stale)
                self._log("aborted %d tasks of a previous owner", len(stale))
            self.jobs.set_status(self.job_id, "running", token=lease.token)
            spec = self.config.model_dump(mode="json")
            if self.jobs.get(self.job_id).spec != spec:  # resumed with more rounds
                self.jobs.put_spec(self.job_id, lease.token, spec)
                self._log("the run now has %d rounds", self.config.rounds)
            ctx = RunContext(
                fleet=fleet,
                config=self.config,
                layout=self.layout,
                store=RunStore(self.jobs, self.job_id, lease.token),
                jobs=self.jobs,
                lease=lease,
                log=self._log,
            )
            try:
                if self.config.dataset is not None:
                    ctx.data = RunData(fleet, self.config, self.job_id)
                return self._rounds(ctx)
            except JobCancelled:
                self._log("cancelled", level=logging.WARNING)
                self._release_handles(ctx, ctx.store.load()[0])
                return self.jobs.get(self.job_id)
            except Exception as exc:
                self._fail(exc, lease.token)
                raise

    def _rounds(self, ctx: RunContext) -> Job:
        evaluations = BackgroundEvaluations(ctx)
        state, plan = ctx.store.load()
        if state is None:
            state = self._initial_state(ctx, evaluations)
        else:
            self._log("resuming at round %d (global %s)", state.next_round, state.global_digest)
            if ctx.data is not None:
                ctx.data.check(state)
            state, garbage = take_up_checkpoints(self.config, self.jobs, self.job_id, state)
            collect_garbage(ctx.fleet, garbage)
            verify_checkpoint(ctx, state)
        records = rounds_of(self.jobs, self.job_id)
        previous = records[-1] if records else None
        for record in records[-self.config.quorum.adaptive_deadline.window_rounds :]:
            ctx.deadline.observe(record)
        unreported: list[RoundRecord] = []
        launched: Launched | None = None
        aborted: Attempts | None = None
        try:
            for index in range(state.next_round, self.config.rounds):
                round_ = Round(ctx, state, index, plan, evaluations, launched, aborted)
                launched = None
                record, state = round_.run()
                launched, aborted = round_.next, round_.next_aborted
                plan, previous = None, record
                unreported.append(record)
                go_on = self._committed(record, state)
                unreported = self._report(evaluations, unreported)
                if not go_on:
                    break
        finally:
            if launched is not None:  # the run stops (budget spent, or an error)
                launched.abort("the run stopped")
        if evaluations.in_flight:
            self._log("waiting for %d evaluations to land", len(evaluations.in_flight))
        self._report(evaluations, unreported, wait=True)
        evaluations.collect([])
        return self._finish(ctx, state, previous)

    def _report(
        self, evaluations: BackgroundEvaluations, unreported: list[RoundRecord], wait: bool = False
    ) -> list[RoundRecord]:
        """Hand ``on_round`` each committed round whose evaluation is not in flight any
        more, in round order; the records still waiting (with ``wait``: none)."""
        evaluations.harvest(wait=wait)
        pending = evaluations.pending()
        ready: list[RoundRecord] = []
        for record in unreported:
            if record.round in pending:
                break
            ready.append(record)
        found = self.jobs.evaluations(self.job_id) if any(r.eval is None for r in ready) else {}
        for record in ready:
            landed = with_landed(record, found.get(record.round))
            if landed is not record:
                loss = landed.eval.loss if landed.eval else None
                self._log(
                    "round %d evaluated beside training: eval loss %s (%.1fs)",
                    landed.round,
                    "-" if loss is None else f"{loss:.4f}",
                    landed.eval_s,
                )
            if self.on_round is not None:
                self.on_round(landed)
        return unreported[len(ready) :]

    def _initial_state(self, ctx: RunContext, evaluations: BackgroundEvaluations) -> DriverState:
        """Round 0's global model: built by the workload on a worker, published in full (the
        run's first checkpoint), evaluated (beside round 0 on an idle worker if there is
        one, recorded as round -1's evaluation)."""
        cfg, started = self.config, time.time()
        grace_s = ctx.fleet.registry.liveness_grace_s
        alive = [w.name for w in ctx.fleet.wait_for_workers(1, timeout_s=grace_s)]
        alive = training_workers(alive, cfg.eval_worker if cfg.eval_overlap else None)
        worker = place_replicas(1, alive, [], cfg.workers)[0]
        timeout = cfg.replica_call_timeout_s
        handle = ctx.fleet.init_model(
            cfg.device, workload=cfg.workload, config=cfg.config, worker=worker, timeout_s=timeout
        )
        pack = ctx.fleet.export_parameter_pack(
            handle, self.layout.checkpoint(0), cfg.model_schema_hash
        )
        check_fragments(cfg, pack.parameter_count or 0)
        initial, beside = None, None
        if cfg.eval_every:  # beside round 0, on a worker none of its replicas will use
            busy = place_replicas(cfg.replicas, alive, [], cfg.workers)
            beside = evaluations.worker_for({worker, *busy})
        if cfg.eval_every and beside is None:
            metrics = ctx.fleet.evaluate(handle, cfg.eval_split, timeout_s=timeout)
            initial = Evaluation(at=time.time(), worker=handle.worker, metrics=metrics)
        state = DriverState(
            next_round=0,
            global_digest=pack.values_digest or "",
            layout_hash=pack.layout_hash or "",
            parameter_count=pack.parameter_count or 0,
            model_schema_hash=pack.model_schema_hash or cfg.model_schema_hash,
            checkpoints=[FullCheckpoint(round=0, global_pack=pack)],
            replicas=[ReplicaStart() for _ in range(cfg.replicas)],
            pending_checkpoints=[None] * cfg.replicas,
            handles=[HandleRef(model_id=handle.model_id, worker=handle.worker)]
            + [None] * (cfg.replicas - 1),
            started_at=started,
            initial_eval=initial,
            **(ctx.data.initial() if ctx.data is not None else {}),
        )
        ctx.store.save_state(state)
        self._log("initial global model %s from %s", pack.path, worker)
        if beside is not None:
            evaluations.submit(-1, state.global_model(), beside, None)
        return state

    def _committed(self, record: RoundRecord, state: DriverState) -> bool:
        """Record a committed round; False once the wall-clock budget is spent."""
        self.jobs.add_artifact(self.job_id, "checkpoint", state.checkpoint.global_pack.path)
        loss = record.eval.loss if record.eval else None
        per_parameter = record.bytes_per_parameter
        self._log(
            "round %d closed: %d/%d replicas merged, wall %.2fs, outer step %.3fs on %s, "
            "%s bytes/parameter, eval loss %s",
            record.round,
            len(record.merged),
            self.config.replicas,
            record.wall_s,
            record.outer_step_s,
            record.outer_step_worker or "the pool",
            "-" if per_parameter is None else f"{per_parameter:.2f}",
            "-" if loss is None else f"{loss:.4f}",
        )
        warning = self.rising.observe(record)
        if warning is not None:
            self._log(warning, level=logging.WARNING)
        budget = self.config.max_wall_s
        if budget is not None and time.time() - state.started_at >= budget:
            if self.config.eval_every and record.eval is None:
                # spent after the round chose not to evaluate: one more, final, round
                self._log("wall-clock budget reached during round %d: one more round, "
                          "evaluated", record.round)  # fmt: skip
                return True
            self._log("wall-clock budget of %.1fs reached after round %d", budget, record.round)
            return False
        return True

    def _finish(self, ctx: RunContext, state: DriverState, last: RoundRecord | None) -> Job:
        """Final artifacts (the last round published its global model in full); the
        workers' local state of the run released, once their background uploads have
        landed, and those checkpoints taken up; the run's pseudo-gradients and replica
        state checkpoints deleted (only the kept full checkpoints stay); handles
        released."""
        self._release_run(ctx)
        state, garbage = take_up_checkpoints(self.config, self.jobs, self.job_id, state)
        ctx.store.save_state(state)
        final = state.checkpoint.global_pack.path
        self.jobs.add_artifact(self.job_id, "final_pack", final)
        self.jobs.add_artifact(self.job_id, "checkpoint", final)
        self.jobs.add_artifact(self.job_id, "run_dir", self.layout.run_dir)
        if last is not None:
            packs = [w.pack.path for s in state.steps for w in s.replicas]
            run_dir = self.layout.run_dir
            garbage += packs + [result_marker(p) for p in packs]
            garbage += [f"{run_dir}/replica-{i}" for i in range(self.config.replicas)]
        collect_garbage(ctx.fleet, garbage)
        self._release_handles(ctx, state)
        return self.jobs.set_status(self.job_id, "completed", token=ctx.lease.token)

    def _release_run(self, ctx: RunContext) -> None:
        """Every alive worker drops its local state of the run, after its background
        uploads finish (best effort: a worker that misses it keeps a few models on its
        disk; ``fleet gc`` does not see local disks)."""
        futures = []
        for worker in ctx.fleet.workers():
            with contextlib.suppress(FleetError):
                call = ctx.fleet.prepare(
                    "release_run", {"run": self.job_id}, dict, worker=worker.name
                )
                futures.append(ctx.fleet.submit(call))
        for future in futures:
            with contextlib.suppress(FleetError):
                future.result(self.config.replica_call_timeout_s)

    def _release_handles(self, ctx: RunContext, state: DriverState | None) -> None:
        for handle in state.handles if state else []:
            if handle is not None:
                with contextlib.suppress(FleetError):
                    ctx.fleet.release_model(handle.model_id, timeout_s=30)

    def _fail(self, exc: BaseException, token: int) -> None:
        """Record the failure. With Redis away (an outage past the clients' retry budget),
        wait for it and record the failure once it is back: a job never stays ``running``
        for want of a write. Interrupting the wait leaves the job to show ``orphaned``."""
        reason = f"{type(exc).__name__}: {exc}"
        log.error("[%s] failed: %s", self.job_id, reason)
        waiting = False
        while True:
            try:
                self.jobs.set_status(self.job_id, "failed", error=reason, token=token)
                break
            except BrokerUnavailableError:
                if not waiting:
                    log.error(
                        "[%s] Redis is away: recording the failure once it is back", self.job_id
                    )
                    waiting = True
                time.sleep(FAIL_RECORD_RETRY_S)
            except FleetError as error:
                log.error("[%s] could not record the failure: %s", self.job_id, error)
                return
        line = f"failed: {reason}" + (" (recorded once Redis was back)" if waiting else "")
        with contextlib.suppress(FleetError):
            self.jobs.append_log(
                self.job_id,
                worker="orchestrator",
                task_id="-",
                level="ERROR",
                logger="fleet.diloco",
                line=line,
            )

    # ------------------------------------------------------------------ records

    def rounds(self) -> list[RoundRecord]:
        """The record of every committed round."""
        return rounds_of(self.jobs, self.job_id)

    def state(self) -> DriverState | None:
        """The committed driver state (initial evaluation, start time, packs)."""
        state = RunStore(self.jobs, self.job_id, 0).load()[0]
        if state is not None and state.initial_eval is None:
            landed = self.jobs.evaluations(self.job_id).get(-1)
            if landed is not None:
                initial = LandedEvaluation.model_validate_json(landed).evaluation
                state = state.model_copy(update={"initial_eval": initial})
        return state


__all__ = ["DiLoCoRun"]
