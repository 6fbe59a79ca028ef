"""Fleet: the typed client. One method per protocol method, routed by handle owner.

Handle-bound calls go to the queue of the worker that owns the handle (from the
registry); a handle whose owner is lost fails fast with
:class:`~fleet.errors.OwnerLostError` naming its last pack, before anything is sent.
Calls not bound to a handle go to a named worker's queue, a given queue, or the pool
queue. Every method blocks by default; ``wait=False`` returns a :class:`FleetFuture`
at once, and ``fleet.s.<method>(...)`` gives the Celery signature of the same call for
groups and chords (its result is the raw JSON result).

Remote failures raise :class:`~fleet.errors.RemoteTaskError` (method, worker, error
type and text, the error's data, remote traceback); a result that does not arrive in
time raises :class:`~fleet.errors.FleetTimeout`.
"""

from __future__ import annotations

import contextvars
import copy
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from celery import Celery
from celery.canvas import Signature
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from fleet.app import create_app
from fleet.codec.layout import FilterLike, as_filter
from fleet.errors import RemoteTaskError, UnknownMethodError, WorkerNotFound
from fleet.protocol import (
    CapabilityProbeResult,
    HelloResult,
    ParameterPackPlanResult,
    RunInnerLoopResult,
)
from fleet.registry import HandleRecord, Registry, WorkerInfo
from fleet.settings import FleetSettings
from fleet.storage import PackRef, SharedRoot

T = TypeVar("T")

#: Every protocol method fleet serves (PROTOCOL.md section 2).
PROTOCOL_METHODS = (
    "hello",
    "capability_probe",
    "init_model",
    "train_window",
    "evaluate",
    "apply_patch",
    "load_model_artifact",
    "materialize_model_artifact",
    "export_parameter_pack",
    "import_parameter_pack",
    "parameter_pack_plan",
    "run_inner_loop",
    "merge_candidate_models",
    "apply_single_root_ema",
    "reconcile_canonical_model",
    "release_model",
    "shutdown",
)
#: fleet's own methods beyond the protocol.
FLEET_METHODS = ("load_parameter_pack",)
ALL_METHODS = PROTOCOL_METHODS + FLEET_METHODS


