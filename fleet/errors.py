"""The one error hierarchy of fleet.

Every failure fleet reports is a :class:`FleetError`. Each subclass names what went
wrong and carries the values that failed as attributes (listed in ``fields``), so a
caller can act on them without parsing the message, and :meth:`FleetError.to_dict`
turns any error into JSON for the wire.

Tree::

    FleetError
      CodecError                 parameter packs (docs/protocol.md section 4)
        NotAPackError            path is not a pack directory (no manifest.json)
        UnknownPackFormatError   manifest "format" is not v1
        ManifestError            manifest missing a key, wrong type, or not JSON
        ValuesLengthError        byte length of values.f32le != 4 * parameter_count
        LayoutMismatchError      pack layout_hash != target model's layout_hash
        DigestMismatchError      content digest of values.f32le differs from manifest
        NonFiniteValuesError     NaN/Inf found when asked to check
        UnsupportedStateError    a model state the codec cannot walk
        MissingLayoutError       shapes needed but the pack does not record them
        ArtifactError            a model artifact that does not fit the model
      StorageError               shared-root paths and the files under them
        PathOutsideRootError     a path escapes the shared root
        StorageFullError         no space left on the shared root (ENOSPC, EDQUOT)
        StorageIOError           any other OS error, with its errno name and text
      DatasetError               microshard datasets (fleet.data)
        DatasetFormatError       not a dataset: no shards, or a bad fetch-manifest.json
        ShardMissingError        a listed shard file does not exist
        ShardSizeMismatchError   a shard's byte length differs from the manifest
        ShardHashMismatchError   a shard's content hash differs from the manifest
        DatasetPathError         a dataset or shard path that escapes the shared root
      ProtocolError              a request or result that breaks the protocol
        RequestValidationError   a malformed request body (missing field, wrong type)
        UnknownMethodError       no such protocol method
        MetricValueError         a metric value that is not bool/int/float/str
        StepBudgetError          require_exact_steps and another step count
        RejectedMessageError     a queued message a worker refused (not JSON, pickle, ...)
      WorkloadError              workload factories and hooks
        BadFactorySpecError      spec is not exactly ``module:attr``
        NotAllowlistedError      spec does not match the worker's allowlist
        FactoryLoadError         import or factory call failed
        HookMissingError         a required hook is not defined
        HookFailedError          a hook raised (original type and traceback kept)
        WorkloadDataError        a TorchWorkload data source gave no batch
      RegistryError              the Redis registry of workers and handles
        HandleNotFound           model_id not held (here / anywhere)
        OwnerLostError           the handle's owner stopped heartbeating
        WorkerNotFound           no live worker by that name
        NoWorkersError           fewer live workers than a run needs
        WorkerSlotTakenError     a worker name (GPU or CPU slot) held by a live worker
      TrainingStopped            a long task stopped between steps
        TaskAborted              asked to abort
        DeadlineExceeded         past its deadline with require_exact_steps
      JobError                   jobs and the DiLoCo driver
        JobNotFound              no job with this id
        JobStateError            a status change the job's status does not allow
        JobCancelled             the job was cancelled while the driver ran
        JobOwnedError            another live orchestrator owns the job
        FencedOutError           this orchestrator lost the job to a newer owner
        RoundFailed              no replica of a DiLoCo round published a pack
        CorruptCheckpointError   a committed pack is corrupt and cannot be recomputed
      ConfigError                run configs and experiment trackers
        RunConfigError           a run config (file or flags) that does not validate
        TrackerError             a tracker that cannot be used
      BrokerUnavailableError     Redis (broker, results, registry) cannot be reached
      RemoteTaskError            a task failed on a worker (client side); a remote
                                 FleetError comes back as its own class, which
                                 also derives from RemoteTaskError
      FleetTimeout               a call's result did not arrive in time (client side)
"""

from __future__ import annotations

import errno as errno_module
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


