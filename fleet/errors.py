"""The one error hierarchy of fleet.

Every failure fleet reports is a :class:`FleetError`. Each subclass names what went
wrong and carries the values that failed as attributes (listed in ``fields``), so a
caller can act on them without parsing the message, and :meth:`FleetError.to_dict`
turns any error into JSON for the wire.

Each error declares its fields once, as annotations (dataclass style), and its message
as a ``template``; its constructor, ``fields``, ``to_dict``, pickling and the class a
caller rebuilds from the wire (:func:`remote_error`) all follow from that. A new error::

    class LeaseLostError(JobError):
        '''Lease ``lease_id`` of job ``job_id`` expired before the replica finished.'''

        job_id: str
        lease_id: str
        attempt: int | None = field(default=None, kw_only=True)
        template = "job {job_id}: lease {lease_id} expired"

Tree (each class's docstring says what it means and what its fields hold)::

    FleetError
      CodecError        parameter packs (docs/protocol.md section 4): NotAPackError,
                        UnknownPackFormatError, ManifestError, ValuesLengthError,
                        LayoutMismatchError, DigestMismatchError, BaseMismatchError,
                        GlobalDigestMismatchError, NonFiniteValuesError,
                        UnsupportedStateError, MissingLayoutError, ArtifactError
      StorageError      shared-root paths and the files under them: PathOutsideRootError,
                        StorageFullError, StorageIOError, StorageUnavailableError
      DatasetError      microshard datasets (fleet.data): DatasetFormatError,
                        ShardMissingError, ShardSizeMismatchError, ShardHashMismatchError,
                        DatasetPathError
      ProtocolError     a request or result that breaks the protocol:
                        RequestValidationError, UnknownMethodError, MetricValueError,
                        StepBudgetError, RejectedMessageError
      WorkloadError     workload factories and hooks: BadFactorySpecError,
                        NotAllowlistedError, FactoryLoadError, NoWorkloadError,
                        HookMissingError, HookFailedError, WorkloadDataError
      RegistryError     the Redis registry of workers and handles: HandleNotFound,
                        OwnerLostError, WorkerNotFound, NoWorkersError, WorkerSlotTakenError
      TrainingStopped   a long task stopped between steps: TaskAborted, DeadlineExceeded
      JobError          jobs and the DiLoCo driver: JobNotFound, JobStateError,
                        JobCancelled, JobOwnedError, FencedOutError, RoundFailed,
                        CorruptCheckpointError, FragmentSplitError
      ConfigError       run configs and experiment trackers: RunConfigError, TrackerError
      BrokerUnavailableError, RemoteTaskError, FleetTimeout    on the client side
"""

from __future__ import annotations

import contextlib
import errno as errno_module
import inspect
import string
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, cast, dataclass_transform

#: A field without a default: the constructor requires it, or ``__post_init__`` sets it.
_EMPTY: Any = inspect.Parameter.empty


class _Field(NamedTuple):
    default: Any = _EMPTY
    init: bool = True
    kw_only: bool = False


def field(*, default: Any = _EMPTY, init: bool = True, kw_only: bool = False) -> Any:
    """A field with a ``default``, keyword-only (``kw_only``), or left out of the
    constructor (``init=False``: its ``default``, or ``__post_init__``, sets it)."""
    return _Field(default, init, kw_only)


