"""Requests, results and enums of the worker protocol (docs/protocol.md), and the one
table of methods (:data:`METHODS`) that both the worker's tasks and the client read.

Field names and enum encodings are the protocol's exactly (serde external tagging:
unit variants are bare strings, others one-key objects). fleet adds a few optional
fields, each marked "fleet:" below; a request without them is a valid protocol request.
Requests forbid unknown fields, so a typo is an error, not a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet.codec.filter import StateDictFilter
from fleet.data.dataset import DatasetIndex
from fleet.errors import RequestValidationError, UnknownMethodError
from fleet.storage import PackRef

Req = TypeVar("Req", bound=BaseModel)

PROTOCOL_VERSION = 2

#: Capabilities every fleet worker reports in ``hello``.
CAPABILITIES = (
    "artifact_path_io",
    "diloco_checkpoint_job",
    "parameter_pack_export",
    "parameter_pack_import",
    "exact_step_budget",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------- enums


class _Custom(_Model):
    Custom: str


class Rejected(_Model):
    """The ``{"Rejected": reason}`` variant of a PatchOutcome."""

    Rejected: str


class _RootEmaParams(_Model):
    canonical_weight: float = Field(ge=0.0, le=1.0)


class _RootEma(_Model):
    RootEma: _RootEmaParams


MergePolicy = (
    Literal["WeightedMean", "NormClippedWeightedMean", "TrimmedMean", "Ema", "QualityWeightedEma"]
    | _Custom
)
"""Unit variants as strings, or ``{"Custom": str}``."""

TrainerCanonicalReconcileStrategy = Literal["Replace"] | _RootEma
"""``"Replace"`` or ``{"RootEma": {"canonical_weight": w}}``: ``(1-w)*local + w*canonical``."""

EvalSplit = Literal["Train", "Validation", "Test"] | _Custom
PatchOutcome = Literal["Applied", "RequiresRestart"] | Rejected
MetricValue = StrictBool | StrictInt | StrictFloat | StrictStr
PatchValue = StrictBool | StrictInt | StrictFloat | StrictStr | list[StrictStr]
Metrics = dict[str, MetricValue]


def candidate_weight(policy: Any, sample_weight: float, quality_weight: float) -> float:
    """Merge weight of one candidate (docs/protocol.md section 3): ``sample_weight * q`` with
    q = 1 for WeightedMean, ``clamp(quality_weight, 0, 1)`` for NormClippedWeightedMean,
    ``quality_weight`` otherwise."""
    if policy == "WeightedMean":
        q = 1.0
    elif policy == "NormClippedWeightedMean":
        q = min(max(quality_weight, 0.0), 1.0)
    else:
        q = quality_weight
    return sample_weight * q


# --------------------------------------------------------------------------- records


class CapabilityEstimate(_Model):
    """What ``capability_probe`` measured (docs/protocol.md section 2): backends, throughput in
    work units per second (lease sizes follow it), and the training window it suits, in seconds."""

    preferred_backends: list[str]
    work_units_per_second: float
    target_window_seconds: int


class RuntimePatch(_Model):
    """A runtime setting change for ``apply_patch`` (section 2); ``class`` is Hot, Warm or Cold."""

    patch_id: str
    class_: Literal["Hot", "Warm", "Cold"] = Field(alias="class")
    summary: str
    values: dict[str, PatchValue]
    required_client_capabilities: list[str] = Field(default_factory=list)


class CachedMicroshardGroup(_Model):
    """A BatchRef over cached microshards (section 3): absolute ``shard_paths`` on the
    worker's mount, their ids and ordinals, and their total size in bytes."""

    kind: Literal["cached_microshard_group"]
    shard_paths: list[str]
    microshard_ids: list[str]
    ordinals: list[int]
    bytes_len: int


class MicroEpoch(_Model):
    """A BatchRef of a micro-epoch lease (section 3); fleet puts ``shard_paths`` and the
    lease's position (replica, round, step) in ``payload``."""

    kind: Literal["micro_epoch"]
    lease_id: str
    microshard_ids: list[str]
    ordinals: list[int]
    bytes_len: int
    pipeline_kind: str
    payload: Any = None