class ArtifactError(CodecError):
    """A model artifact (fleet's default: the model's state dict as safetensors) does
    not match the model it is loaded into: ``missing`` / ``unexpected`` tensor names,
    or ``mismatched`` ``{name: "artifact shape vs model shape"}``."""

    fields = ("path", "missing", "unexpected", "mismatched")

    def __init__(
        self,
        path: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if mismatched:
            parts.append(f"shape/dtype differs for {dict(list(mismatched.items())[:5])}")
        if detail:
            parts.append(detail)
        super().__init__(f"artifact {path} does not fit the model: {'; '.join(parts)}", path=path)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = dict(mismatched or {})


# --------------------------------------------------------------------------- storage


class StorageError(FleetError):
    """A shared-root path or a file under it could not be used; ``path`` is that path
    when it is known (None otherwise)."""

    fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class PathOutsideRootError(StorageError):
    """A path resolves outside the shared root (``..``, absolute, or a symlink out)."""

    fields = ("path", "root")

    def __init__(self, path: str, root: str) -> None:
        super().__init__(f"path {path!r} escapes the shared root {root!r}")
        self.path = path
        self.root = root


class StorageFullError(StorageError, OSError):
    """No space left where ``path`` was being written (``ENOSPC`` or ``EDQUOT``).
    Nothing partial is left behind: temp files are removed. Also an :class:`OSError`
    with that errno."""

    fields = ("path", "errno_name")

    def __init__(self, path: str, errno_name: str = "ENOSPC") -> None:
        super().__init__(f"no space left on the shared root writing {path} ({errno_name})")
        self.path = path
        self.errno_name = errno_name
        self.errno = getattr(errno_module, errno_name, None)
        self.filename = path


class StorageIOError(StorageError, OSError):
    """An OS error on the shared root other than a full disk, with its ``errno_name``
    (e.g. ``"EACCES"``) and ``strerror`` text. Also an :class:`OSError` with that errno."""

    fields = ("path", "errno_name", "strerror")

    def __init__(self, path: str | None, errno_name: str, strerror: str) -> None:
        where = f" on {path}" if path else ""
        super().__init__(f"{errno_name}: {strerror}{where}")
        self.path = path
        self.errno_name = errno_name
        self.strerror = strerror
        self.errno = getattr(errno_module, errno_name, None)
        self.filename = path


def storage_error(exc: OSError, path: str | None = None) -> StorageError:
    """The typed error for an OS error: :class:`StorageFullError` for ``ENOSPC`` /
    ``EDQUOT``, :class:`StorageIOError` (errno name and text) otherwise."""
    if isinstance(exc, StorageError):
        return exc
    name = errno_module.errorcode.get(exc.errno or 0, "EIO" if exc.errno else "OSError")
    where = path or (str(exc.filename) if exc.filename is not None else None)
    if exc.errno in (errno_module.ENOSPC, errno_module.EDQUOT):
        return StorageFullError(where or "?", name)
    return StorageIOError(where, name, exc.strerror or str(exc))


# --------------------------------------------------------------------------- datasets


class DatasetError(FleetError):
    """A microshard dataset cannot be used as it is (``path``: the dataset directory)."""

    fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class DatasetFormatError(DatasetError):
    """Not a dataset: no shard files, or a ``fetch-manifest.json`` that is not valid."""

    fields = ("path", "detail")

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"dataset {path}: {detail}", path=path)
        self.detail = detail


class ShardMissingError(DatasetError):
    """A microshard listed by the dataset has no file."""

    fields = ("path", "microshard_id", "shard_path")

    def __init__(self, path: str, microshard_id: str, shard_path: str) -> None:
        super().__init__(
            f"dataset {path}: microshard {microshard_id!r} has no file {shard_path}", path=path
        )
        self.microshard_id = microshard_id
        self.shard_path = shard_path


