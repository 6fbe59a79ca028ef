"""A round's wait for its replicas: collect finished attempts, re-run failed and lost
ones on another worker (up to ``max_attempts``), and close the round once
:func:`quorum_reached`, aborting the attempts still running (their microshards go back
to the epoch at commit)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fleet.diloco.attempts import Attempts, Running
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.context import FATAL, RunContext
from fleet.diloco.liveness import Liveness
from fleet.diloco.placement import replacement_worker
from fleet.diloco.recovery import republish_after_corrupt_step
from fleet.diloco.state import Attempt
from fleet.errors import CodecError, FleetError, RoundFailed
from fleet.protocol import ReplicaRoundResult

Done = dict[int, tuple[Attempt, ReplicaRoundResult]]
#: Seconds a gap between two looks at the running attempts counts for, at most, towards
#: the round's deadline.
MAX_UNSEEN_S = 1.0


def quorum_reached(config: DiLoCoConfig, done: int, pending: int, deadline_passed: bool) -> bool:
    """A round closes once ``min_replicas`` replicas published, or its deadline passed
    with at least one published, or no attempt is left running."""
    return done >= config.min_replicas or (deadline_passed and done > 0) or pending == 0


@dataclass
class QuorumWait:
    """The wait of one round, from its launched attempts."""

    ctx: RunContext
    attempts: Attempts
    pending: dict[int, Running]
    started: float
    """When the round started (monotonic s): deadlines count from here."""
    done: Done = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    deadline_s: float | None = None
    orphaned: dict[int, float] = field(default_factory=dict)
    """Replicas kept although their worker looks lost, with no worker alive to re-run
    them on: since when (monotonic s)."""
    regained: bool = False
    """A worker came back while replicas were kept: the others got their grace."""

    def run(self) -> Done:
        """Wait until the round closes; the attempts to merge, by replica.

        Raises:
            JobCancelled: the job was cancelled (running attempts are aborted).
            RoundFailed: no attempt published.
            DatasetError, JobError, StorageFullError: an attempt failed for good.
        """
        cfg = self.ctx.config
        self.deadline_s = self.ctx.deadline.deadline_s()
        self.done.update(self.attempts.adopted)
        self.tries = dict.fromkeys(range(cfg.replicas), 1)
        # the deadline counts the time this loop saw: a stretch it could not look (Redis
        # away, the orchestrator stalled) counts as MAX_UNSEEN_S, so an outage cuts no one
        last = time.monotonic()
        seen_s = last - self.started
        for liveness in self.ctx.poll(
            lambda: self.attempts.abort(self.pending.values(), "cancelled")
        ):
            for i, running in list(self.pending.items()):
                self._look(i, running, liveness)
            now = time.monotonic()
            seen_s, last = seen_s + min(now - last, MAX_UNSEEN_S), now
            past = self.deadline_s is not None and seen_s >= self.deadline_s
            if quorum_reached(cfg, len(self.done), len(self.pending), past):
                break
        if self.pending:
            self.ctx.log(
                "round %d closes with %d/%d replicas%s; aborting %s",
                self.attempts.index,
                len(self.done),
                cfg.replicas,
                f" at its {self.deadline_s:.2f}s deadline" if self.deadline_s else "",
                sorted(self.pending),
            )
            self.attempts.abort(self.pending.values(), None)
        if not self.done:
            raise RoundFailed(self.attempts.index, self.errors)
        return self.done

    def _look(self, i: int, running: Running, liveness: Liveness) -> None:
        """Collect ``running`` if it finished; re-run it if it failed or its worker died."""
        ctx, attempt = self.ctx, running.attempt
        if running.future.ready():
            try:
                attempt.result = running.future.result(timeout_s=60)
                ctx.store.save_plan(self.attempts.plan)  # a new owner would adopt it
                self.done[i] = (attempt, attempt.result)
                self.attempts.finished.append(attempt.worker)
                del self.pending[i]
                return
            except FleetError as exc:
                if isinstance(exc, FATAL):
                    self.attempts.abort(self.pending.values(), f"{type(exc).__name__}")
                    raise
                error = f"{type(exc).__name__}: {getattr(exc, 'error', exc)}"
                self.errors.append(f"replica {i} on {attempt.worker}: {error}")
                self.attempts.outcomes.append(self.attempts.outcome(attempt, "failed", error=error))
                ctx.log(
                    "replica %d attempt %d failed on %s: %s",
                    i,
                    attempt.attempt,
                    attempt.worker,
                    error,
                    level=logging.WARNING,
                )
                others = [w for w in self.attempts.finished if w != attempt.worker]
                others += [w for w in sorted(liveness.alive()) if w not in others]
                republished = republish_after_corrupt_step(
                    ctx, self.attempts.state, exc, [w for w in others if w != attempt.worker]
                )
                if republished is not None:
                    self.attempts.state = republished
        elif liveness.lost(attempt.worker):
            if self._waits_for_a_worker(i, attempt, liveness):
                return
            self.errors.append(f"replica {i} on {attempt.worker}: its worker was lost")
            self.attempts.outcomes.append(self.attempts.outcome(attempt, "lost"))
            ctx.fleet.registry.request_abort(attempt.task_id)  # if it ever runs again
            self.attempts.abandon(i)
            ctx.log(
                "replica %d: worker %s lost mid-round; re-running from the round's inputs",
                i,
                attempt.worker,
                level=logging.WARNING,
            )
        else:
            if i in self.orphaned and attempt.worker in liveness.alive():
                del self.orphaned[i]
                ctx.log("replica %d: worker %s is back", i, attempt.worker)
            return
        del self.pending[i]
        self._rerun(i, attempt, liveness)

    def _waits_for_a_worker(self, i: int, attempt: Attempt, liveness: Liveness) -> bool:
        """True while replica ``i``'s attempt is kept although its worker looks lost: no
        worker is alive to re-run it on, and ``lost_worker_wait_s`` has not passed since
        that was first seen. Every worker lost at once is more likely a cut link (this
        orchestrator's, or a site's) than as many deaths, and abandoning the attempts
        would leave the round nothing to run: it would fail.

        When the first worker comes back while attempts are kept, the link is healing
        and the other workers reconnect on their own backoff: they get the liveness
        grace (a heartbeat TTL and the longest backoff pause) once, before their
        replicas are re-run on the workers that are back."""
        if liveness.alive():
            if self.orphaned and not self.regained:
                self.regained = True
                liveness.start_grace()
                self.ctx.log(
                    "a worker is back while replicas wait for theirs: "
                    "they get %g s to come back too",
                    liveness.grace_s,
                )
                return True
            self.orphaned.pop(i, None)
            return False
        now = time.monotonic()
        since = self.orphaned.setdefault(i, now)
        wait_s = self.ctx.config.lost_worker_wait_s
        if since == now and wait_s > 0:
            self.ctx.log(
                "replica %d: worker %s looks lost and no worker is alive; "
                "waiting up to %g s for one",
                i,
                attempt.worker,
                wait_s,
                level=logging.WARNING,
            )
        return now - since < wait_s

    def _rerun(self, i: int, attempt: Attempt, liveness: Liveness) -> None:
        cfg = self.ctx.config
        load = {r.attempt.worker: 1 for r in self.pending.values()}
        alive = sorted(liveness.alive())
        worker = replacement_worker(alive, load, {attempt.worker}, cfg.workers)
        if self.tries[i] >= cfg.max_attempts or worker is None:
            why = "no worker is alive" if worker is None else f"{cfg.max_attempts} tries spent"
            self._not_rerun(i, why)
            return
        try:
            self.pending[i] = self.attempts.start(i, worker, {attempt.worker}, liveness.lost)
        except FleetError as exc:
            if isinstance(exc, (*FATAL, CodecError)):
                raise
            self._not_rerun(i, str(exc))
            return
        self.tries[i] += 1
        liveness.refresh()

    def _not_rerun(self, i: int, why: str) -> None:
        self.errors.append(f"replica {i} not re-run: {why}")
        self.ctx.log("replica %d is not re-run: %s", i, why, level=logging.WARNING)
