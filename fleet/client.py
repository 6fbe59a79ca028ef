"""Fleet: the typed client. One method per protocol method, routed by handle owner.

Each method builds its call from the method's entry in :data:`fleet.protocol.METHODS`
(:mod:`fleet.calls`): the request is validated here, before anything is sent; a
handle-bound call goes to the queue of the worker that owns the handle (a handle whose
owner is lost fails fast with :class:`~fleet.errors.OwnerLostError` naming its last
pack); other calls go where ``worker=`` / ``queue=`` say, else to the pool queue.
Calls block; the long ones and those that start a model take ``wait=False`` for a
:class:`~fleet.calls.FleetFuture`. ``fleet.submit(fleet.prepare(method, fields,
parse))`` sends any call without waiting, and ``fleet.s.<method>(...)`` gives its
Celery signature for groups and chords.

A failure on a worker is raised as the worker's own error class (e.g.
``LayoutMismatchError``) with the worker, the task id and the remote traceback
attached; it is also a :class:`~fleet.errors.RemoteTaskError`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, overload

from typing_extensions import Unpack

from fleet.calls import (
    Call,
    FleetFuture,
    HandleLike,
    ModelHandle,
    Route,
    Signatures,
    WorkerLike,
    describe_kwargs,
    metrics_result,
    model_id_of,
    pack_fields,
    pack_ref_result,
    raw_result,
    request_fields,
)
from fleet.codec.filter import FilterLike
from fleet.devices import AUTO
from fleet.errors import NoWorkersError
from fleet.merging import MergeCalls
from fleet.protocol import (
    CapabilityProbeResult,
    HelloResult,
    Metrics,
    ParameterPackPlanResult,
    RunInnerLoopResult,
    ShutdownResult,
    method_spec,
)
from fleet.registry import HandleRecord, WorkerInfo
from fleet.settings import FleetSettings
from fleet.storage import PackRef, Store, open_store

__all__ = ["Fleet", "FleetFuture", "ModelHandle", "Route", "describe_kwargs"]

T = TypeVar("T")


class Fleet(MergeCalls):
    """Typed, routed access to a fleet of workers.

    Every call can raise:
        RequestValidationError: the request does not fit the method (checked here).
        HandleNotFound: a handle the registry does not know (checked before sending).
        OwnerLostError: the handle's owner stopped heartbeating; names its last pack.
        WorkerNotFound: a named worker is not alive.
        RemoteTaskError: the task failed on the worker, raised as the worker's own error
            class (``LayoutMismatchError``, ``HookFailedError``, ``TaskAborted``, ...).
        FleetTimeout: no result within ``timeout_s`` (default ``FLEET_CALL_TIMEOUT_S``).
        BrokerUnavailableError: Redis cannot be reached (after ``FLEET_REDIS_RETRY_S``).
    Paths are relative to the shared root; timeouts are in seconds.
    """

    @classmethod
    def from_env(cls) -> Fleet:
        """A client configured from ``FLEET_*`` environment variables."""
        return cls(FleetSettings.from_env())

    def for_job(self, job_id: str | None, *, fence: int | None = None) -> Fleet:
        """A view of this client whose calls belong to job ``job_id``: their workers'
        log lines stream to the job's log, a job cancel aborts them, and with ``fence``
        (the owner's fencing token) a worker refuses them once another orchestrator
        owns the job."""
        view = Fleet.__new__(Fleet)
        view.__dict__.update(self.__dict__)
        view.s = Signatures(view)
        view.job_id, view.fence = job_id, fence
        return view

    @functools.cached_property
    def shared(self) -> Store:
        """The shared root's store as seen from this machine (a local mount or an object
        store), for clients that read or write it (an orchestrator does not need it)."""
        return open_store(self.settings)

    # ------------------------------------------------------------------ registry views

    def workers(self, *, include_lost: bool = False) -> list[WorkerInfo]:
        """Workers in the registry (alive only, unless ``include_lost``)."""
        return self.registry.workers(include_lost=include_lost)

    def handle_record(self, handle: HandleLike) -> HandleRecord | None:
        """The registry record of a handle (with live/lost status), or None."""
        return self.registry.handle(model_id_of(handle))

    def wait_for_workers(self, n: int, *, timeout_s: float = 60.0) -> list[WorkerInfo]:
        """Block until at least ``n`` workers are alive; return them (``timeout_s=0``:
        look once).

        Raises:
            NoWorkersError: fewer than ``n`` within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.workers()
            if len(alive) >= n:
                return alive
            if time.monotonic() >= deadline:
                raise NoWorkersError(n, len(alive), timeout_s)
            time.sleep(0.2)

    # ------------------------------------------------------------------ plumbing

    def _routed(
        self, method: str, fields: dict[str, Any], parse: Callable[[Any], T], route: Route
    ) -> Call[T]:
        return self.prepare(
            method,
            fields,
            parse,
            worker=route.get("worker"),
            queue=route.get("queue"),
            workload=route.get("workload"),
            config=route.get("config"),
        )

    def call(
        self, method: str, params: Any = None, *, wait: bool = True, **route: Unpack[Route]
    ) -> Any:
        """Send ``params`` exactly as given (the worker validates them) and return the raw
        JSON result (a future with ``wait=False``). No routing by handle: prefer the
        typed methods.

        Raises:
            UnknownMethodError: not a protocol method.
        """
        worker, workload = route.get("worker"), route.get("workload")
        queue = self._worker_queue(worker) if worker is not None else route.get("queue")
        ref = None if workload is None else {"spec": workload, "config": route.get("config") or {}}
        params = {} if params is None else params
        target = queue or self.settings.pool_queue
        call: Call[Any] = Call(method_spec(method), params, target, ref, raw_result)
        return self.run(call, wait, route.get("timeout_s"))

    # ------------------------------------------------------------------ control

    @overload
    def hello(self, *, wait: Literal[True] = ..., **route: Unpack[Route]) -> HelloResult: ...
    @overload
    def hello(
        self, *, wait: Literal[False], **route: Unpack[Route]
    ) -> FleetFuture[HelloResult]: ...
    def hello(
        self, *, wait: bool = True, **route: Unpack[Route]
    ) -> HelloResult | FleetFuture[HelloResult]:
        """``hello`` on a worker (any worker of the pool by default)."""
        call = self._routed("hello", {}, HelloResult.model_validate, route)
        return self.run(call, wait, route.get("timeout_s"))

    @overload
    def capability_probe(
        self, *, wait: Literal[True] = ..., **route: Unpack[Route]
    ) -> CapabilityProbeResult: ...
    @overload
    def capability_probe(
        self, *, wait: Literal[False], **route: Unpack[Route]
    ) -> FleetFuture[CapabilityProbeResult]: ...
    def capability_probe(
        self, *, wait: bool = True, **route: Unpack[Route]
    ) -> CapabilityProbeResult | FleetFuture[CapabilityProbeResult]:
        """``capability_probe`` on a worker; the estimate is also recorded in the registry."""
        call = self._routed("capability_probe", {}, CapabilityProbeResult.model_validate, route)
        return self.run(call, wait, route.get("timeout_s"))

    def apply_patch(self, patch: dict[str, Any], **route: Unpack[Route]) -> dict[str, Any]:
        """Apply a RuntimePatch on every alive worker that runs the workload (the named
        one, or each worker's default); returns ``{worker: PatchOutcome}``."""
        workload = route.get("workload")
        futures = {
            info.name: self.submit(
                self._routed("apply_patch", patch, raw_result, {**route, "worker": info})
            )
            for info in self.workers()
            if (
                info.default_workload is not None
                if workload is None
                else workload == info.default_workload
                or workload in self.registry.worker_workloads(info.name)
            )
        }
        return {name: f.result(route.get("timeout_s")) for name, f in futures.items()}

    def shutdown(self, worker: WorkerLike, *, timeout_s: float | None = None) -> bool:
        """Stop ``worker`` (a :class:`WorkerInfo` or a name) gracefully: its handles are
        released, then it exits."""
        call = self.prepare("shutdown", {}, ShutdownResult.model_validate, worker=worker)
        return self.run(call, True, timeout_s).ok

    def cancel(self, future: FleetFuture[Any]) -> None:
        """Ask a running long task to stop at its next step boundary."""
        future.cancel()

    # ------------------------------------------------------------------ models

    @overload
    def init_model(
        self, device: str = ..., *, wait: Literal[True] = ..., **route: Unpack[Route]
    ) -> ModelHandle: ...
    @overload
    def init_model(
        self, device: str = ..., *, wait: Literal[False], **route: Unpack[Route]
    ) -> FleetFuture[ModelHandle]: ...
    def init_model(
        self, device: str = AUTO, *, wait: bool = True, **route: Unpack[Route]
    ) -> ModelHandle | FleetFuture[ModelHandle]:
        """Build a model on a worker (named, by queue, or any of the pool)."""
        call = self._routed("init_model", {"device": device}, self.handle_of, route)
        return self.run(call, wait, route.get("timeout_s"))

    def release_model(self, handle: HandleLike, *, timeout_s: float | None = None) -> None:
        """Drop a model on its owner."""
        self.run(self.prepare("release_model", {}, raw_result, handle=handle), True, timeout_s)

    @overload
    def train_window(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        *,
        wait: Literal[True] = ...,
        **options: Any,
    ) -> Metrics: ...
    @overload
    def train_window(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        *,
        wait: Literal[False],
        **options: Any,
    ) -> FleetFuture[Metrics]: ...
    def train_window(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        *,
        wait: bool = True,
        **options: Any,
    ) -> Metrics | FleetFuture[Metrics]:
        """``train_window`` on the owner; returns the metrics. ``options``: the request's
        other fields (``deadline_unix_s``) and ``timeout_s``."""
        timeout_s = options.pop("timeout_s", None)
        fields = {"batches": list(batches), **request_fields(options)}
        return self.run(
            self.prepare("train_window", fields, metrics_result, handle=handle), wait, timeout_s
        )

    def evaluate(
        self, handle: HandleLike, split: Any = "Validation", *, timeout_s: float | None = None
    ) -> Metrics:
        """``evaluate`` on the owner; returns the metrics. ``split``: an EvalSplit."""
        call = self.prepare("evaluate", {"split": split}, metrics_result, handle=handle)
        return self.run(call, True, timeout_s)

    @overload
    def run_inner_loop(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        num_inner_steps: int,
        output_parameter_pack_path: str,
        model_schema_hash: str,
        *,
        wait: Literal[True] = ...,
        **options: Any,
    ) -> RunInnerLoopResult: ...
    @overload
    def run_inner_loop(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        num_inner_steps: int,
        output_parameter_pack_path: str,
        model_schema_hash: str,
        *,
        wait: Literal[False],
        **options: Any,
    ) -> FleetFuture[RunInnerLoopResult]: ...
    def run_inner_loop(
        self,
        handle: HandleLike,
        batches: Sequence[dict[str, Any]],
        num_inner_steps: int,
        output_parameter_pack_path: str,
        model_schema_hash: str,
        *,
        wait: bool = True,
        **options: Any,
    ) -> RunInnerLoopResult | FleetFuture[RunInnerLoopResult]:
        """``run_inner_loop`` on the owner: ``num_inner_steps`` steps, then the output pack.
        ``options``: the request's other fields (``inner_optimizer_state_path``,
        ``require_exact_steps``, ``state_dict_filter``, ``deadline_unix_s``,
        ``input_parameter_pack``, ...; see :class:`~fleet.protocol.RunInnerLoopRequest`)
        and ``timeout_s``."""
        timeout_s = options.pop("timeout_s", None)
        fields = {
            "batches": list(batches),
            "num_inner_steps": num_inner_steps,
            "output_parameter_pack_path": output_parameter_pack_path,
            "model_schema_hash": model_schema_hash,
            **request_fields(options),
        }
        parse = RunInnerLoopResult.model_validate
        call = self.prepare("run_inner_loop", fields, parse, handle=handle)
        return self.run(call, wait, timeout_s)

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
        fields = {"parameter_pack_path": path, "model_schema_hash": model_schema_hash}
        fields |= request_fields({"state_dict_filter": state_dict_filter})
        call = self.prepare("export_parameter_pack", fields, pack_ref_result, handle=handle)
        return self.run(call, True, timeout_s)

    def load_parameter_pack(
        self,
        handle: HandleLike,
        pack: PackRef | str,
        *,
        state_dict_filter: FilterLike = None,
        timeout_s: float | None = None,
    ) -> None:
        """fleet extension: load a pack (a PackRef, whose layout hash and digest the worker
        checks, or a shared-root-relative path) into an existing model in place (its
        optimizer and other state stay)."""
        fields = pack_fields(pack) | request_fields({"state_dict_filter": state_dict_filter})
        self.run(
            self.prepare("load_parameter_pack", fields, raw_result, handle=handle), True, timeout_s
        )

    @overload
    def import_parameter_pack(
        self,
        pack: PackRef | str,
        device: str = ...,
        *,
        state_dict_filter: FilterLike = ...,
        wait: Literal[True] = ...,
        **route: Unpack[Route],
    ) -> ModelHandle: ...
    @overload
    def import_parameter_pack(
        self,
        pack: PackRef | str,
        device: str = ...,
        *,
        state_dict_filter: FilterLike = ...,
        wait: Literal[False],
        **route: Unpack[Route],
    ) -> FleetFuture[ModelHandle]: ...
    def import_parameter_pack(
        self,
        pack: PackRef | str,
        device: str = AUTO,
        *,
        state_dict_filter: FilterLike = None,
        wait: bool = True,
        **route: Unpack[Route],
    ) -> ModelHandle | FleetFuture[ModelHandle]:
        """Hold a new model loaded from a pack (a PackRef, whose layout hash and digest the
        worker checks, or a shared-root-relative path)."""
        fields = {"device": device, **pack_fields(pack)}
        fields |= request_fields({"state_dict_filter": state_dict_filter})
        call = self._routed("import_parameter_pack", fields, self.handle_of, route)
        return self.run(call, wait, route.get("timeout_s"))

    def parameter_pack_plan(
        self, device: str = AUTO, *, state_dict_filter: FilterLike = None, **route: Unpack[Route]
    ) -> ParameterPackPlanResult:
        """The pack plan of a fresh model of the workload."""
        fields = {"device": device, **request_fields({"state_dict_filter": state_dict_filter})}
        parse = ParameterPackPlanResult.model_validate
        call = self._routed("parameter_pack_plan", fields, parse, route)
        return self.run(call, True, route.get("timeout_s"))

    def load_model_artifact(
        self, handle: HandleLike, path: str, *, timeout_s: float | None = None
    ) -> None:
        """Load an artifact file (shared-root relative) into the model."""
        call = self.prepare(
            "load_model_artifact", {"artifact_path": path}, raw_result, handle=handle
        )
        self.run(call, True, timeout_s)

    def materialize_model_artifact(
        self, handle: HandleLike, path: str, *, timeout_s: float | None = None
    ) -> None:
        """Write the model as an artifact file (shared-root relative)."""
        fields = {"artifact_path": path}
        self.run(
            self.prepare("materialize_model_artifact", fields, raw_result, handle=handle),
            True,
            timeout_s,
        )
