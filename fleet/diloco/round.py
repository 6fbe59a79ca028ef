"""One DiLoCo round: launch, poll, quorum, merge, evaluate, commit.

Each replica runs ``run_inner_loop`` on a worker (placement), from the round's global
pack and its own committed optimizer state, on its lease of microshards. Every attempt
launched is recorded in the round's plan first. The round closes when
:func:`quorum_reached`; replicas still running are aborted. A replica whose worker dies,
or whose task fails, is re-run on another worker from the same inputs (and the same
lease), up to ``max_attempts``. The outer step runs as a task on a worker (the one
whose replica finished first, else the pool), streaming the packs; a replica pack it
refuses (corrupt, non-finite) is dropped like a lost replica and the merge runs again
without it. The new global model is evaluated on a worker, then the round is
committed in one fenced transaction, and superseded packs are deleted.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.calls import FleetFuture
from fleet.client import Fleet
from fleet.data.batches import synthetic_batches
from fleet.data.leases import give_back
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.data import RunData
from fleet.diloco.layout import RunLayout, result_marker
from fleet.diloco.liveness import Liveness
from fleet.diloco.placement import merge_worker, place_replicas, replacement_worker
from fleet.diloco.state import (
    Attempt,
    DriverState,
    Evaluation,
    HandleRef,
    OptState,
    ReplicaOutcome,
    ReplicaStatus,
    RoundPlan,
    RoundRecord,
    RunStore,
)
from fleet.errors import (
    CodecError,
    DatasetError,
    FleetError,
    JobCancelled,
    JobError,
    ProtocolError,
    RoundFailed,
    StorageError,
    StorageFullError,
)
from fleet.jobs import JobLease, JobStore
from fleet.protocol import OuterStepResult, RunInnerLoopResult, candidate_weight
from fleet.storage import PackRef

log = logging.getLogger("fleet.diloco")

#: Seconds between two looks at the round's running tasks (N+1 Redis calls each): a
#: hundredth of the time waited so far, within these bounds.
POLL_INTERVAL_S = (0.005, 0.02)
#: Errors of an attempt that re-running cannot mend: the run fails (and can be resumed
#: once the data is fixed or space is freed on the shared root).
FATAL = (DatasetError, JobError, StorageFullError)


def _poll_pause(started: float) -> None:
    """Sleep between two looks at running tasks: a hundredth of the time waited since
    ``started`` (monotonic), within :data:`POLL_INTERVAL_S`."""
    low, high = POLL_INTERVAL_S
    time.sleep(min(high, max(low, (time.monotonic() - started) / 100)))


def quorum_reached(config: DiLoCoConfig, done: int, pending: int, deadline_passed: bool) -> bool:
    """A round closes once ``min_replicas`` replicas published, or its deadline passed
    with at least one published, or no attempt is left running."""
    return done >= config.min_replicas or (deadline_passed and done > 0) or pending == 0


@dataclass
class RunContext:
    """What every round of a run shares."""

    fleet: Fleet
    config: DiLoCoConfig
    layout: RunLayout
    store: RunStore
    jobs: JobStore
    lease: JobLease
    log: Callable[..., None]
    data: RunData | None = None
    """The run's dataset and leases (None: the workload draws its own data)."""


