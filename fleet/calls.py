"""How a call travels: built from the protocol table, sent to a queue, waited for.

A :class:`Call` is one protocol call ready to send: its method's table entry
(:data:`fleet.protocol.METHODS`), the request validated against the method's model (a
typo is a local :class:`~fleet.errors.RequestValidationError`), the queue it goes to
(the owner of its model handle, a named worker, a queue, or the pool queue) and how
its JSON result is parsed. A :class:`Dispatcher` prepares, sends and waits for calls;
:class:`~fleet.client.Fleet` builds its typed methods on it. A result is deleted from
Redis once it has been read. A failure on a worker is raised as the worker's own
error class (see :func:`fleet.errors.remote_error`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypedDict, TypeVar, overload

import redis
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import BackendGetMetaError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from fleet.app import create_app
from fleet.codec.filter import as_filter
from fleet.connection import cause_of, redacted_url
from fleet.errors import (
    BrokerUnavailableError,
    FleetTimeout,
    ProtocolError,
    RemoteTaskError,
    RequestValidationError,
    WorkerNotFound,
    remote_error,
)
from fleet.protocol import (
    ExportResult,
    MethodSpec,
    Metrics,
    MetricsResult,
    ModelIdResult,
    OptionalModelIdResult,
    method_spec,
    validate,
)
from fleet.registry import HandleRecord, Registry, WorkerInfo
from fleet.settings import FleetSettings
from fleet.storage import PackRef

T = TypeVar("T")

#: Seconds between two looks at a result while waiting (the Redis backend also
#: pushes it through pub/sub).
POLL_INTERVAL_S = 0.05


def _short(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return f"<{len(value)} items>" if len(value) > 3 else [_short(v) for v in value]
    if isinstance(value, str) and len(value) > 96:
        return value[:93] + "..."
    return value


def describe_kwargs(kwargs: dict[str, Any]) -> str:
    """A short, readable form of a task's kwargs for Flower and logs (``kwargsrepr``):
    long lists become ``<N items>`` and long strings are cut; the message itself keeps
    every value."""
    return repr(_short(kwargs))


@dataclass(frozen=True)
class ModelHandle:
    """A model held by a worker: global ``model_id``, owner ``worker`` and its ``queue``."""

    model_id: str
    worker: str
    queue: str


HandleLike = ModelHandle | HandleRecord | str
WorkerLike = WorkerInfo | str


def model_id_of(handle: HandleLike) -> str:
    """The ``model_id`` of a handle, a registry record or a bare id."""
    return handle if isinstance(handle, str) else handle.model_id


class Route(TypedDict, total=False):
    """Where a call that is not bound to a handle runs, and how long to wait for it."""

    worker: WorkerLike | None
    """A worker (its name or :class:`~fleet.registry.WorkerInfo`): its own queue."""
    queue: str | None
    """A queue (default: the pool queue every worker consumes)."""
    workload: str | None
    """Workload factory ``module:attr`` (default: the worker's own workload)."""
    config: dict[str, Any] | None
    """JSON config for the workload factory."""
    timeout_s: float | None
    """Seconds to wait for the result (default ``FLEET_CALL_TIMEOUT_S``)."""


def _worker_name(worker: WorkerLike) -> str:
    return worker if isinstance(worker, str) else worker.name


@dataclass(frozen=True)
class Call(Generic[T]):
    """A call ready to send: its method, validated ``params`` (JSON), target ``queue``,
    ``workload`` reference, and ``parse`` (raw JSON result -> what the caller gets)."""

    spec: MethodSpec
    params: dict[str, Any]
    queue: str
    workload: dict[str, Any] | None
    parse: Callable[[Any], T]


class FleetFuture(Generic[T]):
    """A call in flight. :meth:`result` blocks for the parsed result."""

    def __init__(self, fleet: Dispatcher, call: Call[T], async_result: AsyncResult) -> None:
        self._fleet = fleet
        self._call = call
        self.async_result = async_result
        self._worker: str | None = None

    @property
    def task_id(self) -> str:
        """The Celery task id."""
        return str(self.async_result.id)

    @property
    def method(self) -> str:
        """The protocol method."""
        return self._call.spec.name

    @property
    def worker(self) -> str | None:
        """The worker that ran the task, once it finished."""
        if self._worker is None:
            self._worker = self._fleet._guard(lambda: self.async_result.worker)
        return self._worker

    def ready(self) -> bool:
        """True once the task finished (successfully or not)."""
        return bool(self._fleet._guard(self.async_result.ready))

    def started(self) -> bool:
        """True once a worker took the task (``task_track_started``), or it finished."""
        return bool(self._fleet._guard(lambda: self.async_result.state) != "PENDING")

    def progress(self) -> dict[str, Any] | None:
        """The last PROGRESS meta of a long task (step, loss, examples_per_s, ...)."""
        state, info = self._fleet._guard(lambda: (self.async_result.state, self.async_result.info))
        return dict(info) if state == "PROGRESS" and isinstance(info, dict) else None

    def cancel(self) -> None:
        """Ask the task to stop at its next step boundary (cooperative abort)."""
        self._fleet.registry.request_abort(self.task_id)

    def result(self, timeout_s: float | None = None) -> T:
        """Wait for the result.

        Raises:
            RemoteTaskError: the task failed on the worker (as its own error class).
            FleetTimeout: no result within ``timeout_s`` (default: settings).
            BrokerUnavailableError: Redis cannot be reached.
        """
        timeout = self._fleet.settings.call_timeout_s if timeout_s is None else timeout_s
        raw, self._worker = self._fleet._wait(self._call.spec.name, self.async_result, timeout)
        return self._call.parse(raw)


class Signatures:
    """``fleet.s.<method>(handle, **request_fields, worker=, queue=, workload=, config=)``:
    the Celery signature of a call (routed and validated like the call itself), for
    groups and chords. Its result is the raw JSON result."""

    def __init__(self, fleet: Dispatcher) -> None:
        self._fleet = fleet

    def __getattr__(self, method: str) -> Callable[..., Signature]:
        spec = method_spec(method)
        fleet = self._fleet

        def build(
            handle: HandleLike | None = None,
            /,
            *,
            worker: WorkerLike | None = None,
            queue: str | None = None,
            workload: str | None = None,
            config: dict[str, Any] | None = None,
            **fields: Any,
        ) -> Signature:
            call = fleet.prepare(
                spec.name,
                fields,
                dict,
                handle=handle,
                worker=worker,
                queue=queue,
                workload=workload,
                config=config,
            )
            return fleet.signature(call)

        return build


class Dispatcher:
    """Prepares, sends and waits for calls on the fleet (see the module docstring).

    Args:
        settings: fleet settings (default: from the environment).
        app: the Celery app (default: one made for ``settings``).
    """

    def __init__(self, settings: FleetSettings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or FleetSettings.from_env()
        self.app = app or create_app(self.settings)
        self.registry = Registry.from_settings(self.settings)
        self.s = Signatures(self)
        self.job_id: str | None = None
        self.fence: int | None = None

    def close(self) -> None:
        """Close broker and Redis connections."""
        self.registry.redis.close()
        self.app.close()

    def prepare(
        self,
        method: str,
        fields: dict[str, Any] | BaseModel,
        parse: Callable[[Any], T],
        *,
        handle: HandleLike | None = None,
        worker: WorkerLike | None = None,
        queue: str | None = None,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> Call[T]:
        """A call of ``method`` with request ``fields`` (a dict, validated here, or the
        method's typed request model, used as it is), routed to the
        owner of ``handle`` (or of the id in the method's handle field), to ``worker``,
        to ``queue``, or to the pool queue. ``parse`` turns the raw JSON result into
        what the caller gets.

        Raises:
            UnknownMethodError, RequestValidationError, HandleNotFound, OwnerLostError,
            WorkerNotFound: see :class:`Fleet`.
        """
        spec = method_spec(method)
        typed = fields if isinstance(fields, spec.request) else None
        if typed is not None:
            params = {spec.handle: getattr(typed, spec.handle)} if spec.handle else {}
        elif isinstance(fields, BaseModel):
            params = fields.model_dump()
        else:
            params = dict(fields)
        if spec.handle is not None:
            model_id = model_id_of(handle) if handle is not None else params.get(spec.handle)
            if not isinstance(model_id, str):
                raise RequestValidationError(
                    method,
                    [{"loc": [spec.handle], "msg": "give a model handle", "type": "missing"}],
                )
            record = self.registry.live_handle(model_id)
            params[spec.handle] = record.model_id
            target = record.queue
        elif worker is not None:
            target = self._worker_queue(worker)
        else:
            target = queue or self.settings.pool_queue
        if typed is not None and spec.handle is not None:
            typed = typed.model_copy(update={spec.handle: params[spec.handle]})
        request = typed if typed is not None else validate(method, spec.request, params)
        body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
        ref = None if workload is None else {"spec": workload, "config": dict(config or {})}
        return Call(spec, body, target, ref, parse)

    def signature(self, call: Call[Any]) -> Signature:
        """The Celery signature of a prepared call."""
        kwargs: dict[str, Any] = {"params": call.params}
        if call.workload is not None:
            kwargs["workload"] = call.workload
        if self.job_id is not None:
            kwargs["job_id"] = self.job_id
        if self.fence is not None:
            kwargs["fence"] = self.fence
        return self.app.signature(
            call.spec.task_name,
            kwargs=kwargs,
            queue=call.queue,
            kwargsrepr=describe_kwargs(kwargs),
        )

    def submit(self, call: Call[T], *, ignore_result: bool = False) -> FleetFuture[T]:
        """Send a prepared call; its future. With ``ignore_result`` (fire and forget) the
        worker stores no result: nothing is left in Redis to expire.

        Raises:
            BrokerUnavailableError: the broker cannot be reached.
        """
        signature = self.signature(call)
        async_result = self._guard(lambda: signature.apply_async(ignore_result=ignore_result))
        return FleetFuture(self, call, async_result)

    @overload
    def run(self, call: Call[T], wait: Literal[True], timeout_s: float | None) -> T: ...
    @overload
    def run(
        self, call: Call[T], wait: Literal[False], timeout_s: float | None
    ) -> FleetFuture[T]: ...
    @overload
    def run(self, call: Call[T], wait: bool, timeout_s: float | None) -> T | FleetFuture[T]: ...
    def run(self, call: Call[T], wait: bool, timeout_s: float | None) -> T | FleetFuture[T]:
        future = self.submit(call)
        return future.result(timeout_s) if wait else future

    def _worker_queue(self, worker: WorkerLike) -> str:
        info = self.registry.worker(_worker_name(worker))
        if info is None or info.status != "alive":
            raise WorkerNotFound(_worker_name(worker))
        return info.queue

    # ------------------------------------------------------------------ waiting

    def _guard(self, fn: Callable[[], T]) -> T:
        """Run a Celery broker/backend operation; Redis failures become typed."""
        try:
            return fn()
        except (OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
            url = redacted_url(self.settings.redis_url)
            raise BrokerUnavailableError(url, cause_of(exc)) from exc
        except BackendGetMetaError as exc:
            url = redacted_url(self.settings.redis_url)
            raise BrokerUnavailableError(url, str(exc)) from exc
        except RuntimeError as exc:  # the result consumer gave up reconnecting
            if not isinstance(exc.__cause__, redis.ConnectionError | redis.TimeoutError):
                raise
            url = redacted_url(self.settings.redis_url)
            raise BrokerUnavailableError(url, cause_of(exc.__cause__)) from exc

    def _wait(self, method: str, result: AsyncResult, timeout_s: float) -> tuple[Any, str | None]:
        """``(raw JSON result, worker)`` of a finished task; the result is then deleted."""
        try:
            self._guard(
                lambda: result.get(timeout=timeout_s, propagate=False, interval=POLL_INTERVAL_S)
            )
        except CeleryTimeoutError:
            raise FleetTimeout(method, str(result.id), timeout_s) from None
        try:
            if result.successful():
                return result.result, result.worker
            raise self.remote_error_of(method, result)
        finally:
            self._guard(result.forget)

    def finished_result(self, method: str, task_id: str, parse: Callable[[Any], T]) -> T | None:
        """The parsed result of an earlier task ``task_id`` of ``method`` (one sent by
        another process, e.g. a dead orchestrator) if it succeeded and its result is still
        stored; None if it is pending, running, failed or expired. The stored result is
        then deleted.

        Raises:
            BrokerUnavailableError: Redis cannot be reached.
        """
        result = self.app.AsyncResult(task_id)
        if self._guard(lambda: result.state) != "SUCCESS":
            return None
        try:
            return parse(self._guard(lambda: result.result))
        finally:
            self._guard(result.forget)

    def task_state(self, task_id: str) -> str:
        """Celery's state of task ``task_id`` (``PENDING`` for one unknown or expired).

        Raises:
            BrokerUnavailableError: Redis cannot be reached.
        """
        return str(self._guard(lambda: self.app.AsyncResult(task_id).state))

    def remote_error_of(self, method: str, result: AsyncResult) -> RemoteTaskError:
        """The caller-side error of a failed task (see :func:`fleet.errors.remote_error`)."""
        backend = self.app.backend
        raw = self._guard(lambda: backend.get(backend.get_key_for_task(result.id)))
        meta = json.loads(raw) if raw else {}
        exc = meta.get("result") or {}
        args = exc.get("exc_message") or []
        if isinstance(args, str):
            args = [args]
        return remote_error(
            method=method,
            worker=meta.get("worker"),
            task_id=str(result.id),
            error_type=str(exc.get("exc_type") or type(result.result).__name__),
            error=str(args[0]) if args else str(result.result),
            data=args[1] if len(args) > 1 and isinstance(args[1], dict) else None,
            remote_traceback=meta.get("traceback"),
        )

    def handle_of(self, raw: Any) -> ModelHandle:
        """The :class:`ModelHandle` of a ``{model_id}`` result."""
        record = self.registry.live_handle(ModelIdResult.model_validate(raw).model_id)
        return ModelHandle(record.model_id, record.owner, record.queue)

    def maybe_handle_of(self, raw: Any) -> ModelHandle | None:
        """The :class:`ModelHandle` of a ``{model_id}`` result, or None for a null id."""
        result = OptionalModelIdResult.model_validate(raw)
        return None if result.model_id is None else self.handle_of(raw)


def raw_result(result: Any) -> Any:
    return result


def metrics_result(result: Any) -> Metrics:
    return MetricsResult.model_validate(result).metrics


def pack_ref_result(result: Any) -> PackRef:
    pack = ExportResult.model_validate(result).pack
    if pack is None:
        raise ProtocolError("export_parameter_pack returned no pack")
    return pack


def request_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Request fields without the Nones, with a state_dict_filter in its JSON form."""
    out = {k: v for k, v in options.items() if v is not None}
    if "state_dict_filter" in out:
        out["state_dict_filter"] = as_filter(out["state_dict_filter"]).to_json()
    return out


def pack_fields(pack: PackRef | str) -> dict[str, Any]:
    """``parameter_pack_path``, and the PackRef itself (so the worker checks its hashes)."""
    if isinstance(pack, PackRef):
        return {"parameter_pack_path": pack.path, "pack": pack.model_dump()}
    return {"parameter_pack_path": pack}