@dataclass_transform(field_specifiers=(field,))
class FleetError(Exception):
    """Root of every error fleet raises.

    A subclass declares its fields as annotations, dataclass style: inherited ones come
    first, a redeclared one keeps its place. They give ``fields`` (the wire's ``data``
    keys, in order) and the constructor (the fields in order, positional unless
    ``kw_only``), which sets them, calls ``__post_init__`` to derive the rest, then
    makes the message: ``template`` filled with the fields (:meth:`str.format`), or
    :meth:`_message` for a message with conditional parts. A class without fields (or
    with an ``__init__`` of its own) takes its message as given.

    Raises:
        TypeError: at class creation, a template naming something that is not a field.
        ValueError: at class creation, a positional field without a default after one
            with.
    """

    #: The names of the attributes that carry the failing data, in wire order.
    fields: ClassVar[tuple[str, ...]] = ()
    #: The message, ``str.format``-ed with the fields.
    template: ClassVar[str] = ""
    _specs: ClassVar[dict[str, _Field]] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        specs: dict[str, _Field] = {}
        for base in reversed(cls.__mro__[1:]):
            specs.update(base.__dict__.get("_specs", {}))
        for name, annotation in inspect.get_annotations(cls).items():
            if str(annotation).split("[")[0].endswith("ClassVar"):
                continue
            value = cls.__dict__.get(name, _EMPTY)
            specs[name] = spec = value if isinstance(value, _Field) else _Field(value)
            if spec.default is not _EMPTY:
                setattr(cls, name, spec.default)
            elif isinstance(value, _Field):
                delattr(cls, name)
        cls._specs = specs
        if "fields" not in cls.__dict__:
            cls.fields = tuple(specs)
        if specs and "__init__" not in cls.__dict__:
            if cls._message is FleetError._message:
                parsed = string.Formatter().parse(cls.template)
                named = {n.split(".")[0].split("[")[0] for _, n, _, _ in parsed if n}
                if not cls.template or not named <= set(specs):
                    raise TypeError(f"{cls.__name__}.template {cls.template!r}: fields {[*specs]}")
            setattr(cls, "__init__", _field_init(cls, specs))  # noqa: B010

    def __post_init__(self) -> None:
        """Derive what is not given from the fields (after they are set, before the
        message; again when the error is unpickled or rebuilt from the wire)."""

    def _message(self) -> str:
        return self.template.format(**{name: getattr(self, name) for name in self._specs})

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its state, not by calling the constructor again: Celery's pool
        # pickles errors from child to parent.
        return (_restore, (type(self), self.args, _state(self)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"type": class name, "message": str, "data": {field: value}}``."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "data": {name: getattr(self, name) for name in self.fields},
        }