class ShardSizeMismatchError(DatasetError):
    """A microshard's file is not ``expected_bytes`` long."""

    fields = ("path", "microshard_id", "expected_bytes", "actual_bytes")

    def __init__(
        self, path: str, microshard_id: str, expected_bytes: int, actual_bytes: int
    ) -> None:
        super().__init__(
            f"dataset {path}: microshard {microshard_id!r} has {actual_bytes} bytes, "
            f"the manifest says {expected_bytes}",
            path=path,
        )
        self.microshard_id = microshard_id
        self.expected_bytes = expected_bytes
        self.actual_bytes = actual_bytes


class ShardHashMismatchError(DatasetError):
    """A microshard's content hash (sha2-256 multihash, hex) differs from the manifest's."""

    fields = ("path", "microshard_id", "expected", "actual")

    def __init__(self, path: str, microshard_id: str, expected: str, actual: str) -> None:
        super().__init__(
            f"dataset {path}: microshard {microshard_id!r} hashes to {actual}, "
            f"the manifest says {expected}",
            path=path,
        )
        self.microshard_id = microshard_id
        self.expected = expected
        self.actual = actual


class DatasetPathError(DatasetError):
    """The dataset directory, or a shard's locator, escapes the shared root; or an
    absolute shard path lies outside ``FLEET_DATA_ROOTS`` (``data_roots``)."""

    fields = ("path", "shard_path", "data_roots")

    def __init__(
        self, path: str, shard_path: str | None = None, *, data_roots: list[str] | None = None
    ) -> None:
        what = (
            f"microshard path {shard_path!r} of dataset {path}" if shard_path else f"dataset {path}"
        )
        if data_roots:
            reason = f"is outside FLEET_DATA_ROOTS ({', '.join(data_roots)})"
        else:
            reason = "escapes the shared root"
        super().__init__(f"{what} {reason}", path=path)
        self.shard_path = shard_path
        self.data_roots = data_roots


# --------------------------------------------------------------------------- protocol


class ProtocolError(FleetError):
    """A request or result does not follow docs/protocol.md."""


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


class RejectedMessageError(ProtocolError):
    """A worker refused a queued message instead of running it: not JSON, not a Celery
    message, or a refused content type (pickle, YAML). The message is kept in the
    dead-letter list ``fleet:deadletter`` with this ``reason``."""

    fields = ("reason", "content_type", "queue", "task_id")

    def __init__(
        self, reason: str, *, content_type: str | None, queue: str | None, task_id: str | None
    ) -> None:
        super().__init__(
            f"message {task_id or '(no task id)'} on queue {queue or '?'} refused: {reason}"
        )
        self.reason = reason
        self.content_type = content_type
        self.queue = queue
        self.task_id = task_id


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


class WorkloadDataError(WorkloadError):
    """A :class:`~fleet.workloads.TorchWorkload` data source (``train_data``,
    ``eval_data``) gave no batch where one was needed. ``spec`` is the workload's:
    a data source does not know it, so :meth:`fleet.workload.Workload.call` sets it
    when the error leaves the hook."""

    fields = ("spec", "source", "detail")

    def __init__(self, source: str, detail: str, *, spec: str | None = None) -> None:
        super().__init__(f"{source}: {detail}", spec=spec)
        self.source = source
        self.detail = detail


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


class NoWorkersError(RegistryError):
    """Fewer than ``wanted`` live workers (``alive`` of them) after ``waited_s`` seconds."""

    fields = ("wanted", "alive", "waited_s")

    def __init__(self, wanted: int, alive: int, waited_s: float) -> None:
        waited = f" after waiting {waited_s:g} s" if waited_s else ""
        super().__init__(
            f"{alive} live worker(s), {wanted} needed{waited}: start workers with "
            "`fleet worker --cpu` / `fleet worker --gpu N`, or a local fleet with `fleet up`"
        )
        self.wanted = wanted
        self.alive = alive
        self.waited_s = waited_s


