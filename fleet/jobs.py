"""Jobs: every run persisted in Redis, so it survives an orchestrator restart.

A job has an id, a ``kind`` (``"diloco"``, ...), its ``spec`` (JSON), a status with the
time of each transition (``new`` -> ``scheduled`` -> ``running`` -> ``completed`` |
``failed`` | ``cancelled``), artifacts (name -> shared-root path), metrics per round,
and logs: the log lines of the job's tasks, written by the workers into a Redis Stream
in order, each with its worker and task id. Cancelling sets the status and asks every
running task of the job to abort at its next step boundary.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel

from fleet import keys
from fleet.errors import JobNotFound, JobStateError

JobStatus = Literal["new", "scheduled", "running", "completed", "failed", "cancelled"]
TERMINAL: tuple[JobStatus, ...] = ("completed", "failed", "cancelled")
#: Allowed transitions; a terminal status never changes again.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "new": ("scheduled", "running", "failed", "cancelled"),
    "scheduled": ("running", "failed", "cancelled"),
    "running": ("running", "completed", "failed", "cancelled"),
}
#: Lines kept per job log stream (older ones are trimmed).
MAX_LOG_LINES = 100_000


class Job(BaseModel):
    """A job's record."""

    job_id: str
    kind: str
    spec: dict[str, Any]
    status: JobStatus
    status_times: dict[str, float]
    artifacts: dict[str, str]
    error: str | None = None

    @property
    def created_at(self) -> float:
        return self.status_times["new"]


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


class JobStore:
    """Jobs in Redis. ``redis`` is a client with ``decode_responses=True``."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

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
                    "artifacts": "{}",
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
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return Job(
            job_id=raw["job_id"],
            kind=raw["kind"],
            spec=json.loads(raw["spec"]),
            status=raw["status"],
            status_times=json.loads(raw["status_times"]),
            artifacts=json.loads(raw.get("artifacts") or "{}"),
            error=raw.get("error") or None,
        )

    def list_jobs(self, *, limit: int = 50) -> list[Job]:
        """The newest ``limit`` jobs, newest first."""
        ids = self.redis.zrevrange(keys.JOBS, 0, limit - 1)
        return [self.get(i) for i in ids if self.redis.exists(keys.job(i))]

    def set_status(self, job_id: str, status: JobStatus, *, error: str | None = None) -> Job:
        """Move the job to ``status`` (atomically, with its timestamp).

        Raises:
            JobNotFound: no such job.
            JobStateError: the transition is not allowed (e.g. out of a terminal status).
        """
        key = keys.job(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.hget(key, "status")
                    if current is None:
                        raise JobNotFound(job_id)
                    if status not in TRANSITIONS.get(current, ()):
                        raise JobStateError(job_id, current, status)
                    times = json.loads(pipe.hget(key, "status_times"))
                    times[status] = time.time()
                    pipe.multi()
                    fields = {"status": status, "status_times": json.dumps(times)}
                    if error is not None:
                        fields["error"] = error
                    pipe.hset(key, mapping=fields)
                    pipe.execute()
                    break
                except Exception as exc:
                    from redis import WatchError

                    if isinstance(exc, WatchError):
                        continue
                    raise
        return self.get(job_id)

    def add_artifact(self, job_id: str, name: str, path: str) -> None:
        """Record an artifact (a shared-root-relative path) under ``name``."""
        job = self.get(job_id)
        artifacts = {**job.artifacts, name: path}
        self.redis.hset(keys.job(job_id), "artifacts", json.dumps(artifacts))

    def add_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        """Append one metrics record (e.g. one round's)."""
        self.redis.rpush(keys.job_metrics(job_id), json.dumps(metrics))

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        """Every metrics record, in order."""
        return [json.loads(m) for m in self.redis.lrange(keys.job_metrics(job_id), 0, -1)]

    # ------------------------------------------------------------------ tasks and cancel

    def track_task(self, job_id: str, task_id: str) -> None:
        """Note a running task of the job (aborted on cancel)."""
        self.redis.sadd(keys.job_tasks(job_id), task_id)

    def untrack_task(self, job_id: str, task_id: str) -> None:
        self.redis.srem(keys.job_tasks(job_id), task_id)

    def cancel(self, job_id: str) -> Job:
        """Mark the job cancelled and ask each of its running tasks to abort at its next
        step boundary. A job already finished is returned unchanged."""
        job = self.get(job_id)
        if job.status in TERMINAL:
            return job
        for task_id in self.redis.smembers(keys.job_tasks(job_id)):
            self.redis.set(keys.abort(task_id), "1", ex=24 * 3600)
        return self.set_status(job_id, "cancelled")

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.hget(keys.job(job_id), "status") == "cancelled")

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


class JobLogHandler(logging.Handler):
    """Forwards log records emitted while a job's task runs on a worker to the job's
    log stream (installed by the task layer for the task's duration)."""

    def __init__(self, store: JobStore, job_id: str, worker: str, task_id: str) -> None:
        super().__init__(level=logging.INFO)
        self.store = store
        self.job_id = job_id
        self.worker = worker
        self.task_id = task_id

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
        except Exception:
            self.handleError(record)