def _field_init(cls: type[FleetError], specs: dict[str, _Field]) -> Callable[..., None]:
    """The constructor of ``cls``, from its fields."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for kw_only, kind in enumerate(kinds):
        params += [
            inspect.Parameter(name, kind, default=spec.default)
            for name, spec in specs.items()
            if spec.init and spec.kw_only == kw_only
        ]
    signature = inspect.Signature(params)

    def __init__(self: FleetError, *args: Any, **kwargs: Any) -> None:
        given = signature.bind(self, *args, **kwargs).arguments
        FleetError.__init__(self, "")  # first: an OSError's __init__ clears errno
        for name, spec in specs.items():
            if (value := given.get(name, spec.default)) is not _EMPTY:
                setattr(self, name, value)
        self.__post_init__()
        self.message = self._message()
        self.args = (self.message,)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _state(exc: FleetError) -> dict[str, Any]:
    """Its attributes, and the fields kept elsewhere (an OSError's ``strerror``)."""
    return {name: getattr(exc, name) for name in exc.fields if hasattr(exc, name)} | vars(exc)


def _restore(cls: type[FleetError], args: tuple[Any, ...], state: dict[str, Any]) -> FleetError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    for name, value in state.items():
        setattr(exc, name, value)
    with contextlib.suppress(AttributeError):  # a field missing (an older worker's data)
        exc.__post_init__()  # derived again: an OSError's errno and filename
    return exc


# --------------------------------------------------------------------------- codec


class CodecError(FleetError):
    """A parameter pack could not be written, read or loaded (``path``: which, if known)."""

    path: str | None

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NotAPackError(CodecError):
    """``path`` is not a pack directory (missing, a file, or without ``manifest.json``)."""

    reason: str
    template = "not a parameter pack: {path} ({reason})"


class UnknownPackFormatError(CodecError):
    """The manifest's ``format`` is not one this codec reads (``expected``)."""

    format: object
    expected: str
    template = "unknown pack format {format!r} in {path} (expected {expected!r})"


class ManifestError(CodecError):
    """The manifest is not JSON, lacks a required ``key``, or has a value of the wrong
    type; ``detail`` says which (``key`` is None when the whole manifest is bad)."""

    key: str | None
    detail: str

    def _message(self) -> str:
        where = f" key {self.key!r}" if self.key else ""
        return f"bad pack manifest in {self.path}:{where} {self.detail}"


class ValuesLengthError(CodecError):
    """``values.f32le`` is not ``4 * parameter_count`` bytes long (truncated or padded):
    ``actual_bytes`` instead of ``expected_bytes``."""

    expected_bytes: int
    actual_bytes: int
    parameter_count: int = field(init=False)
    template = (
        "values file {path} has {actual_bytes} bytes, expected {expected_bytes} "
        "(4 * parameter_count {parameter_count})"
    )

    def __post_init__(self) -> None:
        self.parameter_count = self.expected_bytes // 4


class LayoutMismatchError(CodecError):
    """The pack's layout hash differs from the layout of the model it is loaded into."""

    pack_layout_hash: str
    model_layout_hash: str
    template = (
        "layout mismatch loading {path}: pack has {pack_layout_hash}, model has {model_layout_hash}"
    )


class DigestMismatchError(CodecError):
    """The content digest of ``values.f32le`` (``actual``) differs from the one in the
    manifest (``expected``)."""

    expected: str
    actual: str
    template = (
        "content digest mismatch in {path}: manifest says {expected}, values hash to {actual}"
    )


class BaseMismatchError(CodecError):
    """The pseudo-gradient at ``path`` was taken from global model ``actual`` (its
    manifest's ``base_values_digest``), not from ``expected``, the one the outer step
    steps from: merging it would move the model by a delta relative to the wrong point
    (docs/protocol.md section 4.4)."""

    expected: str
    actual: str
    template = (
        "{path} is a pseudo-gradient from global model {actual}, "
        "not from {expected} that the outer step steps from"
    )


class GlobalDigestMismatchError(CodecError):
    """The global model of ``round`` a worker rebuilt (by applying committed outer steps,
    at ``path``) hashes to ``actual``, not to the committed ``expected``: it must not
    train from it; the worker catches up from a full checkpoint instead
    (docs/protocol.md section 5.7)."""

    round: int
    expected: str
    actual: str
    template = (
        "the global model of round {round} rebuilt here hashes to {actual}, "
        "the run committed {expected}"
    )


class NonFiniteValuesError(CodecError):
    """The pack holds ``count`` NaN or infinite values, the first at flat index
    ``first_index`` (raised only when asked to check)."""

    count: int
    first_index: int
    template = "{count} non-finite values in {path} (first at flat index {first_index})"


class UnsupportedStateError(CodecError):
    """A model state that is not a module, ``{"model": m}``, ``{"modules": {...}}`` or a
    ``{name: Tensor}`` mapping, or a ``{"modules"}`` name that is empty or has a dot.
    ``detail`` says what; there is no ``path`` (always None, not on the wire)."""

    fields = ("detail",)
    path: str | None = field(default=None, init=False)
    detail: str
    template = "unsupported model state: {detail}"


class MissingLayoutError(CodecError):
    """Tensor shapes are needed (e.g. for safetensors) but the pack does not record them
    and no template state was given."""

    template = "pack {path} has no 'layout' entries in its manifest; pass a template state"


class ArtifactError(CodecError):
    """A model artifact (fleet's default: the model's state dict as safetensors) does
    not match the model it is loaded into: ``missing`` / ``unexpected`` tensor names,
    or ``mismatched`` ``{name: "artifact shape vs model shape"}``. ``detail`` (not a
    field) ends the message."""

    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, str]

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

    path: str | None

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class PathOutsideRootError(StorageError):
    """``path`` resolves outside the shared ``root`` (``..``, absolute, or a symlink out)."""

    root: str
    template = "path {path!r} escapes the shared root {root!r}"


class StorageFullError(StorageError, OSError):
    """No space left where ``path`` was being written (``errno_name`` ``ENOSPC`` or
    ``EDQUOT``). Nothing partial is left behind: temp files are removed. Also an
    :class:`OSError` with that errno."""

    errno_name: str = "ENOSPC"
    template = "no space left writing {path} ({errno_name})"

    def __post_init__(self) -> None:  # the OSError's errno and filename
        self.errno = getattr(errno_module, self.errno_name, None)
        self.filename = self.path