def _short(value: Any, depth: int = 0) -> Any:
    if isinstance(value, dict):
        return {k: _short(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) > 3:
            return f"<{len(value)} items>"
        return [_short(v, depth + 1) for v in value]
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


HandleLike = ModelHandle | str


def _model_id(handle: HandleLike) -> str:
    return handle if isinstance(handle, str) else handle.model_id


@dataclass(frozen=True)
class _Call:
    method: str
    params: Any
    queue: str
    workload: dict[str, Any] | None


class FleetFuture(Generic[T]):
    """A call in flight. ``result(timeout_s)`` blocks for the parsed result."""

    def __init__(
        self, fleet: Fleet, call: _Call, async_result: AsyncResult, parse: Callable[[Any], T]
    ) -> None:
        self._fleet = fleet
        self._call = call
        self._parse = parse
        self.async_result = async_result

    @property
    def task_id(self) -> str:
        """The Celery task id."""
        return str(self.async_result.id)

    @property
    def method(self) -> str:
        """The protocol method."""
        return self._call.method

    @property
    def worker(self) -> str | None:
        """The worker that ran the task (once it finished; from the result backend)."""
        return self.async_result.worker  # type: ignore[no-any-return]

    def ready(self) -> bool:
        """True once the task finished (successfully or not)."""
        return bool(self.async_result.ready())

    def progress(self) -> dict[str, Any] | None:
        """The last PROGRESS meta of a long task (step, loss, examples_per_s, ...)."""
        if self.async_result.state == "PROGRESS" and isinstance(self.async_result.info, dict):
            return dict(self.async_result.info)
        return None

    def cancel(self) -> None:
        """Ask the task to stop at its next step boundary (cooperative abort)."""
        self._fleet.registry.request_abort(self.task_id)

    def result(self, timeout_s: float | None = None) -> T:
        """Wait for the result.

        Raises:
            RemoteTaskError: the task failed on the worker.
            FleetTimeout: no result within ``timeout_s`` (default: settings).
        """
        timeout = self._fleet.settings.call_timeout_s if timeout_s is None else timeout_s
        return self._parse(self._fleet._wait(self._call.method, self.async_result, timeout))


_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("fleet_call_mode", default="call")


class _Signatures:
    """``fleet.s.<method>(...)``: the Celery signature of the call instead of its result."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def __getattr__(self, method: str) -> Callable[..., Signature]:
        if method not in ALL_METHODS:
            raise UnknownMethodError(method)
        bound = getattr(self._fleet, method)

        def make(*args: Any, **kwargs: Any) -> Signature:
            token = _MODE.set("signature")
            try:
                return bound(*args, **kwargs)
            finally:
                _MODE.reset(token)

        return make


class Fleet:
    """Typed, routed access to a fleet of workers.

    Every call can raise:
        HandleNotFound: a handle the registry does not know (checked before sending).
        OwnerLostError: the handle's owner stopped heartbeating; names its last pack.
        WorkerNotFound: a named worker is not alive.
        RemoteTaskError: the task failed on the worker (``error_type`` is the remote
            error's class, e.g. ``RequestValidationError``, ``HookFailedError``,
            ``LayoutMismatchError``, ``PathOutsideRootError``, ``TaskAborted``).
        FleetTimeout: no result within ``timeout_s`` (default ``FLEET_CALL_TIMEOUT_S``).
    Paths are relative to the shared root; timeouts are in seconds.
    """

    def __init__(self, settings: FleetSettings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or FleetSettings.from_env()
        self.app = app or create_app(self.settings)
        self.registry = Registry.from_settings(self.settings)
        self.shared = SharedRoot(self.settings.shared_root)
        self.s = _Signatures(self)
        self.job_id: str | None = None

    def for_job(self, job_id: str | None) -> Fleet:
        """A view of this client whose calls belong to job ``job_id``: their workers'
        log lines stream to the job's log and a job cancel aborts them."""
        view = copy.copy(self)
        view.s = _Signatures(view)
        view.job_id = job_id
        return view

    @classmethod
    def from_env(cls) -> Fleet:
        """A client configured from ``FLEET_*`` environment variables."""
        return cls(FleetSettings.from_env())

    def close(self) -> None:
        """Close broker and Redis connections."""
        self.registry.redis.close()
        self.app.close()

    # ------------------------------------------------------------------ registry views

    def workers(self, *, include_lost: bool = False) -> list[WorkerInfo]:
        """Workers in the registry (alive only, unless ``include_lost``)."""
        return self.registry.workers(include_lost=include_lost)

    def handle_record(self, handle: HandleLike) -> HandleRecord | None:
        """The registry record of a handle (with live/lost status), or None."""
        return self.registry.handle(_model_id(handle))

    # ------------------------------------------------------------------ dispatch

    def _worker_queue(self, worker: str) -> str:
        info = self.registry.worker(worker)
        if info is None or info.status != "alive":
            raise WorkerNotFound(worker)
        return info.queue

    def _target(self, *, worker: str | None = None, queue: str | None = None) -> str:
        if worker is not None:
            return self._worker_queue(worker)
        return queue or self.settings.pool_queue

    def _owner(self, handle: HandleLike) -> HandleRecord:
        return self.registry.live_handle(_model_id(handle))

    def _on_owner(
        self,
        method: str,
        handle: HandleLike,
        params: dict[str, Any],
        parse: Callable[[Any], Any],
        wait: bool,
        timeout_s: float | None,
    ) -> Any:
        """Route a handle-bound call to the owner's own queue (fails fast if the owner is
        lost), with ``model_id`` added to ``params``."""
        record = self._owner(handle)
        call = _Call(method, {"model_id": record.model_id, **params}, record.queue, None)
        return self._dispatch(call, parse, wait, timeout_s)

    @staticmethod
    def _workload(workload: str | None, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if workload is None:
            return None
        return {"spec": workload, "config": dict(config or {})}

    def _signature(self, call: _Call) -> Signature:
        kwargs: dict[str, Any] = {"params": call.params}
        if call.workload is not None:
            kwargs["workload"] = call.workload
        if self.job_id is not None:
            kwargs["job_id"] = self.job_id
        return self.app.signature(
            f"fleet.{call.method}",
            kwargs=kwargs,
            queue=call.queue,
            kwargsrepr=describe_kwargs(kwargs),
        )

    def _dispatch(
        self, call: _Call, parse: Callable[[Any], T], wait: bool, timeout_s: float | None
    ) -> Any:
        if _MODE.get() == "signature":
            return self._signature(call)
        future = FleetFuture(self, call, self._signature(call).apply_async(), parse)
        return future.result(timeout_s) if wait else future

    def _wait(self, method: str, result: AsyncResult, timeout_s: float) -> Any:
        from fleet.errors import FleetTimeout

        try:
            result.get(timeout=timeout_s, propagate=False, interval=0.05)
        except CeleryTimeoutError:
            raise FleetTimeout(method, str(result.id), timeout_s) from None
        if result.successful():
            return result.result
        raise self._remote_error(method, result)

    def _remote_error(self, method: str, result: AsyncResult) -> RemoteTaskError:
        backend = self.app.backend
        raw = backend.get(backend.get_key_for_task(result.id))
        meta = json.loads(raw) if raw else {}
        exc = meta.get("result") or {}
        args = exc.get("exc_message") or []
        if isinstance(args, str):
            args = [args]
        message = str(args[0]) if args else str(result.result)
        data = args[1] if len(args) > 1 and isinstance(args[1], dict) else None
        return RemoteTaskError(
            method=method,
            worker=meta.get("worker"),
            task_id=str(result.id),
            error_type=str(exc.get("exc_type") or type(result.result).__name__),
            error=message,
            data=data,
            remote_traceback=meta.get("traceback"),
        )

    def call(
        self,
        method: str,
        params: Any = None,
        *,
        queue: str | None = None,
        worker: str | None = None,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> Any:
        """Send a raw protocol call (``params`` as in PROTOCOL.md) and return the raw
        JSON result. Prefer the typed methods; this one does no routing by handle.

        Raises:
            UnknownMethodError: not a protocol method.
        """
        if method not in ALL_METHODS:
            raise UnknownMethodError(method)
        call = _Call(
            method,
            {} if params is None else params,
            self._target(worker=worker, queue=queue),
            self._workload(workload, config),
        )
        return self._dispatch(call, lambda r: r, wait, timeout_s)

    # ------------------------------------------------------------------ control

    def hello(
        self,
        worker: str | None = None,
        *,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> HelloResult:
        """``hello`` on ``worker`` (any worker of the pool if None)."""
        call = _Call("hello", {}, self._target(worker=worker), self._workload(workload, config))
        return self._dispatch(call, HelloResult.model_validate, wait, timeout_s)  # type: ignore[no-any-return]

    def capability_probe(
        self,
        worker: str | None = None,
        *,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> CapabilityProbeResult:
        """``capability_probe`` on ``worker``; the estimate is also recorded in the registry."""
        call = _Call(
            "capability_probe", {}, self._target(worker=worker), self._workload(workload, config)
        )
        return self._dispatch(call, CapabilityProbeResult.model_validate, wait, timeout_s)  # type: ignore[no-any-return]

    def apply_patch(
        self,
        patch: dict[str, Any],
        *,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Apply a RuntimePatch on every alive worker that runs the workload (the named
        one, or each worker's default); returns ``{worker: PatchOutcome}``."""
        targets = []
        for info in self.workers():
            runs = (
                info.default_workload is not None
                if workload is None
                else workload == info.default_workload
                or workload in self.registry.worker_workloads(info.name)
            )
            if runs:
                targets.append(info)
        futures = {
            info.name: self._dispatch(
                _Call("apply_patch", dict(patch), info.queue, self._workload(workload, config)),
                lambda r: r,
                False,
                timeout_s,
            )
            for info in targets
        }
        return {name: future.result(timeout_s) for name, future in futures.items()}

    def shutdown(self, worker: str, *, timeout_s: float | None = None) -> bool:
        """Stop ``worker`` gracefully: its handles are released, then it exits."""
        call = _Call("shutdown", {}, self._worker_queue(worker), None)
        return bool(self._dispatch(call, lambda r: r["ok"], True, timeout_s))

    def cancel(self, future: FleetFuture[Any]) -> None:
        """Ask a running long task to stop at its next step boundary."""
        future.cancel()

    # ------------------------------------------------------------------ models

    def _new_handle(self, result: dict[str, Any]) -> ModelHandle:
        record = self.registry.live_handle(result["model_id"])
        return ModelHandle(record.model_id, record.owner, record.queue)

    def _maybe_handle(self, result: dict[str, Any]) -> ModelHandle | None:
        return None if result.get("model_id") is None else self._new_handle(result)

    def init_model(
        self,
        device: str = "cpu",
        *,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        queue: str | None = None,
        worker: str | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> ModelHandle:
        """Build a model on a worker (named, by queue, or any of the pool)."""
        call = _Call(
            "init_model",
            {"device": device},
            self._target(worker=worker, queue=queue),
            self._workload(workload, config),
        )
        return self._dispatch(call, self._new_handle, wait, timeout_s)  # type: ignore[no-any-return]

    def release_model(self, handle: HandleLike, *, timeout_s: float | None = None) -> None:
        """Drop a model on its owner."""
        self._on_owner("release_model", handle, {}, lambda r: None, True, timeout_s)

    def train_window(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        *,
        deadline_unix_s: float | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """``train_window`` on the owner; returns the metrics."""
        params: dict[str, Any] = {"batches": list(batches)}
        if deadline_unix_s is not None:
            params["deadline_unix_s"] = deadline_unix_s
        return self._on_owner(  # type: ignore[no-any-return]
            "train_window", handle, params, lambda r: r["metrics"], wait, timeout_s
        )

    def evaluate(
        self,
        handle: HandleLike,
        split: Any = "Validation",
        *,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """``evaluate`` on the owner; returns the metrics. ``split``: EvalSplit."""
        params = {"split": split}
        return self._on_owner("evaluate", handle, params, lambda r: r["metrics"], wait, timeout_s)  # type: ignore[no-any-return]

    def run_inner_loop(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        num_inner_steps: int,
        output_parameter_pack_path: str,
        model_schema_hash: str,
        *,
        inner_optimizer_state_path: str | None = None,
        require_exact_steps: bool = False,
        state_dict_filter: FilterLike = None,
        deadline_unix_s: float | None = None,
        input_parameter_pack_path: str | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> RunInnerLoopResult:
        """``run_inner_loop`` on the owner: ``num_inner_steps`` steps, then the output pack
        (paths relative to the shared root)."""
        params: dict[str, Any] = {
            "batches": list(batches),
            "num_inner_steps": num_inner_steps,
            "inner_optimizer_state_path": inner_optimizer_state_path,
            "output_parameter_pack_path": output_parameter_pack_path,
            "model_schema_hash": model_schema_hash,
            "require_exact_steps": require_exact_steps,
            "state_dict_filter": as_filter(state_dict_filter).to_json(),
        }
        if deadline_unix_s is not None:
            params["deadline_unix_s"] = deadline_unix_s
        if input_parameter_pack_path is not None:
            params["input_parameter_pack_path"] = input_parameter_pack_path
        parse = RunInnerLoopResult.model_validate
        return self._on_owner("run_inner_loop", handle, params, parse, wait, timeout_s)  # type: ignore[no-any-return]

    def export_parameter_pack(
        self,
        handle: HandleLike,
        path: str,
        model_schema_hash: str,
        *,
        state_dict_filter: FilterLike = None,
        timeout_s: float | None = None,
    ) -> PackRef:
        """Publish the model as a pack at ``path`` (relative to the shared root)."""
        params = {
            "parameter_pack_path": path,
            "model_schema_hash": model_schema_hash,
            "state_dict_filter": as_filter(state_dict_filter).to_json(),
        }
        parse = lambda r: PackRef.model_validate(r["pack"])  # noqa: E731
        return self._on_owner("export_parameter_pack", handle, params, parse, True, timeout_s)  # type: ignore[no-any-return]

    def load_parameter_pack(
        self,
        handle: HandleLike,
        ref_or_path: PackRef | str,
        *,
        state_dict_filter: FilterLike = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        """fleet extension: load a pack into an existing model in place (its optimizer
        and other state stay)."""
        path = ref_or_path.path if isinstance(ref_or_path, PackRef) else ref_or_path
        params = {
            "parameter_pack_path": path,
            "state_dict_filter": as_filter(state_dict_filter).to_json(),
        }
        return self._on_owner(  # type: ignore[no-any-return]
            "load_parameter_pack", handle, params, lambda r: None, wait, timeout_s
        )

    def import_parameter_pack(
        self,
        ref_or_path: PackRef | str,
        device: str = "cpu",
        *,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        state_dict_filter: FilterLike = None,
        queue: str | None = None,
        worker: str | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> ModelHandle:
        """Hold a new model loaded from a pack (PackRef or shared-root-relative path)."""
        path = ref_or_path.path if isinstance(ref_or_path, PackRef) else ref_or_path
        params = {
            "device": device,
            "parameter_pack_path": path,
            "state_dict_filter": as_filter(state_dict_filter).to_json(),
        }
        call = _Call(
            "import_parameter_pack",
            params,
            self._target(worker=worker, queue=queue),
            self._workload(workload, config),
        )
        return self._dispatch(call, self._new_handle, wait, timeout_s)  # type: ignore[no-any-return]

    def parameter_pack_plan(
        self,
        device: str = "cpu",
        *,
        workload: str | None = None,
        config: dict[str, Any] | None = None,
        state_dict_filter: FilterLike = None,
        worker: str | None = None,
        timeout_s: float | None = None,
    ) -> ParameterPackPlanResult:
        """The pack plan of a fresh model of the workload."""
        params = {"device": device, "state_dict_filter": as_filter(state_dict_filter).to_json()}
        call = _Call(
            "parameter_pack_plan",
            params,
            self._target(worker=worker),
            self._workload(workload, config),
        )
        return self._dispatch(call, ParameterPackPlanResult.model_validate, True, timeout_s)  # type: ignore[no-any-return]

    def load_model_artifact(
        self, handle: HandleLike, path: str, *, timeout_s: float | None = None
    ) -> None:
        """Load an artifact file (shared-root relative) into the model."""
        params = {"artifact_path": path}
        self._on_owner("load_model_artifact", handle, params, lambda r: None, True, timeout_s)

    def materialize_model_artifact(
        self, handle: HandleLike, path: str, *, timeout_s: float | None = None
    ) -> None:
        """Write the model as an artifact file (shared-root relative)."""
        params = {"artifact_path": path}
        self._on_owner(
            "materialize_model_artifact", handle, params, lambda r: None, True, timeout_s
        )

    # ------------------------------------------------------------------ merging

    def _pack_for(self, record: HandleRecord) -> PackRef:
        """Have the owner of ``record`` export it to a scratch pack on the shared root."""
        path = f"tmp/exchange/{uuid.uuid4().hex}/{record.model_id}"
        return self.export_parameter_pack(record.model_id, path, "fleet-exchange")

    def _candidate(self, item: Any, base: HandleRecord, index: int) -> dict[str, Any]:
        if isinstance(item, dict):
            return dict(item)
        if isinstance(item, PackRef):
            return {
                "peer_id": f"pack-{index}",
                "head_id": item.path,
                "artifact_id": item.path,
                "pack": item.model_dump(),
            }
        record = self._owner(item)
        candidate: dict[str, Any] = {
            "peer_id": record.owner,
            "head_id": record.model_id,
            "artifact_id": record.model_id,
        }
        if record.owner == base.owner:
            candidate["model_id"] = record.model_id
        else:
            candidate["pack"] = self._pack_for(record).model_dump()
        return candidate

    def merge_candidate_models(
        self,
        base: HandleLike,
        candidates: Sequence[HandleLike | PackRef | dict[str, Any]],
        policy: Any = "WeightedMean",
        *,
        timeout_s: float | None = None,
    ) -> ModelHandle | None:
        """Merge candidates into a new model on the base's owner.

        Candidates are handles (on the base's worker: passed by id; elsewhere: their
        owners export packs first), PackRefs, or full candidate records
        ``{peer_id, head_id, artifact_id, model_id | pack, sample_weight, quality_weight}``.
        """
        base_record = self._owner(base)
        params = {
            "base_model_id": base_record.model_id,
            "candidates": [self._candidate(c, base_record, i) for i, c in enumerate(candidates)],
            "policy": policy,
        }
        return self._dispatch(  # type: ignore[no-any-return]
            _Call("merge_candidate_models", params, base_record.queue, None),
            self._maybe_handle,
            True,
            timeout_s,
        )

    def _update_in_place(
        self,
        method: str,
        other: HandleLike,
        target: HandleLike,
        fields: tuple[str, str, str],
        extra: dict[str, Any],
        timeout_s: float | None,
    ) -> ModelHandle:
        """Call ``method`` on ``target``'s owner to update it from ``other``, which goes by
        id when both are on one worker, else as a pack its owner exports first.
        ``fields``: the request's names for (other id, target id, other's pack)."""
        target_record = self._owner(target)
        other_record = self._owner(other)
        other_id, target_id, pack_field = fields
        params: dict[str, Any] = {
            other_id: other_record.model_id,
            target_id: target_record.model_id,
            **extra,
        }
        if other_record.owner != target_record.owner:
            params[pack_field] = self._pack_for(other_record).model_dump()
        call = _Call(method, params, target_record.queue, None)
        return self._dispatch(call, self._new_handle, True, timeout_s)  # type: ignore[no-any-return]

    def apply_single_root_ema(
        self,
        base: HandleLike,
        merged: HandleLike,
        policy: Any = "Ema",
        *,
        timeout_s: float | None = None,
    ) -> ModelHandle:
        """EMA of ``merged`` towards ``base``, in place on ``merged``'s owner."""
        fields = ("base_model_id", "merged_model_id", "base_pack")
        return self._update_in_place(
            "apply_single_root_ema", base, merged, fields, {"policy": policy}, timeout_s
        )

    def reconcile_canonical_model(
        self,
        local: HandleLike,
        canonical: HandleLike,
        strategy: Any = "Replace",
        *,
        timeout_s: float | None = None,
    ) -> ModelHandle:
        """Reconcile ``local`` into ``canonical``, in place on ``canonical``'s owner."""
        fields = ("local_model_id", "canonical_model_id", "local_pack")
        return self._update_in_place(
            "reconcile_canonical_model", local, canonical, fields, {"strategy": strategy}, timeout_s
        )

    # ------------------------------------------------------------------ waiting

    def wait_for_workers(self, n: int, *, timeout_s: float = 60.0) -> list[WorkerInfo]:
        """Block until at least ``n`` workers are alive; return them.

        Raises:
            FleetTimeout: fewer than ``n`` within ``timeout_s``.
        """
        from fleet.errors import FleetTimeout

        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.workers()
            if len(alive) >= n:
                return alive
            if time.monotonic() > deadline:
                raise FleetTimeout("wait_for_workers", "-", timeout_s)
            time.sleep(0.2)
