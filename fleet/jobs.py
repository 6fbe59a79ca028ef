"""Jobs: every run persisted in Redis, so it survives an orchestrator restart.

A job has an id, a ``kind`` (``"diloco"``, ...), its ``spec`` (JSON), a status with the
time of each transition (``new`` -> ``scheduled`` -> ``running`` -> ``completed`` |
``failed`` | ``cancelled``; a failed or cancelled job may run again when resumed),
artifacts (name -> shared-root path), one record per round, and logs: the log lines of
the job's tasks, written by the workers into a Redis Stream in order, each with its
worker and task id. Cancelling sets the status and asks every running task of the job
to abort at its next step boundary.

**One owner at a time.** An orchestrator running a job holds its owner lease
(:class:`JobLease`): a key with a TTL, renewed by a heartbeat, and a fencing token (a
counter each new owner increments). Every write of the owner (its state, the plan of
the round in flight, a round's commit, status changes) is checked against the token
atomically, and the job's tasks carry it too: an orchestrator that lost the job can
change nothing. A ``running`` job whose lease expired shows as ``orphaned``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from logging.handlers import QueueHandler, QueueListener
from typing import Any, Literal

from pydantic import BaseModel

from fleet import keys
from fleet.errors import FencedOutError, FleetError, JobNotFound, JobOwnedError, JobStateError
from fleet.registry import Registry
from fleet.settings import FleetSettings

log = logging.getLogger("fleet.jobs")

JobStatus = Literal["new", "scheduled", "running", "completed", "failed", "cancelled"]
#: Statuses in which no orchestrator runs the job.
TERMINAL: tuple[JobStatus, ...] = ("completed", "failed", "cancelled")
#: Allowed transitions. ``completed`` is final; a failed or cancelled job runs again when
#: it is resumed.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "new": ("scheduled", "running", "failed", "cancelled"),
    "scheduled": ("running", "failed", "cancelled"),
    "running": ("running", "completed", "failed", "cancelled"),
    "failed": ("running",),
    "cancelled": ("running",),
}
#: How long a job's task set is kept after its last change (seconds).
TASK_SET_TTL_S = 2 * 24 * 3600
#: Lines kept per job log stream (older ones are trimmed).
MAX_LOG_LINES = 100_000


class Job(BaseModel):
    """A job's record. ``owner``: its live owner lease, if any."""

    job_id: str
    kind: str
    spec: dict[str, Any]
    status: JobStatus
    status_times: dict[str, float]
    artifacts: dict[str, str]
    error: str | None = None
    owner: dict[str, Any] | None = None

    @property
    def created_at(self) -> float:
        return self.status_times["new"]

    @property
    def shown_status(self) -> str:
        """The status, or ``"orphaned"`` for a running job whose owner stopped
        heartbeating (resume it, or cancel it)."""
        return "orphaned" if self.status == "running" and self.owner is None else self.status


class LogLine(BaseModel):
    """One log line of a job: stream ``id`` (orders lines), ``ts`` (unix s), ``worker``,
    ``task_id``, ``level``, ``logger``, ``line``."""

    id: str
    ts: float
    worker: str
    task_id: str
    level: str
    logger: str
    line: str

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> LogLine:
        """A line from a stream entry (``XRANGE`` / ``XREAD`` reply)."""
        return cls(
            id=entry_id,
            ts=float(fields["ts"]),
            worker=fields["worker"],
            task_id=fields["task_id"],
            level=fields["level"],
            logger=fields["logger"],
            line=fields["line"],
        )


#: Captured output lines kept per executor replica, and for how long (seconds).
MAX_REPLICA_LOG_LINES = 10_000
REPLICA_LOG_TTL_S = 7 * 24 * 3600