class StorageIOError(StorageError, OSError):
    """An OS error on the shared root other than a full disk, with its ``errno_name``
    (e.g. ``"EACCES"``) and ``strerror`` text. Also an :class:`OSError` with that errno."""

    errno_name: str
    strerror: str

    def __post_init__(self) -> None:  # the OSError's errno and filename
        self.errno = getattr(errno_module, self.errno_name, None)
        self.filename = self.path

    def _message(self) -> str:
        where = f" on {self.path}" if self.path else ""
        return f"{self.errno_name}: {self.strerror}{where}"


class StorageUnavailableError(StorageError):
    """The object store of the shared root at ``url`` could not be reached: ``operation``
    failed with connection errors, timeouts, 5xx replies or throttling (``SlowDown``)
    for ``retry_s`` seconds (``FLEET_STORE_RETRY_S``) of retries; ``cause`` is the last
    failure; ``path`` the shared-root path it was for, when one. Transient: not one of
    the errors that fail a DiLoCo run (``fleet.diloco.context.FATAL``): an attempt that
    fails with it is run again."""

    path: str | None = field(default=None, kw_only=True)
    url: str
    operation: str
    cause: str
    retry_s: float

    def _message(self) -> str:
        tried = f" for {self.retry_s:g} s" if self.retry_s > 0 else ""
        return (
            f"the store {self.url} is unavailable ({self.operation}: {self.cause}); "
            f"retried{tried}, see FLEET_STORE_RETRY_S"
        )


def storage_error(exc: OSError, path: str | None = None) -> StorageError:
    """The typed error for an OS error: :class:`StorageFullError` for ``ENOSPC`` /
    ``EDQUOT``, :class:`StorageIOError` (errno name and text) otherwise; ``exc`` itself
    if it is a :class:`StorageError` already."""
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

    path: str

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class DatasetFormatError(DatasetError):
    """Not a dataset: no shard files, or a ``fetch-manifest.json`` that is not valid."""

    detail: str
    template = "dataset {path}: {detail}"


class ShardMissingError(DatasetError):
    """Microshard ``microshard_id`` listed by the dataset has no file (``shard_path``)."""

    microshard_id: str
    shard_path: str
    template = "dataset {path}: microshard {microshard_id!r} has no file {shard_path}"


class ShardSizeMismatchError(DatasetError):
    """A microshard's file is ``actual_bytes`` long, not ``expected_bytes``."""

    microshard_id: str
    expected_bytes: int
    actual_bytes: int
    template = (
        "dataset {path}: microshard {microshard_id!r} has {actual_bytes} bytes, "
        "the manifest says {expected_bytes}"
    )


class ShardHashMismatchError(DatasetError):
    """A microshard's content hash (sha2-256 multihash, hex) is ``actual``, not the
    manifest's ``expected``."""

    microshard_id: str
    expected: str
    actual: str
    template = (
        "dataset {path}: microshard {microshard_id!r} hashes to {actual}, "
        "the manifest says {expected}"
    )


class DatasetPathError(DatasetError):
    """The dataset directory, or a shard's locator (``shard_path``), escapes the shared
    root; or an absolute shard path lies outside ``FLEET_DATA_ROOTS`` (``data_roots``)."""

    shard_path: str | None = None
    data_roots: list[str] | None = field(default=None, kw_only=True)

    def _message(self) -> str:
        what = f"dataset {self.path}"
        if self.shard_path:
            what = f"microshard path {self.shard_path!r} of dataset {self.path}"
        if self.data_roots:
            return f"{what} is outside FLEET_DATA_ROOTS ({', '.join(self.data_roots)})"
        return f"{what} escapes the shared root"


# --------------------------------------------------------------------------- protocol


class ProtocolError(FleetError):
    """A request or result does not follow docs/protocol.md."""


class RequestValidationError(ProtocolError):
    """A request body of ``method`` is malformed. ``errors`` lists ``{loc, msg, type}``
    per problem."""

    method: str
    errors: list[dict[str, Any]]

    def _message(self) -> str:
        summary = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<body>'}: {e['msg']}" for e in self.errors
        )
        return f"invalid {self.method} request: {summary}"


