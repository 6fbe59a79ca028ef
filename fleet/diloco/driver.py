"""The DiLoCo driver: rounds of replicas on the fleet, the outer step, quorum, faults,
resume (DESIGN.md decision 6; Douillard et al. 2023, arXiv:2311.08105).

State lives in Redis (the job and its driver state) and on the shared root (packs and
optimizer states), so any worker can run any replica and a restarted orchestrator
continues from the last completed round. Paths under ``runs/<job_id>/``:

- ``round-RRRR/global``: the global model entering round R (R = 0: the initial model),
  ``round-RRRR/momentum``: the outer momentum after round R-1;
- ``round-RRRR/replica-I-<session><attempt>``: replica I's pack of round R, one path per
  attempt, so a re-queued or redelivered replica never overwrites another's output;
- ``replica-I/opt-rRRRR-<session><attempt>.pt``: its inner optimizer state, copied from
  the replica's last committed state before the attempt starts.

A round's record (which attempts were merged) is written to Redis in one transaction
after the new global pack is published, so a late pack never enters a closed round and
a crash between the two only repeats the round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet import keys
from fleet.client import Fleet, FleetFuture, ModelHandle
from fleet.codec import read_pack, write_values_pack
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.outer import average, outer_step
from fleet.errors import (
    FleetError,
    FleetTimeout,
    JobCancelled,
    RegistryError,
    RemoteTaskError,
    RoundFailed,
)
from fleet.jobs import TERMINAL, Job, JobStore
from fleet.protocol import RunInnerLoopResult, candidate_weight

log = logging.getLogger("fleet.diloco")

#: Seconds between two looks at the round's tasks and workers.
POLL_INTERVAL_S = 0.05
#: Seconds between two liveness reads of the round's workers (2N+1 Redis calls each);
#: well under the heartbeat TTL, so a dead worker is still noticed within a second.
LIVENESS_INTERVAL_S = 0.5


@dataclass
class _Attempt:
    replica: int
    attempt: int
    worker: str
    handle: ModelHandle
    future: FleetFuture[RunInnerLoopResult]
    out_path: str
    opt_path: str
    started_unix_s: float = field(default_factory=time.time)


@dataclass
class DriverState:
    """What the driver persists after every round (``keys.job_state``)."""

    next_round: int
    global_pack: str
    momentum_pack: str | None
    replica_opt: list[str | None]
    replica_handles: list[dict[str, str] | None]

    def to_redis(self) -> dict[str, str]:
        return {
            "next_round": str(self.next_round),
            "global_pack": self.global_pack,
            "momentum_pack": self.momentum_pack or "",
            "replica_opt": json.dumps(self.replica_opt),
            "replica_handles": json.dumps(self.replica_handles),
        }

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> DriverState:
        return cls(
            next_round=int(raw["next_round"]),
            global_pack=raw["global_pack"],
            momentum_pack=raw["momentum_pack"] or None,
            replica_opt=json.loads(raw["replica_opt"]),
            replica_handles=json.loads(raw["replica_handles"]),
        )


class DiLoCoRun:
    """One DiLoCo run as a job. ``start`` a new one or ``resume`` one by id, then ``run``.

    Args:
        fleet: a client of the fleet (the orchestrator must see the shared root).
        on_round: called with each round's metrics record after it closes.
    """

    def __init__(
        self,
        fleet: Fleet,
        config: DiLoCoConfig,
        job: Job,
        *,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.fleet = fleet.for_job(job.job_id)
        self.config = config
        self.job_id = job.job_id
        self.jobs = JobStore(fleet.registry.redis)
        self.on_round = on_round
        self.run_dir = f"runs/{job.job_id}"
        self.session = uuid.uuid4().hex[:6]
        self.handles: list[ModelHandle | None] = [None] * config.replicas

    @classmethod
    def start(
        cls,
        fleet: Fleet,
        config: DiLoCoConfig,
        *,
        job_id: str | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> DiLoCoRun:
        """A new DiLoCo job (status ``new``) for ``config``."""
        job = JobStore(fleet.registry.redis).create(
            "diloco", config.model_dump(mode="json"), job_id=job_id
        )
        return cls(fleet, config, job, on_round=on_round)

    @classmethod
    def resume(
        cls, fleet: Fleet, job_id: str, *, on_round: Callable[[dict[str, Any]], None] | None = None
    ) -> DiLoCoRun:
        """The DiLoCo job ``job_id``, to continue from its last completed round.

        Raises:
            JobNotFound: no such job.
        """
        job = JobStore(fleet.registry.redis).get(job_id)
        return cls(fleet, DiLoCoConfig.model_validate(job.spec), job, on_round=on_round)

    # ------------------------------------------------------------------ logging

    def _log(self, message: str, *args: Any, level: int = logging.INFO) -> None:
        line = message % args if args else message
        log.log(level, "[%s] %s", self.job_id, line)
        self.jobs.append_log(
            self.job_id,
            worker="orchestrator",
            task_id="-",
            level=logging.getLevelName(level),
            logger="fleet.diloco",
            line=line,
        )

    # ------------------------------------------------------------------ state

    def _load_state(self) -> DriverState | None:
        raw = self.fleet.registry.redis.hgetall(keys.job_state(self.job_id))
        return DriverState.from_redis(raw) if raw else None

    def _initial_state(self) -> DriverState:
        started = time.time()
        worker = self._pick_worker(0, set())
        handle = self.fleet.init_model(
            self.config.device,
            workload=self.config.workload,
            config=self.config.config,
            worker=worker,
            timeout_s=self.config.replica_call_timeout_s,
        )
        path = f"{self.run_dir}/round-0000/global"
        self.fleet.export_parameter_pack(handle, path, self.config.model_schema_hash)
        self.handles[0] = handle
        state = DriverState(
            0, path, None, [None] * self.config.replicas, [None] * self.config.replicas
        )
        state.replica_handles[0] = {"model_id": handle.model_id, "worker": handle.worker}
        fields = state.to_redis()
        if self.config.eval_every:
            evaluation = self.fleet.evaluate(
                handle, self.config.eval_split, timeout_s=self.config.replica_call_timeout_s
            )
            fields["initial_eval"] = json.dumps({"at": time.time(), "metrics": evaluation})
        fields["started_at"] = str(started)
        self.fleet.registry.redis.hset(keys.job_state(self.job_id), mapping=fields)
        self._log("initial global model %s from %s", path, worker)
        return state

    def _restore_handles(self, state: DriverState) -> None:
        for i, saved in enumerate(state.replica_handles):
            if saved is None:
                continue
            record = self.fleet.handle_record(saved["model_id"])
            if record is not None and record.status == "live":
                self.handles[i] = ModelHandle(record.model_id, record.owner, record.queue)

    # ------------------------------------------------------------------ workers

    def _alive_workers(self) -> list[str]:
        return [w.name for w in self.fleet.workers()]

    def _pick_worker(
        self, replica: int, exclude: set[str], busy: dict[str, int] | None = None
    ) -> str:
        deadline = time.monotonic() + self.config.replica_call_timeout_s
        while True:
            alive = self._alive_workers()
            preferred = [w for w in (self.config.workers or []) if w in alive] or alive
            candidates = [w for w in preferred if w not in exclude] or [
                w for w in alive if w not in exclude
            ]
            candidates = candidates or alive
            if candidates:
                if busy:
                    return min(candidates, key=lambda w: (busy.get(w, 0), candidates.index(w)))
                return candidates[replica % len(candidates)]
            if time.monotonic() > deadline:
                raise FleetTimeout("pick_worker", "-", self.config.replica_call_timeout_s)
            time.sleep(0.5)

    def _batches(self, replica: int, round_index: int) -> list[dict[str, Any]]:
        h, n = self.config.inner_steps, self.config.replicas
        return [
            {
                "kind": "micro_epoch",
                "lease_id": f"{self.job_id}/r{round_index}/i{replica}",
                "microshard_ids": [f"shard-{replica}"],
                "ordinals": [round_index * h + step],
                "bytes_len": 0,
                "pipeline_kind": "fleet-diloco",
                "payload": {
                    "replica": replica,
                    "num_replicas": n,
                    "round": round_index,
                    "step": step,
                },
            }
            for step in range(h)
        ]

    # ------------------------------------------------------------------ one replica

    def _launch(
        self,
        state: DriverState,
        replica: int,
        round_index: int,
        attempt: int,
        exclude: set[str],
        busy: dict[str, int],
    ) -> _Attempt:
        """Start replica ``replica`` of the round on a worker (warm handle if current)."""
        cfg = self.config
        root = self.fleet.shared
        tag = f"{self.session}{attempt}"
        out_path = f"{self.run_dir}/round-{round_index:04d}/replica-{replica}-{tag}"
        opt_path = f"{self.run_dir}/replica-{replica}/opt-r{round_index:04d}-{tag}.pt"
        committed = state.replica_opt[replica]
        if committed is not None:
            dest = root.resolve(opt_path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(root.resolve(committed), tmp)
            tmp.replace(dest)
        tried: set[str] = set(exclude)
        while True:
            handle = self.handles[replica]
            try:
                if handle is None or handle.worker in tried:
                    worker = self._pick_worker(replica, tried, busy)
                    handle = self.fleet.import_parameter_pack(
                        state.global_pack,
                        cfg.device,
                        workload=cfg.workload,
                        config=cfg.config,
                        worker=worker,
                        timeout_s=cfg.replica_call_timeout_s,
                    )
                    self.handles[replica] = handle
                future: FleetFuture[RunInnerLoopResult] = self.fleet.run_inner_loop(  # type: ignore[assignment]
                    handle,
                    self._batches(replica, round_index),
                    cfg.inner_steps,
                    out_path,
                    cfg.model_schema_hash,
                    inner_optimizer_state_path=opt_path,
                    input_parameter_pack_path=state.global_pack,
                    wait=False,
                )
                return _Attempt(replica, attempt, handle.worker, handle, future, out_path, opt_path)
            except (RegistryError, RemoteTaskError, FleetTimeout) as exc:
                failed = handle.worker if handle is not None else "?"
                self._log(
                    "replica %d: cannot start on %s (%s); trying another worker",
                    replica,
                    failed,
                    exc,
                    level=logging.WARNING,
                )
                tried.add(failed)
                self.handles[replica] = None

    def _warm_handles(self, state: DriverState) -> None:
        """Import the global pack for every replica without a live handle, in parallel
        (a cold import builds the workload on its worker). Failures are left to
        :meth:`_launch`, which retries on other workers."""
        cfg = self.config
        futures: dict[int, FleetFuture[ModelHandle]] = {}
        busy: dict[str, int] = {}
        for i, handle in enumerate(self.handles):
            if handle is not None:
                record = self.fleet.handle_record(handle.model_id)
                if record is not None and record.status == "live":
                    busy[handle.worker] = busy.get(handle.worker, 0) + 1
                    continue
                self.handles[i] = None
        for i, handle in enumerate(self.handles):
            if handle is not None:
                continue
            try:
                worker = self._pick_worker(i, set(), busy)
                busy[worker] = busy.get(worker, 0) + 1
                futures[i] = self.fleet.import_parameter_pack(  # type: ignore[assignment]
                    state.global_pack,
                    cfg.device,
                    workload=cfg.workload,
                    config=cfg.config,
                    worker=worker,
                    wait=False,
                )
            except (RegistryError, FleetTimeout):
                continue
        for i, future in futures.items():
            try:
                self.handles[i] = future.result(timeout_s=cfg.replica_call_timeout_s)
            except (RegistryError, RemoteTaskError, FleetTimeout) as exc:
                self._log(
                    "replica %d: import failed (%s); will retry", i, exc, level=logging.WARNING
                )

    # ------------------------------------------------------------------ one round

    def run_round(self, state: DriverState, round_index: int) -> DriverState:
        """Run round ``round_index`` from ``state``; return the state after it.

        Raises:
            JobCancelled: the job was cancelled (running replicas are aborted).
            RoundFailed: no replica published a pack.
        """
        cfg = self.config
        started, started_unix = time.monotonic(), time.time()
        deadline = started + cfg.quorum.round_deadline_s if cfg.quorum.round_deadline_s else None
        busy: dict[str, int] = {}
        pending: dict[int, _Attempt] = {}
        tries = dict.fromkeys(range(cfg.replicas), 1)
        self._warm_handles(state)
        for i in range(cfg.replicas):
            pending[i] = self._launch(state, i, round_index, 0, set(), busy)
            busy[pending[i].worker] = busy.get(pending[i].worker, 0) + 1
        done: dict[int, tuple[_Attempt, RunInnerLoopResult, float]] = {}
        errors: list[str] = []
        outcomes: list[dict[str, Any]] = []
        alive: set[str] = set()
        alive_read = float("-inf")
        while pending:
            if self.jobs.is_cancelled(self.job_id):
                self._abort(pending.values())
                raise JobCancelled(self.job_id)
            if time.monotonic() - alive_read >= LIVENESS_INTERVAL_S:
                alive, alive_read = set(self._alive_workers()), time.monotonic()
            for i, attempt in list(pending.items()):
                lost = attempt.worker not in alive
                if attempt.future.ready():
                    try:
                        done[i] = (attempt, attempt.future.result(timeout_s=30), time.time())
                        del pending[i]
                        continue
                    except RemoteTaskError as exc:
                        errors.append(
                            f"replica {i} on {attempt.worker}: {exc.error_type}: {exc.error}"
                        )
                        outcomes.append(
                            self._outcome(attempt, "failed", error=f"{exc.error_type}: {exc.error}")
                        )
                        self._log(
                            "replica %d attempt %d failed on %s: %s",
                            i,
                            attempt.attempt,
                            attempt.worker,
                            exc,
                            level=logging.WARNING,
                        )
                elif lost:
                    outcomes.append(self._outcome(attempt, "lost"))
                    self._log(
                        "replica %d: worker %s lost mid-round; re-queueing from the round's inputs",
                        i,
                        attempt.worker,
                        level=logging.WARNING,
                    )
                    self.handles[i] = None
                else:
                    continue
                busy[attempt.worker] = busy.get(attempt.worker, 1) - 1
                if tries[i] >= cfg.max_attempts:
                    del pending[i]
                    continue
                pending[i] = self._launch(state, i, round_index, tries[i], {attempt.worker}, busy)
                alive_read = float("-inf")  # the new attempt's worker may postdate the last read
                busy[pending[i].worker] = busy.get(pending[i].worker, 0) + 1
                tries[i] += 1
            past_deadline = deadline is not None and time.monotonic() >= deadline
            if len(done) >= cfg.min_replicas or (past_deadline and done):
                break
            time.sleep(POLL_INTERVAL_S)
        if pending:
            self._log(
                "round %d closes with %d/%d replicas; aborting %s",
                round_index,
                len(done),
                cfg.replicas,
                sorted(pending),
            )
            self._abort(pending.values())
            outcomes.extend(self._outcome(a, "aborted") for a in pending.values())
        if not done:
            raise RoundFailed(round_index, errors)
        closed = time.monotonic()
        new_state, merge_s = self._merge(state, round_index, done)
        metrics = {
            "round": round_index,
            "started_at": started_unix,
            "closed_at": started_unix + (closed - started),
            "wall_s": 0.0,
            "merge_s": merge_s,
            "global_pack": new_state.global_pack,
            "replicas": sorted(
                [self._outcome(a, "merged", result=r, finished=f) for a, r, f in done.values()]
                + outcomes,
                key=lambda o: (o["replica"], o["attempt"]),
            ),
        }
        eval_start = time.monotonic()
        metrics["eval"] = self._maybe_evaluate(new_state, round_index, done)
        metrics["eval_s"] = time.monotonic() - eval_start
        metrics["wall_s"] = time.monotonic() - started
        self._commit(new_state, metrics)
        return new_state

    def _outcome(
        self,
        attempt: _Attempt,
        status: str,
        *,
        result: RunInnerLoopResult | None = None,
        finished: float | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        outcome: dict[str, Any] = {
            "replica": attempt.replica,
            "attempt": attempt.attempt,
            "worker": attempt.worker,
            "status": status,
            "started_at": attempt.started_unix_s,
            "finished_at": finished or time.time(),
        }
        if result is not None:
            loss = result.metrics.get("mean_loss", result.metrics.get("loss"))
            if result.started_at:
                outcome["started_at"], outcome["finished_at"] = (
                    result.started_at,
                    result.finished_at,
                )
            outcome.update(
                steps_completed=result.steps_completed,
                loss=loss,
                compute_s=result.compute_s,
                load_s=result.load_s,
                publish_s=result.publish_s,
                pack=attempt.out_path,
                metrics=result.metrics,
            )
        if error is not None:
            outcome["error"] = error
        return outcome

    def _abort(self, attempts: Any) -> None:
        for attempt in attempts:
            attempt.future.cancel()

    def _merge(
        self,
        state: DriverState,
        round_index: int,
        done: dict[int, tuple[_Attempt, RunInnerLoopResult, float]],
    ) -> tuple[DriverState, float]:
        """The outer step over the merged replicas; publishes the next global and momentum."""
        start = time.monotonic()
        root = self.fleet.shared
        manifest, theta = read_pack(root.resolve(state.global_pack))
        order = sorted(done)
        replicas = [read_pack(root.resolve(done[i][0].out_path))[1] for i in order]
        weights = [
            candidate_weight(self.config.merge_policy, float(done[i][1].steps_completed), 1.0)
            for i in order
        ]
        momentum = read_pack(root.resolve(state.momentum_pack))[1] if state.momentum_pack else None
        avg = average(replicas, weights, str(self.config.merge_policy))
        new_theta, new_momentum = outer_step(theta, avg, momentum, self.config.outer)
        nxt = f"{self.run_dir}/round-{round_index + 1:04d}"
        write_values_pack(root.resolve(f"{nxt}/global"), new_theta.contiguous(), manifest)
        write_values_pack(root.resolve(f"{nxt}/momentum"), new_momentum.contiguous(), manifest)
        replica_opt = list(state.replica_opt)
        for i in order:
            replica_opt[i] = done[i][0].opt_path
        handles = [
            {"model_id": h.model_id, "worker": h.worker} if h is not None else None
            for h in self.handles
        ]
        new_state = DriverState(
            round_index + 1, f"{nxt}/global", f"{nxt}/momentum", replica_opt, handles
        )
        return new_state, time.monotonic() - start

    def _maybe_evaluate(
        self,
        state: DriverState,
        round_index: int,
        done: dict[int, tuple[_Attempt, RunInnerLoopResult, float]],
    ) -> dict[str, Any] | None:
        every = self.config.eval_every
        last = round_index == self.config.rounds - 1
        if not every or ((round_index + 1) % every and not last):
            return None
        for i in sorted(done):
            handle = self.handles[i]
            if handle is None:
                continue
            try:
                self.fleet.load_parameter_pack(
                    handle, state.global_pack, timeout_s=self.config.replica_call_timeout_s
                )
                return self.fleet.evaluate(
                    handle, self.config.eval_split, timeout_s=self.config.replica_call_timeout_s
                )
            except (RegistryError, RemoteTaskError, FleetTimeout) as exc:
                self._log("evaluation on %s failed: %s", handle.worker, exc, level=logging.WARNING)
        handle = self.fleet.import_parameter_pack(
            state.global_pack,
            self.config.device,
            workload=self.config.workload,
            config=self.config.config,
            timeout_s=self.config.replica_call_timeout_s,
        )
        try:
            return self.fleet.evaluate(
                handle, self.config.eval_split, timeout_s=self.config.replica_call_timeout_s
            )
        finally:
            self.fleet.release_model(handle)

    def _commit(self, state: DriverState, metrics: dict[str, Any]) -> None:
        redis = self.fleet.registry.redis
        with redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job_state(self.job_id), mapping=state.to_redis())
            pipe.rpush(keys.job_metrics(self.job_id), json.dumps(metrics))
            pipe.execute()
        # the round's checkpoint: global pack, with its momentum and optimizer states beside
        self.jobs.add_artifact(self.job_id, "checkpoint", state.global_pack)
        loss = metrics["eval"].get("loss") if metrics["eval"] else None
        merged = sum(1 for r in metrics["replicas"] if r["status"] == "merged")
        self._log(
            "round %d closed: %d/%d replicas merged, wall %.2fs, merge %.3fs, eval loss %s",
            metrics["round"],
            merged,
            self.config.replicas,
            metrics["wall_s"],
            metrics["merge_s"],
            loss,
        )
        if self.on_round is not None:
            self.on_round(metrics)

    # ------------------------------------------------------------------ the run

    def run(self) -> Job:
        """Run (or continue) the job to its end; return its final record.

        A cancelled job stops within one inner step of its running replicas. Errors mark
        the job ``failed`` and are raised.
        """
        job = self.jobs.get(self.job_id)
        if job.status in TERMINAL:
            return job
        self.jobs.set_status(self.job_id, "running")
        try:
            state = self._load_state()
            if state is None:
                state = self._initial_state()
            else:
                self._restore_handles(state)
                self._log("resuming at round %d (global %s)", state.next_round, state.global_pack)
            started = float(
                self.fleet.registry.redis.hget(keys.job_state(self.job_id), "started_at")
                or time.time()
            )
            for round_index in range(state.next_round, self.config.rounds):
                state = self.run_round(state, round_index)
                budget = self.config.max_wall_s
                if budget is not None and time.time() - started >= budget:
                    self._log(
                        "wall-clock budget of %.1fs reached after round %d", budget, round_index
                    )
                    break
            self.jobs.add_artifact(self.job_id, "final_pack", state.global_pack)
            self.jobs.add_artifact(self.job_id, "run_dir", self.run_dir)
            self._release_handles()
            return self.jobs.set_status(self.job_id, "completed")
        except JobCancelled:
            self._log("cancelled", level=logging.WARNING)
            self._release_handles()
            return self.jobs.get(self.job_id)
        except Exception as exc:
            self._log("failed: %s: %s", type(exc).__name__, exc, level=logging.ERROR)
            if self.jobs.get(self.job_id).status not in TERMINAL:
                self.jobs.set_status(self.job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            raise

    def _release_handles(self) -> None:
        for i, handle in enumerate(self.handles):
            if handle is None:
                continue
            with contextlib.suppress(FleetError):
                self.fleet.release_model(handle, timeout_s=30)
            self.handles[i] = None

    def metrics(self) -> list[dict[str, Any]]:
        """The metrics record of every completed round."""
        return self.jobs.metrics(self.job_id)

    def initial_eval(self) -> dict[str, Any] | None:
        """``{"at": unix s, "metrics": {...}}`` of the initial model, if it was evaluated."""
        raw = self.fleet.registry.redis.hget(keys.job_state(self.job_id), "initial_eval")
        return json.loads(raw) if raw else None

    def started_at(self) -> float | None:
        """Unix time the run started (before the initial model was built)."""
        raw = self.fleet.registry.redis.hget(keys.job_state(self.job_id), "started_at")
        return float(raw) if raw else None


__all__ = ["DiLoCoRun", "DriverState", "JobCancelled", "RoundFailed"]