class JobStore:
    """Jobs in Redis, through the registry's client (abort flags go through
    :meth:`Registry.request_abort`, their one writer)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.redis: Any = registry.redis
        self._owner = self.redis.register_script(_load_script("job_owner.lua"))
        self._write = self.redis.register_script(_load_script("job_write.lua"))

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> JobStore:
        """A store on a new registry client for ``settings``."""
        return cls(Registry.from_settings(settings))

    def create(self, kind: str, spec: dict[str, Any], *, job_id: str | None = None) -> Job:
        """A new job in status ``new``."""
        job_id = job_id or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.job(job_id),
                mapping={
                    "job_id": job_id,
                    "kind": kind,
                    "spec": json.dumps(spec),
                    "status": "new",
                    "status_times": json.dumps({"new": now}),
                },
            )
            pipe.zadd(keys.JOBS, {job_id: now})
            pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        """The job's record.

        Raises:
            JobNotFound: no such job.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.hgetall(keys.job_artifacts(job_id))
            pipe.get(keys.job_owner(job_id))
            raw, artifacts, owner = pipe.execute()
        if not raw:
            raise JobNotFound(job_id)
        return Job(
            job_id=raw["job_id"],
            kind=raw["kind"],
            spec=json.loads(raw["spec"]),
            status=raw["status"],
            status_times=json.loads(raw["status_times"]),
            artifacts=artifacts,
            error=raw.get("error") or None,
            owner=json.loads(owner) if owner else None,
        )

    def list_jobs(self, *, limit: int = 50) -> list[Job]:
        """The newest ``limit`` jobs, newest first."""
        ids = self.redis.zrevrange(keys.JOBS, 0, limit - 1)
        return [self.get(i) for i in ids if self.redis.exists(keys.job(i))]

    def set_status(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        token: int | None = None,
    ) -> Job:
        """Move the job to ``status`` (atomically, with its timestamp; ``error`` replaces
        the recorded error, a run clears it). With ``token``, only while it is still the
        job's fencing token.

        Raises:
            JobNotFound: no such job.
            JobStateError: the transition is not allowed (e.g. out of ``completed``).
            FencedOutError: ``token`` is stale.
        """
        key, fence = keys.job(job_id), keys.job_fence(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key, fence)
                    current = pipe.hget(key, "status")
                    if current is None:
                        raise JobNotFound(job_id)
                    if token is not None and int(pipe.get(fence) or 0) != token:
                        raise FencedOutError(job_id, token, int(pipe.get(fence) or 0))
                    if status not in TRANSITIONS.get(current, ()):
                        raise JobStateError(job_id, current, status)
                    times = json.loads(pipe.hget(key, "status_times"))
                    times[status] = time.time()
                    pipe.multi()
                    fields = {"status": status, "status_times": json.dumps(times)}
                    if error is not None:
                        fields["error"] = error
                    pipe.hset(key, mapping=fields)
                    if status == "running":
                        pipe.hdel(key, "error")
                    pipe.execute()
                    break
                except Exception as exc:
                    from redis import WatchError

                    if isinstance(exc, WatchError):
                        continue
                    raise
        return self.get(job_id)

    def add_artifact(self, job_id: str, name: str, path: str) -> None:
        """Record an artifact (a shared-root-relative path) under ``name``, atomically
        (one field of the job's artifact hash)."""
        self.redis.hset(keys.job_artifacts(job_id), name, path)

    def add_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        """Append one metrics record (e.g. one round's)."""
        self.redis.rpush(keys.job_metrics(job_id), json.dumps(metrics))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics record, in order."""
        return [json.loads(m) for m in self.redis.lrange(keys.job_metrics(job_id), 0, -1)]

    def record_checkpoint(self, job_id: str, name: str, checkpoint_json: str) -> None:
        """Record a checkpoint that landed on the shared root (written by the worker that
        published it, not fenced: it states a fact about files; the orchestrator decides
        whether to use it)."""
        self.redis.hset(keys.job_checkpoints(job_id), name, checkpoint_json)

    def checkpoints(self, job_id: str) -> dict[str, str]:
        """Every landed checkpoint of the job, by name (see :func:`fleet.keys.job_checkpoints`)."""
        return dict(self.redis.hgetall(keys.job_checkpoints(job_id)))

    def forget_checkpoints(self, job_id: str, *names: str) -> None:
        """Drop the records of checkpoints that were deleted."""
        if names:
            self.redis.hdel(keys.job_checkpoints(job_id), *names)

    def record_evaluation(self, job_id: str, round_index: int, evaluation_json: str) -> None:
        """Record the evaluation of round ``round_index``'s committed global model, run
        beside later rounds (not fenced: it states a fact about a committed model)."""
        self.redis.hset(keys.job_evaluations(job_id), str(round_index), evaluation_json)

    def evaluations(self, job_id: str) -> dict[int, str]:
        """Every evaluation recorded with :meth:`record_evaluation`, by round."""
        return {int(k): v for k, v in self.redis.hgetall(keys.job_evaluations(job_id)).items()}

    # ------------------------------------------------------------------ ownership

    def claim(self, job_id: str, *, host: str, pid: int, ttl_s: float) -> int:
        """Take the job's owner lease for ``ttl_s`` seconds; return the new fencing token.

        Raises:
            JobOwnedError: a live orchestrator holds the lease (named in the error).
        """
        owner = json.dumps({"host": host, "pid": pid, "heartbeat_at": time.time()})
        token, current = self._owner(
            keys=[keys.job_owner(job_id), keys.job_fence(job_id)],
            args=["claim", owner, int(ttl_s * 1000), 0],
        )
        if int(token):
            return int(token)
        holder = json.loads(current)
        age = time.time() - float(holder.get("heartbeat_at", 0))
        raise JobOwnedError(job_id, str(holder.get("host")), int(holder.get("pid", 0)), age)

    def renew(self, job_id: str, token: int, *, host: str, pid: int, ttl_s: float) -> bool:
        """Extend the owner lease of ``token``; False if a newer owner holds the job."""
        owner = json.dumps({"host": host, "pid": pid, "heartbeat_at": time.time()})
        renewed, _ = self._owner(
            keys=[keys.job_owner(job_id), keys.job_fence(job_id)],
            args=["renew", owner, int(ttl_s * 1000), token],
        )
        return bool(int(renewed))

    def release(self, job_id: str, token: int) -> None:
        """Give up the owner lease of ``token`` (a newer owner's lease stays)."""
        self._owner(
            keys=[keys.job_owner(job_id), keys.job_fence(job_id)],
            args=["release", "{}", 0, token],
        )

    def _owned_write(self, job_id: str, token: int, *args: str) -> None:
        written = int(
            self._write(
                keys=[
                    keys.job_fence(job_id),
                    keys.job_state(job_id),
                    keys.job_metrics(job_id),
                    keys.job(job_id),
                ],
                args=[token, *args],
            )
        )
        if written != token:
            raise FencedOutError(job_id, token, -written)

    def put_plan(self, job_id: str, token: int, plan_json: str) -> None:
        """Record the plan of the round in flight (fenced)."""
        self._owned_write(job_id, token, "plan", plan_json)

    def put_spec(self, job_id: str, token: int, spec: dict[str, Any]) -> None:
        """Replace the job's spec (fenced): a resumed run that was given more rounds."""
        self._owned_write(job_id, token, "spec", json.dumps(spec))

    def put_state(self, job_id: str, token: int, state_json: str) -> None:
        """Record the driver's state (fenced)."""
        self._owned_write(job_id, token, "state", state_json)

    def commit_round(self, job_id: str, token: int, state_json: str, record_json: str) -> None:
        """Commit a round in one transaction: the new state, the round's record appended,
        the plan dropped (fenced).

        Raises:
            FencedOutError: ``token`` is stale; nothing is written.
        """
        self._owned_write(job_id, token, "commit", state_json, record_json)

    def fence(self, job_id: str) -> int:
        """The job's current fencing token (0 before any owner)."""
        return int(self.redis.get(keys.job_fence(job_id)) or 0)

    def driver_state(self, job_id: str) -> tuple[str | None, str | None]:
        """``(state JSON, in-flight plan JSON)`` of the job's driver (None when unset)."""
        state, plan = self.redis.hmget(keys.job_state(job_id), ["state", "plan"])
        return state, plan

    # ------------------------------------------------------------------ tasks and cancel

    def track_task(self, job_id: str, task_id: str) -> None:
        """Note a running task of the job (aborted on cancel)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(keys.job_tasks(job_id), task_id)
            pipe.expire(keys.job_tasks(job_id), TASK_SET_TTL_S)
            pipe.execute()

    def untrack_task(self, job_id: str, *task_ids: str) -> None:
        """Forget tasks of the job that ended (or were given up)."""
        if task_ids:
            self.redis.srem(keys.job_tasks(job_id), *task_ids)

    def tracked_tasks(self, job_id: str) -> set[str]:
        """The job's tasks that may still run."""
        return set(self.redis.smembers(keys.job_tasks(job_id)))

    def cancel(self, job_id: str) -> Job:
        """Mark the job cancelled and ask each of its running tasks to abort at its next
        step boundary. A job already finished is returned unchanged."""
        job = self.get(job_id)
        if job.status in TERMINAL:
            return job
        self.registry.request_abort(*self.tracked_tasks(job_id))
        return self.set_status(job_id, "cancelled")

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.hget(keys.job(job_id), "status") == "cancelled")

    # ------------------------------------------------------------------ executor replicas

    def append_replica_lines(self, task_id: str, lines: list[str]) -> None:
        """Add captured output lines of an executor replica (the newest
        :data:`MAX_REPLICA_LOG_LINES` are kept, for :data:`REPLICA_LOG_TTL_S`)."""
        if not lines:
            return
        key = keys.replica_logs(task_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *lines)
            pipe.ltrim(key, -MAX_REPLICA_LOG_LINES, -1)
            pipe.expire(key, REPLICA_LOG_TTL_S)
            pipe.execute()

    def replica_lines(self, task_id: str, n_lines: int) -> list[str]:
        """The last ``n_lines`` captured lines of an executor replica."""
        return list(self.redis.lrange(keys.replica_logs(task_id), -n_lines, -1))

    # ------------------------------------------------------------------ logs

    def append_log(
        self, job_id: str, *, worker: str, task_id: str, level: str, logger: str, line: str
    ) -> None:
        """Add one line to the job's log stream."""
        self.redis.xadd(
            keys.job_logs(job_id),
            {
                "ts": str(time.time()),
                "worker": worker,
                "task_id": task_id,
                "level": level,
                "logger": logger,
                "line": line,
            },
            maxlen=MAX_LOG_LINES,
            approximate=True,
        )

    def logs(self, job_id: str, *, after: str = "-", count: int | None = None) -> list[LogLine]:
        """Log lines after stream id ``after`` (exclusive; ``"-"``: from the start)."""
        start = "-" if after == "-" else f"({after}"
        entries = self.redis.xrange(keys.job_logs(job_id), min=start, count=count)
        return [LogLine.from_entry(i, f) for i, f in entries]

    def follow(self, job_id: str, *, block_ms: int = 1000) -> Iterator[LogLine]:
        """Every log line, then new ones as they arrive, until the job is finished and
        no line is pending."""
        last = "0-0"
        while True:
            reply = self.redis.xread({keys.job_logs(job_id): last}, block=block_ms, count=500)
            lines = reply[0][1] if reply else []
            for entry_id, f in lines:
                last = entry_id
                yield LogLine.from_entry(entry_id, f)
            if not lines and self.get(job_id).status in TERMINAL:
                return