class UnknownMethodError(ProtocolError):
    """No protocol method named ``method``."""

    method: str
    template = "unknown protocol method {method!r}"


class MetricValueError(ProtocolError):
    """``hook`` returned metric ``key`` with a value (of type ``value_type``) that is not
    bool, int, float or str."""

    hook: str
    key: str
    value_type: str
    template = (
        "{hook} returned metric {key!r} of type {value_type}; metric values are "
        "bool, int, float or str"
    )


class StepBudgetError(ProtocolError):
    """``require_exact_steps`` was set and ``steps_completed`` steps ran, not
    ``num_inner_steps``."""

    steps_completed: int
    num_inner_steps: int
    template = "require_exact_steps: {steps_completed} steps completed, {num_inner_steps} required"


class RejectedMessageError(ProtocolError):
    """A worker refused a queued message instead of running it: not JSON, not a Celery
    message, or a refused content type (pickle, YAML). The message is kept in the
    dead-letter list ``fleet:deadletter`` with this ``reason``."""

    reason: str
    content_type: str | None = field(kw_only=True)
    queue: str | None = field(kw_only=True)
    task_id: str | None = field(kw_only=True)

    def _message(self) -> str:
        task, queue = self.task_id or "(no task id)", self.queue or "?"
        return f"message {task} on queue {queue} refused: {self.reason}"


# --------------------------------------------------------------------------- workload