BatchRef = Annotated[CachedMicroshardGroup | MicroEpoch, Field(discriminator="kind")]


class WorkloadRef(_Model):
    """fleet: which workload a call is for: factory ``spec`` (``module:attr``) and its
    JSON ``config``. Omitted: the worker's default workload."""

    spec: str
    config: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- requests


class Empty(_Model):
    """A method without params (hello, capability_probe, shutdown)."""


class InitModelRequest(_Model):
    """``init_model``: build the workload's model on ``device`` (e.g. ``cpu``, ``cuda:0``)."""

    device: str


class ShardExpectation(_Model):
    """fleet: one shard of a batch and the content hash it must have."""

    path: str
    microshard_id: str
    content_hash: str


class ShardChecks(_Model):
    """fleet: content hashes of the shards a call's batches read (sha2-256 multihash,
    hex), checked before the first step, once per worker process and shard."""

    dataset: str
    shards: list[ShardExpectation]


class TrainWindowRequest(_Model):
    """``train_window``: the workload trains the model ``model_id`` on ``batches``."""

    model_id: str
    batches: list[BatchRef]
    deadline_unix_s: float | None = None
    """fleet: stop between steps once this wall-clock time (seconds since the epoch) passes."""
    shard_checks: ShardChecks | None = None
    """fleet: content hashes of the batches' shards, checked before the first step."""


class EvaluateRequest(_Model):
    """``evaluate``: the model ``model_id`` on a split; returns metrics."""

    model_id: str
    split: EvalSplit


class LoadModelArtifactRequest(_Model):
    """``load_model_artifact``: read an artifact into the model (section 5.6 without hooks)."""

    model_id: str
    artifact_path: str


class MaterializeModelArtifactRequest(_Model):
    """``materialize_model_artifact``: write the model as an artifact (section 5.6)."""

    model_id: str
    artifact_path: str


class ExportParameterPackRequest(_Model):
    """``export_parameter_pack``: publish the model's float32 values as a pack (section 4)."""

    model_id: str
    parameter_pack_path: str
    model_schema_hash: str
    state_dict_filter: StateDictFilter | None = None


class ImportParameterPackRequest(_Model):
    """``import_parameter_pack``: build a model on ``device`` from a pack (section 4)."""

    device: str
    parameter_pack_path: str
    state_dict_filter: StateDictFilter | None = None
    pack: PackRef | None = None
    """fleet: the pack as a PackRef; the worker checks its layout hash and digest."""


class ParameterPackPlanRequest(_Model):
    """``parameter_pack_plan``: which state-dict keys a pack of this workload holds."""

    device: str
    state_dict_filter: StateDictFilter | None = None


def power_of_two(value: int) -> int:
    """A pydantic field check: ``value`` is a power of two.

    Raises:
        ValueError: it is not.
    """
    if value & (value - 1):
        raise ValueError(f"block_size must be a power of two, got {value}")
    return value


class PseudoGradientOutput(_Model):
    """fleet: how ``run_inner_loop`` publishes a DiLoCo replica's result: ``delta =
    input_parameter_pack - trained parameters``, encoded by ``codec``
    (docs/protocol.md section 4.4), with error feedback when ``error_feedback_path`` is
    set: the residual ``r' = (delta + r) - decoded`` is published there and the next
    round's call passes it back as ``error_feedback_source`` (Karimireddy et al. 2019,
    "Error Feedback Fixes SignSGD", arXiv:1901.09847)."""

    codec: Literal["fp32", "fp16", "bf16", "int8"]
    block_size: int = Field(default=256, ge=1, le=1 << 16)
    """Values per int8 scale (a power of two)."""
    error_feedback_source: PackRef | None = None
    """The residual carried from the replica's last round (None: zero)."""
    error_feedback_path: str | None = None
    """Where the new residual is published (None: no error feedback)."""

    _power_of_two = field_validator("block_size")(power_of_two)


