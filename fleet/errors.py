"""The one error hierarchy of fleet.

Every failure fleet reports is a :class:`FleetError`. Each subclass names what went
wrong and carries the values that failed as attributes (listed in ``fields``), so a
caller can act on them without parsing the message, and :meth:`FleetError.to_dict`
turns any error into JSON for the wire.

Tree::

    FleetError
      CodecError                 parameter packs (PROTOCOL.md section 4)
        NotAPackError            path is not a pack directory (no manifest.json)
        UnknownPackFormatError   manifest "format" is not v1
        ManifestError            manifest missing a key, wrong type, or not JSON
        ValuesLengthError        byte length of values.f32le != 4 * parameter_count
        LayoutMismatchError      pack layout_hash != target model's layout_hash
        DigestMismatchError      content digest of values.f32le differs from manifest
        NonFiniteValuesError     NaN/Inf found when asked to check
        UnsupportedStateError    a model state the codec cannot walk
        MissingLayoutError       shapes needed but the pack does not record them
      StorageError               shared-root paths
        PathOutsideRootError     a path escapes the shared root
      ProtocolError              a request or result that breaks PROTOCOL.md
        RequestValidationError   a malformed request body (missing field, wrong type)
        UnknownMethodError       no such protocol method
        MetricValueError         a metric value that is not bool/int/float/str
        StepBudgetError          require_exact_steps and another step count
      WorkloadError              workload factories and hooks
        BadFactorySpecError      spec is not exactly ``module:attr``
        NotAllowlistedError      spec does not match the worker's allowlist
        FactoryLoadError         import or factory call failed
        HookMissingError         a required hook is not defined
        HookFailedError          a hook raised (original type and traceback kept)
      RegistryError              the Redis registry of workers and handles
        HandleNotFound           model_id not held (here / anywhere)
        OwnerLostError           the handle's owner stopped heartbeating
        WorkerNotFound           no live worker by that name
      TrainingStopped            a long task stopped between steps
        TaskAborted              asked to abort
        DeadlineExceeded         past its deadline with require_exact_steps
      JobError                   jobs and the DiLoCo driver
        JobNotFound              no job with this id
        JobStateError            a status change the job's status does not allow
        JobCancelled             the job was cancelled while the driver ran
        RoundFailed              no replica of a DiLoCo round published a pack
      RemoteTaskError            a task failed on a worker (client side)
      FleetTimeout               a call's result did not arrive in time (client side)
"""

from __future__ import annotations

from typing import Any, ClassVar


class FleetError(Exception):
    """Root of every error fleet raises.

    Subclasses list in ``fields`` the attribute names that carry the failing data.
    """

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their data as named arguments, so the default (cls(*args))
        # cannot rebuild them; Celery's pool pickles errors from child to parent.
        return (_restore, (type(self), self.args, dict(self.__dict__)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"type": class name, "message": str, "data": {field: value}}``."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "data": {name: getattr(self, name) for name in self.fields},
        }


def _restore(cls: type[FleetError], args: tuple[Any, ...], state: dict[str, Any]) -> FleetError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


# --------------------------------------------------------------------------- codec


class CodecError(FleetError):
    """A parameter pack could not be written, read or loaded."""

    fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NotAPackError(CodecError):
    """``path`` is not a pack directory (missing, a file, or without ``manifest.json``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"not a parameter pack: {path} ({reason})", path=path)
        self.reason = reason

    fields = ("path", "reason")


class UnknownPackFormatError(CodecError):
    """The manifest's ``format`` is not one this codec reads."""

    fields = ("path", "format", "expected")

    def __init__(self, path: str, format: object, expected: str) -> None:
        super().__init__(
            f"unknown pack format {format!r} in {path} (expected {expected!r})", path=path
        )
        self.format = format
        self.expected = expected


class ManifestError(CodecError):
    """The manifest is not JSON, lacks a required key, or has a value of the wrong type."""

    fields = ("path", "key", "detail")

    def __init__(self, path: str, key: str | None, detail: str) -> None:
        where = f" key {key!r}" if key else ""
        super().__init__(f"bad pack manifest in {path}:{where} {detail}", path=path)
        self.key = key
        self.detail = detail