class WorkerSlotTakenError(RegistryError):
    """The worker name (its GPU or CPU slot on this node) is held by a live worker."""

    fields = ("worker", "holder_pid", "holder_host", "heartbeat_age_s")

    def __init__(
        self, worker: str, holder_pid: int, holder_host: str, heartbeat_age_s: float
    ) -> None:
        super().__init__(
            f"{worker} is already running as pid {holder_pid} on {holder_host} "
            f"(heartbeat {heartbeat_age_s:.1f} s ago); pick another --slot / --gpu"
        )
        self.worker = worker
        self.holder_pid = holder_pid
        self.holder_host = holder_host
        self.heartbeat_age_s = heartbeat_age_s


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
    """No replica of round ``round`` could publish a pack; ``errors`` says why, per attempt."""

    fields = ("round", "errors")

    def __init__(self, round: int, errors: list[str]) -> None:
        super().__init__(f"round {round}: no replica published a pack ({'; '.join(errors)})")
        self.round = round
        self.errors = errors


class CorruptCheckpointError(JobError):
    """A committed checkpoint pack of round ``round`` (``path``) is corrupt, and the
    inputs it was computed from are not intact either, so it cannot be recomputed."""

    fields = ("job_id", "round", "path", "cause")

    def __init__(self, job_id: str, round: int, path: str, cause: str) -> None:
        super().__init__(
            f"job {job_id}: the pack {path} entering round {round} is corrupt and "
            f"cannot be recomputed ({cause})"
        )
        self.job_id = job_id
        self.round = round
        self.path = path
        self.cause = cause


class JobCancelled(JobError):
    """The job was cancelled while the driver ran."""

    fields = ("job_id",)

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class JobOwnedError(JobError):
    """Another orchestrator holds the job's owner lease (and heartbeats)."""

    fields = ("job_id", "owner_host", "owner_pid", "heartbeat_age_s")

    def __init__(
        self, job_id: str, owner_host: str, owner_pid: int, heartbeat_age_s: float
    ) -> None:
        super().__init__(
            f"job {job_id} is run by pid {owner_pid} on {owner_host} (heartbeat "
            f"{heartbeat_age_s:.1f} s ago); stop it first, or wait until its lease expires"
        )
        self.job_id = job_id
        self.owner_host = owner_host
        self.owner_pid = owner_pid
        self.heartbeat_age_s = heartbeat_age_s


class FencedOutError(JobError):
    """This orchestrator's fencing ``token`` is no longer the job's ``current`` one: a
    newer owner took the job over, so nothing this one writes is accepted."""

    fields = ("job_id", "token", "current")

    def __init__(self, job_id: str, token: int, current: int | None) -> None:
        super().__init__(
            f"job {job_id}: fencing token {token} is stale (current {current}); "
            "another orchestrator took the job over"
        )
        self.job_id = job_id
        self.token = token
        self.current = current


# --------------------------------------------------------------------------- configs


class ConfigError(FleetError):
    """A run config or tracker that fleet cannot use."""


class RunConfigError(ConfigError):
    """A run config (a ``--config`` file, flags, or both) that does not validate:
    ``source`` names the file or ``flags``, ``detail`` the keys and what is wrong."""

    fields = ("source", "detail")

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


class TrackerError(ConfigError):
    """A ``--tracker`` that cannot be used (unknown kind, missing place or library)."""

    fields = ("kind", "detail")

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"tracker {kind!r}: {detail}")
        self.kind = kind
        self.detail = detail


# --------------------------------------------------------------------------- client side


class BrokerUnavailableError(FleetError):
    """Redis (the broker, result backend and registry) cannot be reached, or refuses
    the credentials or the TLS handshake. ``url`` has no password."""

    fields = ("url", "cause")

    def __init__(self, url: str, cause: str) -> None:
        super().__init__(
            f"Redis at {url} is unavailable ({cause}); start a local fleet with `fleet up`, "
            "or set FLEET_REDIS_URL to a reachable Redis"
        )
        self.url = url
        self.cause = cause