class RunInnerLoopRequest(_Model):
    """``run_inner_loop``: ``num_inner_steps`` steps from the model ``model_id``, then the
    result published as a pack at ``output_parameter_pack_path`` (DiLoCo's inner loop)."""

    model_id: str
    batches: list[BatchRef] = Field(default_factory=list)
    num_inner_steps: int = Field(ge=0)
    inner_optimizer_state_path: str | None = None
    output_parameter_pack_path: str
    model_schema_hash: str
    require_exact_steps: bool = False
    state_dict_filter: StateDictFilter | None = None
    deadline_unix_s: float | None = None
    """fleet: stop between steps once this wall-clock time passes."""
    input_parameter_pack: PackRef | None = None
    """fleet: load this pack into the model before the first step (DiLoCo: the round's
    global model), so a warm handle starts from it without another call; its layout
    hash, digest and finiteness are checked."""
    inner_optimizer_state_source_path: str | None = None
    """fleet: copy this optimizer state file to ``inner_optimizer_state_path`` before the
    first step (DiLoCo: the replica's last committed state), so the committed file is
    never modified and a re-run starts from the same state."""
    shard_checks: ShardChecks | None = None
    """fleet: content hashes of the batches' shards, checked before the first step."""
    pseudo_gradient: PseudoGradientOutput | None = None
    """fleet: publish the encoded pseudo-gradient at ``output_parameter_pack_path``
    instead of the parameters, relative to the start point (``input_parameter_pack``
    or ``eager_start``)."""
    eager_start: EagerStart | None = None
    """fleet: start from this eager start point (an overlapped DiLoCo round) instead of
    ``input_parameter_pack``."""
    outer_step: OuterStepRequest | None = None
    """fleet: run this outer step (the previous round's, in an overlapped DiLoCo run)
    beside the inner steps, in a thread of this worker; its result or error comes back
    in the result's ``outer_step`` / ``outer_step_error``."""

    @model_validator(mode="after")
    def _delta_needs_its_base(self) -> RunInnerLoopRequest:
        if self.input_parameter_pack is not None and self.eager_start is not None:
            raise ValueError("give input_parameter_pack or eager_start, not both")
        if self.pseudo_gradient is not None and (
            self.input_parameter_pack is None and self.eager_start is None
        ):
            raise ValueError("pseudo_gradient needs input_parameter_pack or eager_start")
        return self


class EagerStart(_Model):
    """fleet: an overlapped DiLoCo replica's start point (docs/protocol.md section 5.2;
    Kale et al. 2025, arXiv:2502.12996): ``prediction - scale * fresh``, with
    ``prediction`` the outer step's estimate of the round's global model before the
    last round's pseudo-gradients (a v1 pack) and ``fresh`` the replica's own
    pseudo-gradient of that round (a pseudo-gradient pack); computed on the worker,
    float32, chunk by chunk."""

    prediction: PackRef
    fresh: PackRef | None = None
    scale: float = 0.0
    """``g * w``: the outer optimizer's gain on the pseudo-gradient times the replica's
    weight in the average."""


class LoadParameterPackRequest(_Model):
    """fleet extension: load a pack into a held model in place."""

    model_id: str
    parameter_pack_path: str
    state_dict_filter: StateDictFilter | None = None
    pack: PackRef | None = None
    """fleet: the pack as a PackRef; the worker checks its layout hash and digest."""


class MergeCandidate(_Model):
    """One model to merge (section 2): held (``model_id``) or as a pack, with its weights."""

    peer_id: str
    head_id: str
    artifact_id: str
    model_id: str | None = None
    sample_weight: float = 1.0
    quality_weight: float = 1.0
    pack: PackRef | None = None
    """fleet: the candidate as a pack on the shared root, for a model held by another
    worker (or none). Exactly one of ``model_id`` and ``pack``."""


class MergeCandidateModelsRequest(_Model):
    """``merge_candidate_models``: the weighted merge of candidates onto ``base_model_id``."""

    base_model_id: str
    candidates: list[MergeCandidate]
    policy: MergePolicy