@dataclass
class _Running:
    attempt: Attempt
    future: FleetFuture[RunInnerLoopResult]


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
        self.cfg = ctx.config
        self.state = state
        self.index = index
        self.previous = previous
        self.handles: list[HandleRef | None] = list(state.handles)
        self.abandoned: list[HandleRef] = list(state.abandoned)
        self.outcomes: list[ReplicaOutcome] = []
        self.finished: list[str] = []
        self.adopted: dict[int, tuple[Attempt, RunInnerLoopResult]] = {}
        self.plan = self._start_plan(plan)

    # ------------------------------------------------------------------ plan and launch

    def _start_plan(self, inherited: RoundPlan | None) -> RoundPlan:
        """The plan of this round: a previous owner's (its finished attempts adopted, its
        running ones aborted, its leases kept), or a new one."""
        if inherited is None or inherited.round != self.index:
            return RoundPlan(round=self.index, started_at=time.time())
        self.plan = inherited
        for attempt in inherited.attempts:
            result = attempt.result or self.ctx.fleet.finished_result(
                "run_inner_loop", attempt.task_id, RunInnerLoopResult.model_validate
            )
            if result is not None and attempt.replica not in self.adopted:
                self.adopted[attempt.replica] = (attempt, result)
        stale = [a for a in inherited.attempts if self.adopted.get(a.replica, (None,))[0] != a]
        if stale:
            self.ctx.fleet.registry.request_abort(*(a.task_id for a in stale))
            self.outcomes += [self._outcome(a, "aborted", error="previous owner") for a in stale]
        if inherited.attempts:
            self.ctx.log(
                "round %d: adopted %d finished and aborted %d running attempts of a previous owner",
                self.index,
                len(self.adopted),
                len(stale),
            )
        return inherited

    def _ensure_handles(self, placement: list[str]) -> None:
        """A live handle on its placed worker for every replica: warm ones are kept, the
        others import the global pack there, in parallel; abandoned handles are released."""
        futures: dict[int, FleetFuture[Any]] = {}
        for i, worker in enumerate(placement):
            handle = self.handles[i]
            if i in self.adopted:
                continue
            record = self.ctx.fleet.handle_record(handle.model_id) if handle else None
            if handle is not None and record is not None and record.status == "live":
                if handle.worker == worker:
                    continue
                self._release(handle)
            self.handles[i] = None
            futures[i] = self.ctx.fleet.import_parameter_pack(
                self.state.global_pack,
                self.cfg.device,
                workload=self.cfg.workload,
                config=self.cfg.config,
                worker=worker,
                wait=False,
            )
        for i, future in futures.items():
            try:
                handle = future.result(self.cfg.replica_call_timeout_s)
                self.handles[i] = HandleRef(model_id=handle.model_id, worker=handle.worker)
            except FleetError as exc:
                if isinstance(exc, (*FATAL, CodecError)):
                    raise
                self.ctx.log(
                    "replica %d: import on %s failed (%s)",
                    i,
                    placement[i],
                    exc,
                    level=logging.WARNING,
                )

    def _release_abandoned(self) -> None:
        """Release the handles of attempts given up on whose worker answers again (a
        partitioned worker that came back); forget those whose owner is gone for good."""
        kept = []
        for handle in self.abandoned:
            record = self.ctx.fleet.handle_record(handle.model_id)
            if record is None:
                continue
            if record.status == "live":
                self._release(handle)
                self.ctx.log("released %s, abandoned on %s", handle.model_id, handle.worker)
            elif self.ctx.fleet.registry.worker(handle.worker) is not None:
                kept.append(handle)  # its worker may still come back
        self.abandoned = kept

    def _release(self, handle: HandleRef) -> None:
        with contextlib.suppress(FleetError):  # its worker may be gone with it
            self.ctx.fleet.release_model(handle.model_id, timeout_s=30)

    def _start(self, replica: int, worker: str, exclude: set[str]) -> _Running:
        """Launch an attempt of ``replica`` on ``worker`` (importing a handle there if it
        has none); when that fails, on each other alive worker in turn.

        Raises:
            FleetError: no alive worker could start it (the last error).
        """
        tried = set(exclude)
        while True:
            try:
                handle = self.handles[replica]
                if handle is None or handle.worker != worker:
                    imported = self.ctx.fleet.import_parameter_pack(
                        self.state.global_pack,
                        self.cfg.device,
                        workload=self.cfg.workload,
                        config=self.cfg.config,
                        worker=worker,
                        timeout_s=self.cfg.replica_call_timeout_s,
                    )
                    handle = HandleRef(model_id=imported.model_id, worker=imported.worker)
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

    def _launch(self, replica: int, handle: HandleRef) -> _Running:
        cfg, layout = self.cfg, self.ctx.layout
        attempt_no = self.plan.next_attempt(replica)
        pack_path = layout.replica_pack(self.index, replica, attempt_no)
        opt_path = layout.opt_state(self.index, replica, attempt_no)
        committed = self.state.replica_opt[replica]
        lease, data = self.plan.lease_of(replica), self.ctx.data
        if data is None:
            batches = synthetic_batches(self.ctx.store.job_id, cfg, self.index, replica)
        else:
            batches = data.batches(self.index, replica, lease)
        future = self.ctx.fleet.run_inner_loop(
            handle.model_id,
            batches,
            cfg.inner_steps,
            pack_path,
            cfg.model_schema_hash,
            inner_optimizer_state_path=opt_path,
            inner_optimizer_state_source_path=committed.path if committed else None,
            input_parameter_pack=self.state.global_pack.model_dump(),
            require_exact_steps=cfg.require_exact_steps,
            shard_checks=data.shard_checks(lease) if data is not None else None,
            wait=False,
        )
        attempt = Attempt(
            replica=replica,
            attempt=attempt_no,
            worker=handle.worker,
            task_id=future.task_id,
            pack_path=pack_path,
            opt_path=opt_path,
            started_at=time.time(),
        )
        self.plan.attempts.append(attempt)
        self.ctx.store.save_plan(self.plan)
        return _Running(attempt, future)

    # ------------------------------------------------------------------ the round

    def run(self) -> tuple[RoundRecord, DriverState]:
        """Run the round to its commit; the round's record and the state after it.

        Raises:
            JobCancelled: the job was cancelled (running replicas are aborted).
            FencedOutError: another orchestrator took the job over.
            RoundFailed: no replica could be merged.
            DatasetError: the data cannot be read as it is.
        """
        cfg, ctx = self.cfg, self.ctx
        started, started_at = time.monotonic(), time.time()
        self._release_abandoned()
        grace_s = ctx.fleet.registry.liveness_grace_s  # workers re-announce after an outage
        alive = [w.name for w in ctx.fleet.wait_for_workers(1, timeout_s=grace_s)]
        placement = place_replicas(cfg.replicas, alive, self.handles, cfg.workers)
        if self.plan.leases is None and ctx.data is not None:
            planned = ctx.data.plan(self.state, placement)
            self.plan = self.plan.model_copy(
                update={"leases": planned.leases, "cursor_after": planned.cursor_after}
            )
        ctx.store.save_plan(self.plan)
        self._ensure_handles(placement)
        pending = {
            i: self._start(i, placement[i], set())
            for i in range(cfg.replicas)
            if i not in self.adopted
        }
        done = self._wait(pending, started)
        closed = time.monotonic()
        result, merge_s, merged_on = self._merge(done)
        evaluation, eval_s = self._evaluate(result, done, merged_on)
        record, new_state = self._commit(
            done, result, started_at, started, closed, merge_s, merged_on, evaluation, eval_s
        )
        self._collect_garbage(record)
        return record, new_state

    def _wait(
        self, pending: dict[int, _Running], started: float
    ) -> dict[int, tuple[Attempt, RunInnerLoopResult]]:
        cfg, ctx = self.cfg, self.ctx
        deadline = started + cfg.quorum.round_deadline_s if cfg.quorum.round_deadline_s else None
        done: dict[int, tuple[Attempt, RunInnerLoopResult]] = dict(self.adopted)
        tries = dict.fromkeys(range(cfg.replicas), 1)
        errors: list[str] = []
        liveness = Liveness(ctx.fleet, ctx.fleet.registry.liveness_grace_s)
        while pending:
            liveness.tick()
            ctx.lease.check()
            if ctx.jobs.is_cancelled(ctx.store.job_id):
                self._abort(pending.values(), "cancelled")
                raise JobCancelled(ctx.store.job_id)
            for i, running in list(pending.items()):
                attempt = running.attempt
                if running.future.ready():
                    try:
                        attempt.result = running.future.result(timeout_s=60)
                        ctx.store.save_plan(self.plan)  # a new owner would adopt it
                        done[i] = (attempt, attempt.result)
                        self.finished.append(attempt.worker)
                        del pending[i]
                        continue
                    except FleetError as exc:
                        if isinstance(exc, FATAL):
                            self._abort(pending.values(), f"{type(exc).__name__}")
                            raise
                        error = f"{type(exc).__name__}: {getattr(exc, 'error', exc)}"
                        errors.append(f"replica {i} on {attempt.worker}: {error}")
                        self.outcomes.append(self._outcome(attempt, "failed", error=error))
                        ctx.log(
                            "replica %d attempt %d failed on %s: %s",
                            i,
                            attempt.attempt,
                            attempt.worker,
                            error,
                            level=logging.WARNING,
                        )
                elif liveness.lost(attempt.worker):
                    self.outcomes.append(self._outcome(attempt, "lost"))
                    ctx.fleet.registry.request_abort(attempt.task_id)  # if it ever runs again
                    lost_handle = self.handles[i]
                    if lost_handle is not None:
                        self.abandoned.append(lost_handle)
                    ctx.log(
                        "replica %d: worker %s lost mid-round; re-running from the round's inputs",
                        i,
                        attempt.worker,
                        level=logging.WARNING,
                    )
                    self.handles[i] = None
                else:
                    continue
                del pending[i]
                if tries[i] < cfg.max_attempts:
                    load = {r.attempt.worker: 1 for r in pending.values()}
                    alive = sorted(liveness.alive())
                    worker = replacement_worker(alive, load, {attempt.worker}, cfg.workers)
                    if worker is not None:
                        pending[i] = self._start(i, worker, {attempt.worker})
                        tries[i] += 1
                        liveness.refresh()
            past = deadline is not None and time.monotonic() >= deadline
            if quorum_reached(cfg, len(done), len(pending), past):
                break
            _poll_pause(started)
        if pending:
            ctx.log(
                "round %d closes with %d/%d replicas; aborting %s",
                self.index,
                len(done),
                cfg.replicas,
                sorted(pending),
            )
            self._abort(pending.values(), None)
        if not done:
            raise RoundFailed(self.index, errors)
        return done

    def _abort(self, running: Any, error: str | None) -> None:
        running = list(running)
        self.ctx.fleet.registry.request_abort(*(r.attempt.task_id for r in running))
        self.outcomes += [self._outcome(r.attempt, "aborted", error=error) for r in running]

    # ------------------------------------------------------------------ merge and evaluation

    def _merge(
        self, done: dict[int, tuple[Attempt, RunInnerLoopResult]]
    ) -> tuple[OuterStepResult, float, str | None]:
        """The outer step on a worker; a replica pack it refuses is dropped and the merge
        runs again without it. Returns the result, its seconds and its worker."""
        cfg, ctx, layout = self.cfg, self.ctx, self.ctx.layout
        started = time.monotonic()
        while done:
            order = sorted(done)
            fields = {
                "global_pack": self.state.global_pack.model_dump(),
                "replicas": [
                    {
                        "pack": _pack_of(done[i][1]).model_dump(),
                        "weight": candidate_weight(
                            cfg.merge_policy, float(done[i][1].steps_completed), 1.0
                        ),
                    }
                    for i in order
                ],
                "momentum": self.state.momentum.model_dump() if self.state.momentum else None,
                "outer": cfg.outer.model_dump(),
                "merge_policy": cfg.merge_policy,
                "output_global_path": layout.global_pack(self.index + 1),
                "output_momentum_path": layout.momentum(self.index + 1),
                "chunk_bytes": cfg.merge_chunk_bytes,
            }
            worker = merge_worker(self.finished, [w.name for w in ctx.fleet.workers()])
            try:
                result, worker = self._outer_step(fields, worker)
                return result, time.monotonic() - started, worker
            except (CodecError, StorageError) as exc:
                path = str(getattr(exc, "path", "") or "")
                bad = [i for i in order if _names(path, done[i][0].pack_path)]
                if not bad:
                    raise
                for i in bad:
                    attempt, _ = done.pop(i)
                    self.outcomes.append(
                        self._outcome(attempt, "dropped", error=f"{type(exc).__name__}: {exc}")
                    )
                    ctx.log(
                        "replica %d: its pack was refused by the outer step (%s); dropped",
                        i,
                        exc,
                        level=logging.WARNING,
                    )
        raise RoundFailed(self.index, ["every replica pack was refused by the outer step"])

    def _outer_step(
        self, fields: dict[str, Any], worker: str | None
    ) -> tuple[OuterStepResult, str | None]:
        """Run the outer step on ``worker`` (None: the pool queue); if that worker dies,
        on the pool queue (the outputs' paths are deterministic, so a late first run
        publishes the same bits)."""
        ctx = self.ctx
        liveness = Liveness(ctx.fleet, ctx.fleet.registry.liveness_grace_s)
        while True:
            call = ctx.fleet.prepare(
                "outer_step", fields, OuterStepResult.model_validate, worker=worker
            )
            future = ctx.fleet.submit(call)
            started = time.monotonic()
            while not future.ready():
                liveness.tick()
                ctx.lease.check()
                if worker is not None and liveness.lost(worker):
                    ctx.log(
                        "the outer step's worker %s was lost; running it again on the pool",
                        worker,
                        level=logging.WARNING,
                    )
                    ctx.fleet.registry.request_abort(future.task_id)
                    break
                _poll_pause(started)
            else:
                return future.result(timeout_s=60), future.worker or worker
            worker = None

    def _evaluate(
        self,
        result: OuterStepResult,
        done: dict[int, tuple[Attempt, RunInnerLoopResult]],
        merged_on: str | None,
    ) -> tuple[Evaluation | None, float]:
        cfg, ctx = self.cfg, self.ctx
        last = self.index == cfg.rounds - 1
        if not cfg.eval_every or ((self.index + 1) % cfg.eval_every and not last):
            return None, 0.0
        started = time.monotonic()
        alive = {w.name for w in ctx.fleet.workers()}
        for i in sorted(done):
            handle = self.handles[i]
            if handle is None or handle.worker not in alive:
                continue
            try:
                ctx.fleet.load_parameter_pack(
                    handle.model_id, result.global_pack, timeout_s=cfg.replica_call_timeout_s
                )
                metrics = ctx.fleet.evaluate(
                    handle.model_id, cfg.eval_split, timeout_s=cfg.replica_call_timeout_s
                )
                return Evaluation(
                    at=time.time(), worker=handle.worker, metrics=metrics
                ), time.monotonic() - started
            except FleetError as exc:
                if isinstance(exc, CodecError):
                    raise
                ctx.log("evaluation on %s failed: %s", handle.worker, exc, level=logging.WARNING)
        handle_ = ctx.fleet.import_parameter_pack(
            result.global_pack,
            cfg.device,
            workload=cfg.workload,
            config=cfg.config,
            timeout_s=cfg.replica_call_timeout_s,
        )
        try:
            metrics = ctx.fleet.evaluate(
                handle_, cfg.eval_split, timeout_s=cfg.replica_call_timeout_s
            )
            return Evaluation(
                at=time.time(), worker=handle_.worker, metrics=metrics
            ), time.monotonic() - started
        finally:
            self._release(HandleRef(model_id=handle_.model_id, worker=handle_.worker))

    # ------------------------------------------------------------------ commit

    def _commit(
        self,
        done: dict[int, tuple[Attempt, RunInnerLoopResult]],
        result: OuterStepResult,
        started_at: float,
        started: float,
        closed: float,
        merge_s: float,
        merged_on: str | None,
        evaluation: Evaluation | None,
        eval_s: float,
    ) -> tuple[RoundRecord, DriverState]:
        replica_opt = list(self.state.replica_opt)
        for i, (_, res) in done.items():
            path = res.inner_optimizer_state_path
            replica_opt[i] = (
                OptState(path=path, encoding=res.inner_optimizer_state_encoding) if path else None
            )
        outcomes = [self._outcome(a, "merged", result=r) for a, r in done.values()] + self.outcomes
        outcomes.sort(key=lambda o: (o.replica, o.attempt))
        data = self.plan.cursor_after
        if data is not None and self.plan.leases is not None:
            data = give_back(
                data, [lease for lease in self.plan.leases if lease.replica not in done]
            )
        state = self.state.model_copy(
            update={
                "next_round": self.index + 1,
                "global_pack": result.global_pack,
                "momentum": result.momentum,
                "replica_opt": replica_opt,
                "handles": self.handles,
                "abandoned": self.abandoned,
                "data": data,
            }
        )
        record = RoundRecord(
            round=self.index,
            started_at=started_at,
            closed_at=started_at + (closed - started),
            wall_s=time.monotonic() - started,
            merge_s=merge_s,
            eval_s=eval_s,
            merge_worker=merged_on,
            input_global=self.state.global_pack,
            input_momentum=self.state.momentum,
            global_pack=result.global_pack,
            momentum=result.momentum,
            replicas=outcomes,
            eval=evaluation,
            data=data,
        )
        self.ctx.store.commit(state, record)
        self.ctx.jobs.untrack_task(self.ctx.store.job_id, *(a.task_id for a in self.plan.attempts))
        self.state = state
        return record, state

    def _collect_garbage(self, record: RoundRecord) -> None:
        """Delete what this commit superseded (in the background, on any worker): the
        attempts that were not merged, the last round's replica packs, replaced optimizer
        states, and global/momentum packs older than ``keep_rounds`` (not checkpoints)."""
        layout, cfg = self.ctx.layout, self.cfg
        merged = {(o.replica, o.attempt) for o in record.merged}
        paths = [
            p
            for a in self.plan.attempts
            if (a.replica, a.attempt) not in merged
            for p in (a.pack_path, result_marker(a.pack_path), a.opt_path)
        ]
        if self.previous is not None:
            packs = [o.pack.path for o in self.previous.merged if o.pack is not None]
            paths += packs + [result_marker(p) for p in packs]
        kept_opt = {o.path for o in self.state.replica_opt if o is not None}
        paths += [
            a.opt_path
            for a in self.plan.attempts
            if (a.replica, a.attempt) in merged and a.opt_path not in kept_opt
        ]
        if self.previous is not None:
            paths += [
                o.opt_state.path
                for o in self.previous.merged
                if o.opt_state and o.opt_state.path not in kept_opt
            ]
        old = self.index + 1 - cfg.keep_rounds
        if old >= 0 and not is_checkpoint(cfg, old):
            paths += [layout.global_pack(old), layout.momentum(old)]
        collect_garbage(self.ctx.fleet, paths)

    # ------------------------------------------------------------------ outcomes

    def _outcome(
        self,
        attempt: Attempt,
        status: ReplicaStatus,
        *,
        result: RunInnerLoopResult | None = None,
        error: str | None = None,
    ) -> ReplicaOutcome:
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
        opt = result.inner_optimizer_state_path
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
                "publish_s": result.publish_s,
                "pack": result.pack,
                "opt_state": OptState(path=opt, encoding=result.inner_optimizer_state_encoding)
                if opt
                else None,
                "metrics": result.metrics,
            }
        )


def is_checkpoint(config: DiLoCoConfig, round_index: int) -> bool:
    """True if the global pack entering ``round_index`` is kept as a checkpoint."""
    return bool(config.checkpoint_every) and round_index % config.checkpoint_every == 0


def collect_garbage(fleet: Fleet, paths: list[str]) -> None:
    """Ask any worker to delete ``paths`` (shared-root relative), without waiting."""
    paths = sorted(set(paths))
    if paths:
        try:
            fleet.submit(
                fleet.prepare("collect_garbage", {"paths": paths}, dict), ignore_result=True
            )
        except FleetError as exc:
            log.warning("garbage collection not sent: %s", exc)


def _pack_of(result: RunInnerLoopResult) -> PackRef:
    if result.pack is None:
        raise ProtocolError("run_inner_loop returned no pack")
    return result.pack


def _names(error_path: str, pack_path: str) -> bool:
    """True if an error's path (as the worker saw it) is the pack ``pack_path``."""
    path = error_path.rstrip("/")
    return (
        path.endswith("/" + pack_path)
        or path.endswith(f"/{pack_path}/values.f32le")
        or path == pack_path
    )