#: Log lines of a task kept in memory while Redis is away (older ones are dropped).
LOG_QUEUE_LINES = 10_000
#: Loggers whose records never go to a job's log (the plumbing's own retries).
PLUMBING_LOGGERS = ("celery", "kombu", "redis", "amqp", "fleet.redis", "fleet.progress")


class JobLogHandler(logging.Handler):
    """Writes log records emitted while a job's task runs on a worker to the job's log
    stream (one stream entry per line). Records of the plumbing (Celery, kombu, Redis
    retries) are left out; a failure to write is reported once, not per record."""

    def __init__(self, store: JobStore, job_id: str, worker: str, task_id: str) -> None:
        super().__init__(level=logging.INFO)
        self.store = store
        self.job_id = job_id
        self.worker = worker
        self.task_id = task_id
        self.failing = False
        self.addFilter(lambda r: not r.name.startswith(PLUMBING_LOGGERS))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in record.getMessage().splitlines() or [""]:
                self.store.append_log(
                    self.job_id,
                    worker=self.worker,
                    task_id=self.task_id,
                    level=record.levelname,
                    logger=record.name,
                    line=line,
                )
            self.failing = False
        except Exception as exc:
            if not self.failing:
                log.warning("job %s: log lines not shipped (%s)", self.job_id, exc)
            self.failing = True