class ApplySingleRootEmaRequest(_Model):
    """``apply_single_root_ema``: the EMA of a merged model towards its base."""

    base_model_id: str
    merged_model_id: str
    policy: MergePolicy
    base_pack: PackRef | None = None
    """fleet: the base as a pack when it is held by another worker."""


class ReconcileCanonicalModelRequest(_Model):
    """``reconcile_canonical_model``: bring a local model to the canonical one."""

    local_model_id: str
    canonical_model_id: str
    strategy: TrainerCanonicalReconcileStrategy
    local_pack: PackRef | None = None
    """fleet: the local model as a pack when it is held by another worker."""


class ReleaseModelRequest(_Model):
    """``release_model``: free the model ``model_id`` on its worker."""

    model_id: str


def _outer_optimizer_exists(name: str) -> bool:
    """True if ``fleet/diloco/optim/<name>.py`` exists (looked up without importing it)."""
    from importlib.resources import files

    return name.isidentifier() and (files("fleet.diloco") / "optim" / f"{name}.py").is_file()


class OuterOptimizerConfig(_Model):
    """fleet: DiLoCo's outer optimizer, by name (a module of :mod:`fleet.diloco.optim`, or
    a ``module:Class`` spec of the user's) and its hyperparameters. Defaults from the
    paper (Douillard et al. 2023, arXiv:2311.08105): Nesterov, lr 0.7, momentum 0.9.
    ``{"name": "sgd", "lr": 1, "momentum": 0}`` is model averaging. The older form
    ``{"nesterov": false}`` reads as ``name: sgd``."""

    name: str = "nesterov"
    """``nesterov`` (SGD with Nesterov momentum), ``sgd`` (heavy-ball momentum, or none
    with ``momentum: 0``), or ``package.module:Class``."""
    lr: float = Field(default=0.7, gt=0.0)
    """Outer learning rate."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """Momentum coefficient (0: no momentum buffer)."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_nesterov_flag(cls, data: Any) -> Any:
        if isinstance(data, dict) and "nesterov" in data:
            data = dict(data)
            nesterov = data.pop("nesterov")
            if "name" not in data:
                data["name"] = "nesterov" if nesterov else "sgd"
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if ":" not in value and not _outer_optimizer_exists(value):
            raise ValueError(f"no outer optimizer {value!r} (built in: nesterov, sgd)")
        return value


class WeightedPack(_Model):
    """A replica's pack and its weight in the average (e.g. its completed steps)."""

    pack: PackRef
    weight: float = Field(gt=0.0)
    start: EagerStart | None = None
    """The eager start point the replica trained from (an overlapped round), when its
    pack is a pseudo-gradient relative to that point rather than to ``global_pack``:
    the outer step rebases it, ``delta + (global - start)``."""


class OuterStepRequest(_Model):
    """fleet: DiLoCo's outer step over packs, streamed (docs/protocol.md section 5.3).
    Replica packs are v1 packs of parameters or pseudo-gradient packs (section 4.4)."""

    global_pack: PackRef
    """The global model entering the round."""
    replicas: list[WeightedPack] = Field(min_length=1)
    state: dict[str, PackRef] = Field(default_factory=dict)
    """The outer optimizer's buffers after the last round, by name (none in the first)."""
    outer: OuterOptimizerConfig = Field(default_factory=OuterOptimizerConfig)
    merge_policy: Literal["WeightedMean", "NormClippedWeightedMean", "TrimmedMean"] = "WeightedMean"
    output_global_path: str
    output_state_paths: dict[str, str] = Field(default_factory=dict)
    """Where each buffer the outer optimizer keeps is written, by name."""
    chunk_bytes: int = Field(default=1 << 20, ge=4096)
    """Bytes of each pack held in memory at once."""
    output_prediction_path: str | None = None
    """Where the eager prediction of the round after next's start point is published
    (an overlapped run; :func:`fleet.diloco.outer.stream_outer_step`)."""