class WorkloadError(FleetError):
    """A workload factory or hook could not be used (``spec``: the factory spec)."""

    spec: str | None

    def __init__(self, message: str, *, spec: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec


class BadFactorySpecError(WorkloadError):
    """The factory spec is not exactly ``module:attr`` (one colon, both parts non-empty)."""

    template = "bad workload factory spec {spec!r}: expected 'module:attr'"


class NotAllowlistedError(WorkloadError):
    """The spec matches none of the worker's ``allowlist`` globs."""

    allowlist: list[str]
    template = "workload {spec!r} is not on this worker's allowlist {allowlist}"


class FactoryLoadError(WorkloadError):
    """Importing the module, finding the attribute, or calling the factory failed
    (``detail``)."""

    detail: str
    template = "cannot build workload {spec!r}: {detail}"


class NoWorkloadError(WorkloadError):
    """The call names no workload and the worker has no default one (``spec`` is None)."""

    spec: str | None = field(default=None, init=False)
    template = "no workload given and this worker has no default workload"


class HookMissingError(WorkloadError):
    """The workload does not define ``hook``, which the call needs."""

    hook: str
    template = "workload {spec!r} has no {hook}() hook"


class HookFailedError(WorkloadError):
    """Workload ``hook`` raised. Keeps the original exception's type (``error_type``),
    text (``error``) and traceback (``hook_traceback``)."""

    hook: str
    error_type: str
    error: str
    hook_traceback: str
    template = "{hook}() of {spec!r} raised {error_type}: {error}"


class WorkloadDataError(WorkloadError):
    """A :class:`~fleet.workloads.TorchWorkload` data source (``source``: ``train_data``,
    ``eval_data``) gave no batch where one was needed (``detail``). ``spec`` is the
    workload's: a data source does not know it, so :meth:`fleet.workload.Workload.call`
    sets it when the error leaves the hook."""

    spec: str | None = field(default=None, kw_only=True)
    source: str
    detail: str
    template = "{source}: {detail}"


# --------------------------------------------------------------------------- registry


class RegistryError(FleetError):
    """The registry of workers and model handles cannot answer as asked."""


class HandleNotFound(RegistryError):
    """No model handle ``model_id`` here (on ``worker``, if given). ``record`` is its
    registry record, if any (e.g. held by another worker, or released)."""

    model_id: str
    worker: str | None = field(default=None, kw_only=True)
    record: dict[str, Any] | None = field(default=None, kw_only=True)

    def _message(self) -> str:
        where = f" on worker {self.worker}" if self.worker else ""
        owner = " (not in the registry)"
        if self.record:
            owner = f" (registry: owned by {self.record.get('owner')})"
        return f"model handle {self.model_id!r} not found{where}{owner}"


class OwnerLostError(RegistryError):
    """The worker owning handle ``model_id`` (``owner``) stopped heartbeating;
    ``last_pack`` is the PackRef the handle can be restored from (None if it never
    published one)."""

    model_id: str
    owner: str
    last_pack: dict[str, Any] | None

    def _message(self) -> str:
        restore = "; it never published a pack"
        if self.last_pack:
            restore = f"; restore it from its last pack {self.last_pack['path']!r}"
        return f"owner {self.owner!r} of model handle {self.model_id!r} is lost{restore}"


class WorkerNotFound(RegistryError):
    """No live worker named ``worker``."""

    worker: str
    template = "no live worker named {worker!r}"


class NoWorkersError(RegistryError):
    """Fewer than ``wanted`` live workers (``alive`` of them) after ``waited_s`` seconds."""

    wanted: int
    alive: int
    waited_s: float

    def _message(self) -> str:
        waited = f" after waiting {self.waited_s:g} s" if self.waited_s else ""
        return (
            f"{self.alive} live worker(s), {self.wanted} needed{waited}: start workers with "
            "`fleet worker --cpu` / `fleet worker --gpu N`, or a local fleet with `fleet up`"
        )


class WorkerSlotTakenError(RegistryError):
    """The worker name (its GPU or CPU slot on this node) is held by a live worker:
    process ``holder_pid`` on ``holder_host``, last heartbeat ``heartbeat_age_s`` ago."""

    worker: str
    holder_pid: int
    holder_host: str
    heartbeat_age_s: float
    template = (
        "{worker} is already running as pid {holder_pid} on {holder_host} "
        "(heartbeat {heartbeat_age_s:.1f} s ago); pick another --slot / --gpu"
    )


# --------------------------------------------------------------------------- long tasks


class TrainingStopped(FleetError):
    """Long task ``task_id`` stopped between steps, for ``reason``, after
    ``steps_completed`` steps."""

    task_id: str | None
    steps_completed: int
    reason: str
    template = "task {task_id} stopped after {steps_completed} steps: {reason}"


class TaskAborted(TrainingStopped):
    """The task was asked to abort (``Fleet.cancel`` / a job cancel)."""

    reason: str = field(default="aborted", init=False)


class DeadlineExceeded(TrainingStopped):
    """The deadline passed before ``num_inner_steps`` with ``require_exact_steps``."""

    reason: str = field(default="deadline passed", init=False)


# --------------------------------------------------------------------------- jobs


class JobError(FleetError):
    """A job or the driver running it cannot go on as asked."""


class JobNotFound(JobError):
    """No job with id ``job_id``."""

    job_id: str
    template = "no job {job_id!r}"


class JobStateError(JobError):
    """A status change (to ``requested``) that the job's current ``status`` does not allow."""

    job_id: str
    status: str
    requested: str
    template = "job {job_id} is {status}; cannot become {requested}"


class RoundFailed(JobError):
    """No replica of round ``round`` could publish a pack; ``errors`` says why, per attempt."""

    round: int
    errors: list[str]

    def _message(self) -> str:
        return f"round {self.round}: no replica published a pack ({'; '.join(self.errors)})"


class FragmentSplitError(JobError):
    """A model of ``parameter_count`` values cannot be split into ``fragments`` Streaming
    DiLoCo fragments of whole ``align``-value blocks (``streaming.fragments`` is too large
    for the model)."""

    parameter_count: int
    fragments: int
    align: int
    template = (
        "a model of {parameter_count} values cannot be split into {fragments} fragments "
        "of whole {align}-value blocks; use fewer fragments"
    )


class CorruptCheckpointError(JobError):
    """A committed checkpoint pack of round ``round`` (``path``) is corrupt (``cause``),
    and the inputs it was computed from are not intact either, so it cannot be recomputed."""

    job_id: str
    round: int
    path: str
    cause: str
    template = (
        "job {job_id}: the pack {path} entering round {round} is corrupt and "
        "cannot be recomputed ({cause})"
    )


class JobCancelled(JobError):
    """Job ``job_id`` was cancelled while the driver ran."""

    job_id: str
    template = "job {job_id} was cancelled"


class JobOwnedError(JobError):
    """Another orchestrator (process ``owner_pid`` on ``owner_host``, last heartbeat
    ``heartbeat_age_s`` ago) holds the job's owner lease."""

    job_id: str
    owner_host: str
    owner_pid: int
    heartbeat_age_s: float
    template = (
        "job {job_id} is run by pid {owner_pid} on {owner_host} (heartbeat "
        "{heartbeat_age_s:.1f} s ago); stop it first, or wait until its lease expires"
    )


class FencedOutError(JobError):
    """This orchestrator's fencing ``token`` is no longer the job's ``current`` one: a
    newer owner took the job over, so nothing this one writes is accepted."""

    job_id: str
    token: int
    current: int | None
    template = (
        "job {job_id}: fencing token {token} is stale (current {current}); "
        "another orchestrator took the job over"
    )


# --------------------------------------------------------------------------- configs


class ConfigError(FleetError):
    """A run config or tracker that fleet cannot use."""


class RunConfigError(ConfigError):
    """A run config (a ``--config`` file, flags, or both) that does not validate:
    ``source`` names the file or ``flags``, ``detail`` the keys and what is wrong."""

    source: str
    detail: str
    template = "{source}: {detail}"


class TrackerError(ConfigError):
    """A ``--tracker`` of ``kind`` that cannot be used (unknown kind, missing place or
    library: ``detail``)."""

    kind: str
    detail: str
    template = "tracker {kind!r}: {detail}"


# --------------------------------------------------------------------------- client side


class BrokerUnavailableError(FleetError):
    """Redis (the broker, result backend and registry) cannot be reached, or refuses
    the credentials or the TLS handshake (``cause``). ``url`` has no password."""

    url: str
    cause: str
    template = (
        "Redis at {url} is unavailable ({cause}); start a local fleet with `fleet up`, "
        "or set FLEET_REDIS_URL to a reachable Redis"
    )


class RemoteTaskError(FleetError):
    """A fleet task (``method``, ``task_id``) failed on ``worker``.

    ``error_type`` is the remote exception's class name (e.g. ``"HandleNotFound"``),
    ``error`` its message, ``data`` its fields when it was a FleetError (``{}``
    otherwise; None is taken as ``{}``), ``remote_traceback`` the worker's traceback
    text. A remote :class:`FleetError` is raised as its own class (see
    :func:`remote_error`), which derives from both that class and this one, so
    ``except LayoutMismatchError`` and ``except RemoteTaskError`` both catch it.
    """

    method: str
    worker: str | None
    task_id: str
    error_type: str
    error: str
    data: dict[str, Any]
    remote_traceback: str | None

    def __post_init__(self) -> None:
        self.data = self.data or {}

    def _message(self) -> str:
        return f"{self.method} failed on {self.worker or '?'}: {self.error_type}: {self.error}"


class FleetTimeout(FleetError):
    """A call's result (``method``, ``task_id``) did not arrive within ``timeout_s`` seconds."""

    method: str
    task_id: str
    timeout_s: float
    template = "{method} (task {task_id}) gave no result within {timeout_s:g} s"


# --------------------------------------------------------------------------- remote errors

_REMOTE_CLASSES: dict[type[FleetError], type[RemoteTaskError]] = {}


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
            "fields": tuple(dict.fromkeys(cls.fields + RemoteTaskError.fields)),
            "__reduce__": _remote_reduce,
            "__init__": cls.__init__,  # built by remote_error(), never by its constructor
        }
        klass = type(cls.__name__, (cls, RemoteTaskError), namespace)
        _REMOTE_CLASSES[cls] = klass
    return klass


def _remote_reduce(self: FleetError) -> tuple[Any, ...]:
    base = next(c for c in type(self).__mro__[1:] if c in _REMOTE_CLASSES)
    return (_restore_remote, (base, self.args, _state(self)))


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
    data = dict(data or {})
    remote = RemoteTaskError(method, worker, task_id, error_type, error, data, remote_traceback)
    base = _fleet_error_classes().get(error_type)
    if base is None or issubclass(RemoteTaskError, base):
        return remote
    return cast(RemoteTaskError, _restore(remote_class(base), remote.args, data | vars(remote)))
