"""What every fleet task shares: request validation, the worker runtime, typed errors
on the wire, and progress monitoring for long tasks.

A protocol method is a plain function ``fn(runtime, request, workload_ref) -> result``
(unit tests call it directly). :func:`protocol_task` registers it as the Celery task
``fleet.<method>`` taking JSON ``params`` (the protocol's request body), an optional
``workload`` (``{"spec": "module:attr", "config": {...}}``) and an optional ``job_id``
(the task's log lines then stream to that job's log, and a job cancel aborts it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, shared_task
from pydantic import BaseModel

from fleet import stacks
from fleet.errors import FencedOutError, FleetError, RequestValidationError, storage_error
from fleet.jobs import JobStore, job_log
from fleet.progress import StepMonitor, TaskWatch, interruptible, monitoring
from fleet.protocol import METHODS, MethodSpec, WorkloadRef, validate
from fleet.runtime import WorkerRuntime

log = logging.getLogger("fleet.task")

MethodFn = Callable[[WorkerRuntime, Any, WorkloadRef | None], BaseModel]

#: protocol method name -> its plain function
METHODS_FNS: dict[str, MethodFn] = {}
#: protocol method name -> the Celery task
TASKS: dict[str, Task] = {}

_runtime: WorkerRuntime | None = None


def set_runtime(runtime: WorkerRuntime | None) -> None:
    """Install the runtime tasks in this process use (done by the worker bootstrap)."""
    global _runtime
    _runtime = runtime


def get_runtime() -> WorkerRuntime:
    """The runtime of this worker process.

    Raises:
        FleetError: this process was not started as a fleet worker.
    """
    if _runtime is None:
        raise FleetError("this process is not a fleet worker (no runtime installed)")
    return _runtime


@contextmanager
def _job_scope(
    runtime: WorkerRuntime, task: Task, method: str, job_id: str | None, fence: int | None
) -> Iterator[None]:
    """While a job's task runs: its log records go to the job's log stream, and the task
    is tracked so a job cancel can abort it. A task carrying a stale fencing token (its
    orchestrator lost the job to a newer one) is refused before it runs.

    Raises:
        FencedOutError: ``fence`` is not the job's current token.
    """
    task_id = task.request.id
    if job_id is None or task_id is None:
        yield
        return
    store = JobStore(runtime.registry)
    if fence is not None:
        current = store.fence(job_id)
        if current != fence:
            raise FencedOutError(job_id, fence, current)
    store.track_task(job_id, task_id)
    with job_log(store, job_id, runtime.identity.name, task_id):
        log.info("%s started on %s", method, runtime.identity.name)
        try:
            yield
            log.info("%s finished", method)
        except Exception as exc:
            log.error("%s failed: %s: %s", method, type(exc).__name__, exc)
            raise
        finally:
            store.untrack_task(job_id, task_id)


def _execute(
    task: Task,
    spec: MethodSpec,
    fn: MethodFn,
    params: object,
    workload: object,
    job_id: str | None,
    fence: int | None,
    unknown: dict[str, Any],
) -> dict[str, Any]:
    """Validate, run ``fn`` (under a StepMonitor when the method is long), dump the result.
    An OS error leaves as its typed :class:`~fleet.errors.StorageError`."""
    runtime = get_runtime()
    method = spec.name
    try:
        with (
            _job_scope(runtime, task, method, job_id, fence),
            stacks.watched(runtime, task.request.id, job_id, method) as recorder,
        ):
            if unknown:
                raise RequestValidationError(
                    method,
                    [
                        {"loc": [name], "msg": "unknown task keyword", "type": "extra_forbidden"}
                        for name in sorted(unknown)
                    ],
                )
            request = validate(method, spec.request, params)
            ref = validate(method, WorkloadRef, workload) if workload is not None else None
            if not spec.long:
                return _run(fn, runtime, request, ref)
            task_id = task.request.id
            with interruptible(task_id) as interrupt:
                watch = TaskWatch(
                    abort_requested=lambda: (
                        task_id is not None and runtime.quick_registry.abort_requested(task_id)
                    ),
                    publish=_progress_publisher(task),
                    interrupt=interrupt,
                    snapshot=None if recorder is None else recorder.record,
                )
                monitor = StepMonitor(
                    task_id,
                    publish=watch.offer,
                    abort_requested=watch.aborted.is_set,
                    deadline_unix_s=getattr(request, "deadline_unix_s", None),
                    total_steps=getattr(request, "num_inner_steps", None),
                )
                with watch, monitoring(monitor):
                    if task_id is not None and runtime.registry.abort_requested(task_id):
                        watch.aborted.set()  # asked to stop before it started (redelivered)
                    monitor.check()
                    return _run(fn, runtime, request, ref)
    except FleetError as exc:
        # Celery stores exc.args on the wire: carry the typed data with the message.
        exc.args = (exc.message, exc.to_dict()["data"])
        raise


def _run(
    fn: MethodFn, runtime: WorkerRuntime, request: BaseModel, ref: WorkloadRef | None
) -> dict[str, Any]:
    try:
        return fn(runtime, request, ref).model_dump(mode="json", by_alias=True)
    except OSError as exc:
        raise storage_error(exc) from exc


def _progress_publisher(task: Task) -> Callable[[dict[str, Any]], None]:
    """Publish a long task's progress from another thread: the ``PROGRESS`` state and a
    ``task-progress`` event (Celery's helpers read the task's request from the current
    thread, so it is captured here). Events are not retried: the next one follows."""
    request, task_id = task.request, task.request.id

    def publish(meta: dict[str, Any]) -> None:
        if task_id is None:
            return
        task.backend.store_result(task_id, meta, "PROGRESS", request=request)
        with task.app.events.default_dispatcher(hostname=request.hostname) as dispatcher:
            dispatcher.send("task-progress", uuid=task_id, retry=False, **meta)

    return publish


def protocol_task(method: str) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as protocol method ``method`` (its :data:`~fleet.protocol.METHODS`
    entry gives the request model and whether it is long) and as the Celery task
    ``fleet.<method>``.

    The task takes ``params`` (the request body), ``workload``, ``job_id`` and ``fence``
    (the job owner's fencing token); any other keyword is refused with
    :class:`~fleet.errors.RequestValidationError`.
    """
    spec = METHODS[method]

    def decorate(fn: MethodFn) -> MethodFn:
        @shared_task(bind=True, name=spec.task_name)  # type: ignore[untyped-decorator]
        def task(
            self: Task,
            params: object = None,
            workload: object = None,
            job_id: str | None = None,
            fence: int | None = None,
            **unknown: Any,
        ) -> dict[str, Any]:
            return _execute(self, spec, fn, params, workload, job_id, fence, unknown)

        METHODS_FNS[method] = fn
        TASKS[method] = task
        return fn

    return decorate