class _DroppingQueueHandler(QueueHandler):
    """A QueueHandler that drops a record when its queue is full (a long outage)."""

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


@contextmanager
def job_log(store: JobStore, job_id: str, worker: str, task_id: str) -> Iterator[None]:
    """While the block runs, log records go to the job's log stream through a queue and a
    thread of their own (logging.handlers.QueueListener), so a task never waits for
    Redis to log a line; up to :data:`LOG_QUEUE_LINES` are kept through an outage."""
    lines: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=LOG_QUEUE_LINES)
    listener = QueueListener(
        lines, JobLogHandler(store, job_id, worker, task_id), respect_handler_level=True
    )
    handler = _DroppingQueueHandler(lines)
    root = logging.getLogger()
    listener.start()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        listener.stop()


def _load_script(name: str) -> str:
    return resources.files("fleet.lua").joinpath(name).read_text(encoding="utf-8")


class JobLease:
    """An orchestrator's ownership of a job: claims the owner lease on entry, renews it
    from a thread every ``ttl_s / 3`` seconds, releases it on exit. ``token`` is the
    fencing token; :meth:`check` raises once a newer owner took the job over.

    Raises:
        JobOwnedError: (on entry) a live orchestrator owns the job.
    """

    def __init__(self, store: JobStore, job_id: str, ttl_s: float) -> None:
        self.store = store
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = 0
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> JobLease:
        self.token = self.store.claim(self.job_id, host=self.host, pid=self.pid, ttl_s=self.ttl_s)
        self._thread = threading.Thread(target=self._renew, name="fleet-job-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.store.renew(
                    self.job_id, self.token, host=self.host, pid=self.pid, ttl_s=self.ttl_s
                ):
                    log.warning("job %s was taken over by a newer orchestrator", self.job_id)
                    self.lost.set()
                    return
            except FleetError:  # Redis away: the client logs the outage once; renew again
                continue

    def check(self) -> None:
        """Raise if this orchestrator no longer owns the job.

        Raises:
            FencedOutError: a newer owner took the job over.
        """
        if self.lost.is_set():
            raise FencedOutError(self.job_id, self.token, None)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.store.release(self.job_id, self.token)
        except FleetError as error:  # Redis away: the lease expires by itself
            log.warning("could not release job %s: %s", self.job_id, error)
