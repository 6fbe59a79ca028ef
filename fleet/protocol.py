"""Requests, results and enums of the worker protocol (PROTOCOL.md sections 2-3).

Field names and enum encodings are the protocol's exactly (serde external tagging:
unit variants are bare strings, others one-key objects). fleet adds a few optional
fields, each marked "fleet:" below; a request without them is a valid protocol request.
Requests forbid unknown fields, so a typo is an error, not a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from fleet.codec import StateDictFilter
from fleet.storage import PackRef

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
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------- enums


class _Custom(_Model):
    Custom: str


class Rejected(_Model):
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
    """Merge weight of one candidate (PROTOCOL.md section 3): ``sample_weight * q`` with
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
    preferred_backends: list[str]
    work_units_per_second: float
    target_window_seconds: int


class RuntimePatch(_Model):
    patch_id: str
    class_: Literal["Hot", "Warm", "Cold"] = Field(alias="class")
    summary: str
    values: dict[str, PatchValue]
    required_client_capabilities: list[str] = Field(default_factory=list)


class CachedMicroshardGroup(_Model):
    kind: Literal["cached_microshard_group"]
    shard_paths: list[str]
    microshard_ids: list[str]
    ordinals: list[int]
    bytes_len: int


class MicroEpoch(_Model):
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
    device: str


class TrainWindowRequest(_Model):
    model_id: str
    batches: list[BatchRef]
    deadline_unix_s: float | None = None
    """fleet: stop between steps once this wall-clock time (seconds since the epoch) passes."""


class EvaluateRequest(_Model):
    model_id: str
    split: EvalSplit


class LoadModelArtifactRequest(_Model):
    model_id: str
    artifact_path: str


class MaterializeModelArtifactRequest(_Model):
    model_id: str
    artifact_path: str


class ExportParameterPackRequest(_Model):
    model_id: str
    parameter_pack_path: str
    model_schema_hash: str
    state_dict_filter: StateDictFilter | None = None


class ImportParameterPackRequest(_Model):
    device: str
    parameter_pack_path: str
    state_dict_filter: StateDictFilter | None = None


class ParameterPackPlanRequest(_Model):
    device: str
    state_dict_filter: StateDictFilter | None = None


class RunInnerLoopRequest(_Model):
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
    input_parameter_pack_path: str | None = None
    """fleet: load this pack into the model before the first step (DiLoCo: the round's
    global model), so a warm handle starts from it without another call."""


class LoadParameterPackRequest(_Model):
    """fleet extension: load a pack into a held model in place."""

    model_id: str
    parameter_pack_path: str
    state_dict_filter: StateDictFilter | None = None


class MergeCandidate(_Model):
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
    base_model_id: str
    candidates: list[MergeCandidate]
    policy: MergePolicy


class ApplySingleRootEmaRequest(_Model):
    base_model_id: str
    merged_model_id: str
    policy: MergePolicy
    base_pack: PackRef | None = None
    """fleet: the base as a pack when it is held by another worker."""


class ReconcileCanonicalModelRequest(_Model):
    local_model_id: str
    canonical_model_id: str
    strategy: TrainerCanonicalReconcileStrategy
    local_pack: PackRef | None = None
    """fleet: the local model as a pack when it is held by another worker."""


class ReleaseModelRequest(_Model):
    model_id: str


# --------------------------------------------------------------------------- results


class HelloResult(_Model):
    protocol_version: int
    workload_name: str
    capabilities: list[str]
    worker: str | None = None
    """fleet: the answering worker's name."""


class CapabilityProbeResult(_Model):
    runtime_device: str
    capability: CapabilityEstimate


class ModelIdResult(_Model):
    model_id: str


class OptionalModelIdResult(_Model):
    model_id: str | None


class MetricsResult(_Model):
    metrics: Metrics


class EmptyResult(_Model):
    pass


class ExportResult(_Model):
    pack: PackRef | None = None
    """fleet: the published pack (empty result in the protocol)."""


class ParameterPackPlanResult(_Model):
    uses_custom_parameter_pack_hooks: bool
    layout_hash: str | None = None
    included_keys: list[str] = Field(default_factory=list)
    excluded_float_keys: list[str] = Field(default_factory=list)
    ignored_non_float_keys: list[str] = Field(default_factory=list)
    parameter_count: int = 0
    generic_plan_error: str | None = None


class RunInnerLoopResult(_Model):
    steps_completed: int
    metrics: Metrics
    inner_optimizer_state_path: str | None = None
    inner_optimizer_state_encoding: str | None = None
    pack: PackRef | None = None
    """fleet: the output pack."""
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


class PatchOutcomeResult(RootModel[PatchOutcome]):
    """A bare PatchOutcome as a result: ``"Applied"``, ``"RequiresRestart"`` or
    ``{"Rejected": reason}``."""


class ShutdownResult(_Model):
    ok: bool