class ValuesLengthError(CodecError):
    """``values.f32le`` is not ``4 * parameter_count`` bytes long (truncated or padded)."""

    fields = ("path", "expected_bytes", "actual_bytes", "parameter_count")

    def __init__(self, path: str, expected_bytes: int, actual_bytes: int) -> None:
        super().__init__(
            f"values file {path} has {actual_bytes} bytes, expected {expected_bytes} "
            f"(4 * parameter_count {expected_bytes // 4})",
            path=path,
        )
        self.expected_bytes = expected_bytes
        self.actual_bytes = actual_bytes
        self.parameter_count = expected_bytes // 4


class LayoutMismatchError(CodecError):
    """The pack's layout hash differs from the layout of the model it is loaded into."""

    fields = ("path", "pack_layout_hash", "model_layout_hash")

    def __init__(self, path: str, pack_layout_hash: str, model_layout_hash: str) -> None:
        super().__init__(
            f"layout mismatch loading {path}: pack has {pack_layout_hash}, "
            f"model has {model_layout_hash}",
            path=path,
        )
        self.pack_layout_hash = pack_layout_hash
        self.model_layout_hash = model_layout_hash


class DigestMismatchError(CodecError):
    """The content digest of ``values.f32le`` differs from the one in the manifest."""

    fields = ("path", "expected", "actual")

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"content digest mismatch in {path}: manifest says {expected}, values hash to {actual}",
            path=path,
        )
        self.expected = expected
        self.actual = actual


class NonFiniteValuesError(CodecError):
    """The pack holds NaN or infinite values (raised only when asked to check)."""

    fields = ("path", "count", "first_index")

    def __init__(self, path: str, count: int, first_index: int) -> None:
        super().__init__(
            f"{count} non-finite values in {path} (first at flat index {first_index})",
            path=path,
        )
        self.count = count
        self.first_index = first_index


class UnsupportedStateError(CodecError):
    """A model state that is not a module, ``{"model": m}``, ``{"modules": {...}}`` or a
    ``{name: Tensor}`` mapping, or a ``{"modules"}`` name that is empty or has a dot."""

    fields = ("detail",)

    def __init__(self, detail: str) -> None:
        super().__init__(f"unsupported model state: {detail}")
        self.detail = detail