class VerifyPackRequest(_Model):
    """fleet: check a pack against its PackRef: manifest, length, digest, finite values."""

    pack: PackRef
    check_finite: bool = True


class VerifyPackResult(_Model):
    """fleet: the verified pack and the seconds the check took."""

    pack: PackRef
    seconds: float


class DatasetIndexRequest(_Model):
    """fleet: read a microshard dataset on the shared root (fleet.data.dataset)."""

    path: str
    glob: str | None = None


class CollectGarbageRequest(_Model):
    """fleet: delete these files or directories under the shared root (superseded packs
    and optimizer states of a run); empty directories left behind go too."""

    paths: list[str]


# --------------------------------------------------------------------------- results


class HelloResult(_Model):
    """``hello``: protocol version, workload name and capabilities."""

    protocol_version: int
    workload_name: str
    capabilities: list[str]
    worker: str | None = None
    """fleet: the answering worker's name."""


class CapabilityProbeResult(_Model):
    """``capability_probe``: the device the workload runs on and its estimate."""

    runtime_device: str
    capability: CapabilityEstimate


class ModelIdResult(_Model):
    """A method that creates a model: its new handle."""

    model_id: str


class OptionalModelIdResult(_Model):
    """A method that may create a model: its handle, or None."""

    model_id: str | None


class MetricsResult(_Model):
    """A method that measures (``train_window``, ``evaluate``): its metrics."""

    metrics: Metrics


class EmptyResult(_Model):
    """A method with nothing to return."""


class ExportResult(_Model):
    """``export_parameter_pack``: the protocol returns nothing; fleet adds the PackRef."""

    pack: PackRef | None = None
    """fleet: the published pack (empty result in the protocol)."""


class ParameterPackPlanResult(_Model):
    """``parameter_pack_plan``: the keys a pack holds, its layout hash and its length in
    float32 values (``parameter_count``)."""

    uses_custom_parameter_pack_hooks: bool
    layout_hash: str | None = None
    included_keys: list[str] = Field(default_factory=list)
    excluded_float_keys: list[str] = Field(default_factory=list)
    ignored_non_float_keys: list[str] = Field(default_factory=list)
    parameter_count: int = 0
    generic_plan_error: str | None = None


class RunInnerLoopResult(_Model):
    """``run_inner_loop``: steps done, metrics, the optimizer state the hook wrote (if any),
    and fleet's timings (seconds) and output PackRef."""

    steps_completed: int
    metrics: Metrics
    inner_optimizer_state_path: str | None = None
    inner_optimizer_state_encoding: str | None = None
    pack: PackRef | None = None
    """fleet: the output pack."""
    exchange_bytes: int | None = None
    """fleet: bytes of the output pack's data files (what the outer step reads)."""
    error_feedback: PackRef | None = None
    """fleet: the residual published for the next round (error feedback)."""
    load_s: float = 0.0
    """fleet: seconds spent loading ``input_parameter_pack_path``."""
    compute_s: float = 0.0
    """fleet: seconds spent in the inner steps."""
    publish_s: float = 0.0
    """fleet: seconds spent writing the output pack."""
    started_at: float = 0.0
    """fleet: the worker's clock (unix s) when the task began."""
    finished_at: float = 0.0
    """fleet: the worker's clock (unix s) when the output pack was published."""
    outer_step: OuterStepResult | None = None
    """fleet: the result of the request's ``outer_step``, run beside the inner steps."""
    outer_step_error: str | None = None
    """fleet: why that outer step failed (``Type: message``); the orchestrator runs it
    again on its own."""


class OuterStepResult(_Model):
    """fleet: the published global pack and optimizer buffers of an outer step."""

    global_pack: PackRef
    state: dict[str, PackRef] = Field(default_factory=dict)
    prediction: PackRef | None = None
    """The eager prediction, if the request asked for one."""
    bytes_read: int
    bytes_written: int
    exchange_bytes: int = 0
    """Bytes of the replicas' packs read (their values and scales)."""
    seconds: float
    reused: bool = False
    """True if every output was already published from the same inputs (a re-run)."""


