"""fleet's task for the executor: run an allowlisted entrypoint as one replica.

Not a protocol method: ``fleet.run_entrypoint`` imports ``module:attr`` (or a dotted
path ``module.attr``) if it is on the worker's allowlist, sets the replica's rank in the
environment, captures its stdout, stderr and log records line by line into Redis (for
``stream_logs``), and calls it with the given arguments. A cancel raises
:class:`~fleet.errors.TaskAborted` inside the entrypoint (by the soft-time-limit signal,
which leaves the worker process and the models it holds alive).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from fleet.errors import TaskAborted
from fleet.jobs import JobStore
from fleet.tasks.base import get_runtime
from fleet.workload import check_allowed, import_object


def resolve_entrypoint(entrypoint: str, allowlist: list[str]) -> Any:
    """The callable named by ``module:attr`` or ``package.module.attr``.

    Raises:
        BadFactorySpecError, NotAllowlistedError: see :func:`fleet.workload.check_allowed`.
        FactoryLoadError: import failed or no such callable.
    """
    spec = entrypoint if ":" in entrypoint else ":".join(entrypoint.rsplit(".", 1))
    check_allowed(spec, allowlist)
    return import_object(spec)


class _LineSink(io.TextIOBase):
    """A text stream that pushes each complete line to the replica's captured lines."""

    def __init__(self, store: JobStore, task_id: str, prefix: str = "") -> None:
        self.store = store
        self.task_id = task_id
        self.prefix = prefix
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self.push(line)
        return len(text)

    def push(self, line: str) -> None:
        self.store.append_replica_lines(self.task_id, [self.prefix + line])

    def flush(self) -> None:
        if self._buffer:
            self.push(self._buffer)
            self._buffer = ""


class _RecordSink(logging.Handler):
    def __init__(self, sink: _LineSink) -> None:
        super().__init__(level=logging.INFO)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                self.sink.push(line)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _captured(store: JobStore, task_id: str) -> Iterator[None]:
    out, err = _LineSink(store, task_id), _LineSink(store, task_id, "[stderr] ")
    handler = _RecordSink(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.flush()
        err.flush()
        root.removeHandler(handler)


@shared_task(bind=True, name="fleet.run_entrypoint")  # type: ignore[untyped-decorator]
def run_entrypoint(
    self: Task,
    entrypoint: str,
    args: Any = None,
    rank: int = 0,
    world_size: int = 1,
    rank_env: str = "REPLICA_RANK",
    job_id: str | None = None,
) -> dict[str, Any]:
    """Run one replica; returns ``{rank, exit_code, result, error, elapsed_s}``. A raising
    entrypoint gives exit code 1 and its traceback in ``error`` (and in the logs)."""
    runtime = get_runtime()
    store = JobStore(runtime.registry)
    fn = resolve_entrypoint(entrypoint, runtime.settings.workload_allowlist)
    saved = {k: os.environ.get(k) for k in (rank_env, "WORLD_SIZE")}
    os.environ[rank_env] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    started = time.perf_counter()
    outcome: dict[str, Any] = {"rank": rank, "exit_code": 0, "result": None, "error": None}
    try:
        with _captured(store, self.request.id or "local"):
            try:
                if isinstance(args, dict):
                    result = fn(**args)
                elif isinstance(args, list | tuple):
                    result = fn(*args)
                else:
                    result = fn() if args is None else fn(args)
                outcome["result"] = result if _jsonable(result) else repr(result)
            except SoftTimeLimitExceeded:
                if runtime.registry.abort_requested(self.request.id or ""):
                    raise TaskAborted(self.request.id, 0) from None
                raise
            except Exception as exc:
                text = traceback.format_exc()
                print(text, file=sys.stderr)
                outcome.update(exit_code=1, error=f"{type(exc).__name__}: {exc}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outcome["elapsed_s"] = time.perf_counter() - started
    return outcome


def _jsonable(value: Any) -> bool:
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