class MissingLayoutError(CodecError):
    """Tensor shapes are needed (e.g. for safetensors) but the pack does not record them
    and no template state was given."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"pack {path} has no 'layout' entries in its manifest; pass a template state",
            path=path,
        )


# --------------------------------------------------------------------------- storage


class StorageError(FleetError):
    """A shared-root path could not be used."""

    fields: ClassVar[tuple[str, ...]] = ()


class PathOutsideRootError(StorageError):
    """A path resolves outside the shared root (``..``, absolute, or a symlink out)."""

    fields = ("path", "root")

    def __init__(self, path: str, root: str) -> None:
        super().__init__(f"path {path!r} escapes the shared root {root!r}")
        self.path = path
        self.root = root


# --------------------------------------------------------------------------- protocol


class ProtocolError(FleetError):
    """A request or result does not follow PROTOCOL.md."""


class RequestValidationError(ProtocolError):
    """A request body is malformed. ``errors`` lists ``{loc, msg, type}`` per problem."""

    fields = ("method", "errors")

    def __init__(self, method: str, errors: list[dict[str, Any]]) -> None:
        summary = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<body>'}: {e['msg']}" for e in errors
        )
        super().__init__(f"invalid {method} request: {summary}")
        self.method = method
        self.errors = errors


class UnknownMethodError(ProtocolError):
    """No protocol method of that name."""

    fields = ("method",)

    def __init__(self, method: str) -> None:
        super().__init__(f"unknown protocol method {method!r}")
        self.method = method


class MetricValueError(ProtocolError):
    """A hook returned a metric value that is not bool, int, float or str."""

    fields = ("hook", "key", "value_type")

    def __init__(self, hook: str, key: str, value_type: str) -> None:
        super().__init__(
            f"{hook} returned metric {key!r} of type {value_type}; metric values are "
            "bool, int, float or str"
        )
        self.hook = hook
        self.key = key
        self.value_type = value_type


class StepBudgetError(ProtocolError):
    """``require_exact_steps`` was set and a different number of steps ran."""

    fields = ("steps_completed", "num_inner_steps")

    def __init__(self, steps_completed: int, num_inner_steps: int) -> None:
        super().__init__(
            f"require_exact_steps: {steps_completed} steps completed, {num_inner_steps} required"
        )
        self.steps_completed = steps_completed
        self.num_inner_steps = num_inner_steps


# --------------------------------------------------------------------------- workload


class WorkloadError(FleetError):
    """A workload factory or hook could not be used."""

    fields: ClassVar[tuple[str, ...]] = ("spec",)

    def __init__(self, message: str, *, spec: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec


class BadFactorySpecError(WorkloadError):
    """The factory spec is not exactly ``module:attr`` (one colon, both parts non-empty)."""

    def __init__(self, spec: str) -> None:
        super().__init__(f"bad workload factory spec {spec!r}: expected 'module:attr'", spec=spec)


class NotAllowlistedError(WorkloadError):
    """The spec matches none of the worker's allowlist globs."""

    fields = ("spec", "allowlist")

    def __init__(self, spec: str, allowlist: list[str]) -> None:
        super().__init__(
            f"workload {spec!r} is not on this worker's allowlist {allowlist}", spec=spec
        )
        self.allowlist = allowlist


class FactoryLoadError(WorkloadError):
    """Importing the module, finding the attribute, or calling the factory failed."""

    fields = ("spec", "detail")

    def __init__(self, spec: str, detail: str) -> None:
        super().__init__(f"cannot build workload {spec!r}: {detail}", spec=spec)
        self.detail = detail


class NoWorkloadError(WorkloadError):
    """The call names no workload and the worker has no default one."""

    def __init__(self) -> None:
        super().__init__("no workload given and this worker has no default workload")


class HookMissingError(WorkloadError):
    """The workload does not define a hook the call needs."""

    fields = ("spec", "hook")

    def __init__(self, spec: str, hook: str) -> None:
        super().__init__(f"workload {spec!r} has no {hook}() hook", spec=spec)
        self.hook = hook


class HookFailedError(WorkloadError):
    """A workload hook raised. Keeps the original exception's type, text and traceback."""

    fields = ("spec", "hook", "error_type", "error", "hook_traceback")

    def __init__(
        self, spec: str, hook: str, error_type: str, error: str, hook_traceback: str
    ) -> None:
        super().__init__(f"{hook}() of {spec!r} raised {error_type}: {error}", spec=spec)
        self.hook = hook
        self.error_type = error_type
        self.error = error
        self.hook_traceback = hook_traceback


# --------------------------------------------------------------------------- registry


class RegistryError(FleetError):
    """The registry of workers and model handles cannot answer as asked."""


class HandleNotFound(RegistryError):
    """No model handle with this id here. ``record`` is its registry record, if any
    (e.g. held by another worker, or released)."""

    fields = ("model_id", "worker", "record")

    def __init__(
        self, model_id: str, *, worker: str | None = None, record: dict[str, Any] | None = None
    ) -> None:
        where = f" on worker {worker}" if worker else ""
        owner = (
            f" (registry: owned by {record.get('owner')})" if record else " (not in the registry)"
        )
        super().__init__(f"model handle {model_id!r} not found{where}{owner}")
        self.model_id = model_id
        self.worker = worker
        self.record = record