class RemoteTaskError(FleetError):
    """A fleet task failed on a worker.

    ``error_type`` is the remote exception's class name (e.g. ``"HandleNotFound"``),
    ``data`` its fields when it was a FleetError, ``remote_traceback`` the worker's
    traceback text. A remote :class:`FleetError` is raised as its own class (see
    :func:`remote_error`), which derives from both that class and this one, so
    ``except LayoutMismatchError`` and ``except RemoteTaskError`` both catch it.
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


# --------------------------------------------------------------------------- remote errors

_REMOTE_CLASSES: dict[type[FleetError], type[RemoteTaskError]] = {}
_REMOTE_FIELDS = RemoteTaskError.fields


def _fleet_error_classes() -> dict[str, type[FleetError]]:
    """Every FleetError subclass by name (the wire carries only the name)."""
    out: dict[str, type[FleetError]] = {}
    pending: list[type[FleetError]] = [FleetError]
    while pending:
        cls = pending.pop()
        if cls not in _REMOTE_CLASSES.values():
            out.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return out


def remote_class(cls: type[FleetError]) -> type[RemoteTaskError]:
    """The class a remote ``cls`` is raised as on the caller's side: named like ``cls``
    and deriving from both ``cls`` and :class:`RemoteTaskError`."""
    if issubclass(cls, RemoteTaskError):
        return cls
    if issubclass(RemoteTaskError, cls):  # FleetError itself: RemoteTaskError is one
        return RemoteTaskError
    klass = _REMOTE_CLASSES.get(cls)
    if klass is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__} raised on a worker (see RemoteTaskError).",
            "fields": tuple(dict.fromkeys(cls.fields + _REMOTE_FIELDS)),
            "__reduce__": _remote_reduce,
        }
        klass = type(cls.__name__, (cls, RemoteTaskError), namespace)
        _REMOTE_CLASSES[cls] = klass
    return klass


def _remote_reduce(self: FleetError) -> tuple[Any, ...]:
    base = next(c for c in type(self).__mro__[1:] if c in _REMOTE_CLASSES)
    return (_restore_remote, (base, self.args, dict(self.__dict__)))


def _restore_remote(base: type[FleetError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    return _restore(remote_class(base), args, state)


def remote_error(
    *,
    method: str,
    worker: str | None,
    task_id: str,
    error_type: str,
    error: str,
    data: dict[str, Any] | None,
    remote_traceback: str | None,
) -> RemoteTaskError:
    """The caller-side error for a task that failed on a worker.

    A :class:`FleetError` named ``error_type`` is rebuilt as :func:`remote_class` of it
    with its ``data`` as attributes (where a data field shares a name with one of
    :class:`RemoteTaskError`'s, e.g. :class:`HookFailedError`'s ``error_type``, the
    attribute is the remote one and ``data`` keeps the original). A plain
    :class:`FleetError`, or any other error type, gives a plain :class:`RemoteTaskError`.
    """
    remote: dict[str, Any] = {
        "method": method,
        "worker": worker,
        "task_id": task_id,
        "error_type": error_type,
        "error": error,
        "data": dict(data or {}),
        "remote_traceback": remote_traceback,
    }
    base = _fleet_error_classes().get(error_type)
    if base is None or issubclass(RemoteTaskError, base):
        return RemoteTaskError(method, worker, task_id, error_type, error, data, remote_traceback)
    klass = remote_class(base)
    message = f"{method} failed on {worker or '?'}: {error_type}: {error}"
    exc = klass.__new__(klass)
    Exception.__init__(exc, message)
    exc.__dict__.update({k: v for k, v in (data or {}).items() if k not in remote})
    exc.__dict__.update(remote, message=message)
    return exc