class CollectGarbageResult(_Model):
    """fleet: what ``collect_garbage`` deleted (shared-root-relative) and the bytes freed."""

    deleted: list[str]
    freed_bytes: int


class PatchOutcomeResult(RootModel[PatchOutcome]):
    """A bare PatchOutcome as a result: ``"Applied"``, ``"RequiresRestart"`` or
    ``{"Rejected": reason}``."""


class ShutdownResult(_Model):
    """``shutdown``: ``ok`` is true; the worker then stops (warm: its running task ends first)."""

    ok: bool


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class MethodSpec:
    """One method of the protocol as fleet serves it.

    ``request`` / ``result``: the models of its params and result. ``handle``: the
    request field holding the model handle the call is routed by (to the owner's own
    queue), or None for calls any worker can serve. ``long``: runs under a step monitor
    (progress events, abort and deadline checks between steps). ``extension``: fleet's
    own method, not part of the burn_p2p protocol.
    """

    name: str
    request: type[BaseModel]
    result: type[BaseModel]
    handle: str | None = None
    long: bool = False
    extension: bool = False

    @property
    def task_name(self) -> str:
        """The Celery task name: ``fleet.<method>``."""
        return f"fleet.{self.name}"


#: Every method fleet serves, by name (docs/protocol.md section 2, then fleet's own).
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("hello", Empty, HelloResult),
        MethodSpec("capability_probe", Empty, CapabilityProbeResult),
        MethodSpec("init_model", InitModelRequest, ModelIdResult),
        MethodSpec("train_window", TrainWindowRequest, MetricsResult, "model_id", long=True),
        MethodSpec("evaluate", EvaluateRequest, MetricsResult, "model_id"),
        MethodSpec("apply_patch", RuntimePatch, PatchOutcomeResult),
        MethodSpec("load_model_artifact", LoadModelArtifactRequest, EmptyResult, "model_id"),
        MethodSpec(
            "materialize_model_artifact", MaterializeModelArtifactRequest, EmptyResult, "model_id"
        ),
        MethodSpec("export_parameter_pack", ExportParameterPackRequest, ExportResult, "model_id"),
        MethodSpec("import_parameter_pack", ImportParameterPackRequest, ModelIdResult),
        MethodSpec("parameter_pack_plan", ParameterPackPlanRequest, ParameterPackPlanResult),
        MethodSpec(
            "run_inner_loop", RunInnerLoopRequest, RunInnerLoopResult, "model_id", long=True
        ),
        MethodSpec(
            "merge_candidate_models",
            MergeCandidateModelsRequest,
            OptionalModelIdResult,
            "base_model_id",
        ),
        MethodSpec(
            "apply_single_root_ema", ApplySingleRootEmaRequest, ModelIdResult, "merged_model_id"
        ),
        MethodSpec(
            "reconcile_canonical_model",
            ReconcileCanonicalModelRequest,
            ModelIdResult,
            "canonical_model_id",
        ),
        MethodSpec("release_model", ReleaseModelRequest, EmptyResult, "model_id"),
        MethodSpec("shutdown", Empty, ShutdownResult),
        MethodSpec(
            "load_parameter_pack",
            LoadParameterPackRequest,
            EmptyResult,
            "model_id",
            extension=True,
        ),
        MethodSpec("outer_step", OuterStepRequest, OuterStepResult, extension=True),
        MethodSpec("collect_garbage", CollectGarbageRequest, CollectGarbageResult, extension=True),
        MethodSpec("dataset_index", DatasetIndexRequest, DatasetIndex, extension=True),
        MethodSpec("verify_pack", VerifyPackRequest, VerifyPackResult, extension=True),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The table entry of method ``name``.

    Raises:
        UnknownMethodError: no such method.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(name) from None


def validate(method: str, model: type[Req], body: object) -> Req:
    """Parse a request (or result) body of ``method`` with ``model``.

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


RunInnerLoopRequest.model_rebuild()
RunInnerLoopResult.model_rebuild()