class OwnerLostError(RegistryError):
    """The worker owning a handle stopped heartbeating; ``last_pack`` is the PackRef the
    handle can be restored from (None if it never published one)."""

    fields = ("model_id", "owner", "last_pack")

    def __init__(self, model_id: str, owner: str, last_pack: dict[str, Any] | None) -> None:
        restore = (
            f"; restore it from its last pack {last_pack['path']!r}"
            if last_pack
            else "; it never published a pack"
        )
        super().__init__(f"owner {owner!r} of model handle {model_id!r} is lost{restore}")
        self.model_id = model_id
        self.owner = owner
        self.last_pack = last_pack


class WorkerNotFound(RegistryError):
    """No live worker with this name."""

    fields = ("worker",)

    def __init__(self, worker: str) -> None:
        super().__init__(f"no live worker named {worker!r}")
        self.worker = worker


# --------------------------------------------------------------------------- long tasks


class TrainingStopped(FleetError):
    """A long task stopped between steps. ``steps_completed`` steps were done."""

    fields: ClassVar[tuple[str, ...]] = ("task_id", "steps_completed", "reason")

    def __init__(self, task_id: str | None, steps_completed: int, reason: str) -> None:
        super().__init__(f"task {task_id} stopped after {steps_completed} steps: {reason}")
        self.task_id = task_id
        self.steps_completed = steps_completed
        self.reason = reason


class TaskAborted(TrainingStopped):
    """The task was asked to abort (``Fleet.cancel`` / a job cancel)."""

    def __init__(self, task_id: str | None, steps_completed: int) -> None:
        super().__init__(task_id, steps_completed, "aborted")


class DeadlineExceeded(TrainingStopped):
    """The deadline passed before ``num_inner_steps`` with ``require_exact_steps``."""

    def __init__(self, task_id: str | None, steps_completed: int) -> None:
        super().__init__(task_id, steps_completed, "deadline passed")


# --------------------------------------------------------------------------- jobs


class JobError(FleetError):
    """A job or the driver running it cannot go on as asked."""


class JobNotFound(JobError):
    """No job with this id."""

    fields = ("job_id",)

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class JobStateError(JobError):
    """A status change that the job's current status does not allow."""

    fields = ("job_id", "status", "requested")

    def __init__(self, job_id: str, status: str, requested: str) -> None:
        super().__init__(f"job {job_id} is {status}; cannot become {requested}")
        self.job_id = job_id
        self.status = status
        self.requested = requested


class RoundFailed(JobError):
    """No replica of a round could publish a pack."""

    fields = ("round", "errors")

    def __init__(self, round_index: int, errors: list[str]) -> None:
        super().__init__(f"round {round_index}: no replica published a pack ({'; '.join(errors)})")
        self.round = round_index
        self.errors = errors


class JobCancelled(JobError):
    """The job was cancelled while the driver ran."""

    fields = ("job_id",)

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


# --------------------------------------------------------------------------- client side


class RemoteTaskError(FleetError):
    """A fleet task failed on a worker.

    ``error_type`` is the remote exception's class name (e.g. ``"HandleNotFound"``),
    ``data`` its fields when it was a FleetError, ``remote_traceback`` the worker's
    traceback text.
    """

    fields = ("method", "worker", "task_id", "error_type", "error", "data", "remote_traceback")

    def __init__(
        self,
        method: str,
        worker: str | None,
        task_id: str,
        error_type: str,
        error: str,
        data: dict[str, Any] | None,
        remote_traceback: str | None,
    ) -> None:
        super().__init__(f"{method} failed on {worker or '?'}: {error_type}: {error}")
        self.method = method
        self.worker = worker
        self.task_id = task_id
        self.error_type = error_type
        self.error = error
        self.data = data or {}
        self.remote_traceback = remote_traceback


class FleetTimeout(FleetError):
    """A call's result did not arrive within ``timeout_s`` seconds."""

    fields = ("method", "task_id", "timeout_s")

    def __init__(self, method: str, task_id: str, timeout_s: float) -> None:
        super().__init__(f"{method} (task {task_id}) gave no result within {timeout_s:g} s")
        self.method = method
        self.task_id = task_id
        self.timeout_s = timeout_s
