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
from typing import Any, TypeVar

from celery import Task, shared_task
from pydantic import BaseModel, RootModel, ValidationError

from fleet.errors import FleetError, RequestValidationError
from fleet.jobs import JobLogHandler, JobStore
from fleet.progress import StepMonitor, monitoring
from fleet.protocol import WorkloadRef
from fleet.runtime import WorkerRuntime

log = logging.getLogger("fleet.task")

Req = TypeVar("Req", bound=BaseModel)
MethodFn = Callable[[WorkerRuntime, Any, WorkloadRef | None], BaseModel]

#: protocol method name -> its plain function
METHODS: dict[str, MethodFn] = {}
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


def validate(method: str, model: type[Req], body: object) -> Req:
    """Parse a request body.

    Raises:
        RequestValidationError: not an object, a missing field, a wrong type, an
            unknown field (each problem listed with its location).
    """
    if body is None:
        body = {}
    if not isinstance(body, dict) and not issubclass(model, RootModel):
        raise RequestValidationError(
            method,
            [
                {
                    "loc": [],
                    "msg": f"expected a JSON object, got {type(body).__name__}",
                    "type": "dict_type",
                }
            ],
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(
            method, [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        ) from None


@contextmanager
def _job_scope(
    runtime: WorkerRuntime, task: Task, method: str, job_id: str | None
) -> Iterator[None]:
    """While a job's task runs: its log records go to the job's log stream, and the task
    is tracked so a job cancel can abort it."""
    task_id = task.request.id
    if job_id is None or task_id is None:
        yield
        return
    store = JobStore(runtime.registry.redis)
    handler = JobLogHandler(store, job_id, runtime.identity.name, task_id)
    root = logging.getLogger()
    root.addHandler(handler)
    store.track_task(job_id, task_id)
    log.info("%s started on %s", method, runtime.identity.name)
    try:
        yield
        log.info("%s finished", method)
    except Exception as exc:
        log.error("%s failed: %s: %s", method, type(exc).__name__, exc)
        raise
    finally:
        store.untrack_task(job_id, task_id)
        root.removeHandler(handler)


def _execute(
    task: Task,
    method: str,
    request_model: type[BaseModel],
    fn: MethodFn,
    long: bool,
    params: object,
    workload: object,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Validate, run ``fn`` (under a StepMonitor when ``long``), dump the result."""
    runtime = get_runtime()
    try:
        with _job_scope(runtime, task, method, job_id):
            request = validate(method, request_model, params)
            ref = validate(method, WorkloadRef, workload) if workload is not None else None
            if not long:
                return fn(runtime, request, ref).model_dump(mode="json", by_alias=True)
            task_id = task.request.id
            monitor = StepMonitor(
                task_id,
                publish=lambda meta: _publish_progress(task, meta),
                abort_requested=lambda: (
                    task_id is not None and runtime.registry.abort_requested(task_id)
                ),
                deadline_unix_s=getattr(request, "deadline_unix_s", None),
                total_steps=getattr(request, "num_inner_steps", None),
            )
            monitor.check()
            with monitoring(monitor):
                return fn(runtime, request, ref).model_dump(mode="json", by_alias=True)
    except FleetError as exc:
        # Celery stores exc.args on the wire: carry the typed data with the message.
        exc.args = (exc.message, exc.to_dict()["data"])
        raise


def _publish_progress(task: Task, meta: dict[str, Any]) -> None:
    if task.request.id is None:
        return
    task.update_state(state="PROGRESS", meta=meta)
    task.send_event("task-progress", **meta)


def protocol_task(
    method: str, request_model: type[BaseModel], *, long: bool = False
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as protocol method ``method`` and as Celery task ``fleet.<method>``.

    ``long`` tasks run under a :class:`~fleet.progress.StepMonitor` (progress events,
    abort and deadline checks between steps).
    """

    def decorate(fn: MethodFn) -> MethodFn:
        @shared_task(bind=True, name=f"fleet.{method}")  # type: ignore[untyped-decorator]
        def task(
            self: Task, params: object = None, workload: object = None, job_id: str | None = None
        ) -> dict[str, Any]:
            return _execute(self, method, request_model, fn, long, params, workload, job_id)

        METHODS[method] = fn
        TASKS[method] = task
        return fn

    return decorate
