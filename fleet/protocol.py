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


class RunInnerLoopRequest(_Model):
    """``run_inner_loop``: ``num_inner_steps`` steps from the model ``model_id``, then the
    result published as a pack at ``output_parameter_pack_path``."""

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
    """fleet: load this pack into the model before the first step, so a warm handle
    starts from it without another call; its layout hash, digest and finiteness are
    checked."""
    inner_optimizer_state_source_path: str | None = None
    """fleet: copy this optimizer state file to ``inner_optimizer_state_path`` before the
    first step, so the source file is never modified and a re-run starts from the same
    state."""
    shard_checks: ShardChecks | None = None
    """fleet: content hashes of the batches' shards, checked before the first step."""


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


#: Each built-in outer optimizer's ``(lr, momentum)`` where not given: averaging for
#: ``sgd`` (the default optimizer), the paper's setting for ``nesterov``.
OUTER_DEFAULTS: dict[str, tuple[float, float]] = {"sgd": (1.0, 0.0), "nesterov": (0.7, 0.9)}


class OuterOptimizerConfig(_Model):
    """fleet: DiLoCo's outer optimizer, by name (a module of :mod:`fleet.diloco.optim`, or
    a ``module:Class`` spec of the user's) and its hyperparameters. The default is model
    averaging (SGD, lr 1, no momentum: the new global model is the replicas' weighted
    mean), the one setting that never made a model we measured worse round after round
    (benchmarks/outer_defaults.py: a user's MLP at H=20 and H=100; benchmarks/sweep.py:
    charlm). The paper's setting (Douillard et al. 2023, arXiv:2311.08105), for H=500 on
    large language models, is ``{"name": "nesterov", "lr": 0.7, "momentum": 0.9}``. The
    older form ``{"nesterov": false}`` reads as ``name: sgd``."""

    name: str = "sgd"
    """``sgd`` (heavy-ball momentum, or none with ``momentum: 0``), ``nesterov`` (SGD
    with Nesterov momentum), or ``package.module:Class``."""
    lr: float = Field(default=OUTER_DEFAULTS["sgd"][0], gt=0.0)
    """Outer learning rate (``nesterov``: 0.7 unless given)."""
    momentum: float = Field(default=OUTER_DEFAULTS["sgd"][1], ge=0.0, lt=1.0)
    """Momentum coefficient (0: no momentum buffer; ``nesterov``: 0.9 unless given)."""

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_named(cls, data: Any) -> Any:
        """The older ``nesterov`` flag read as a name; an optimizer's own lr and momentum
        (:data:`OUTER_DEFAULTS`) where not given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "nesterov" in data:
            nesterov = data.pop("nesterov")
            data.setdefault("name", "nesterov" if nesterov else "sgd")
        lr, momentum = OUTER_DEFAULTS.get(data.get("name", "sgd"), OUTER_DEFAULTS["sgd"])
        data.setdefault("lr", lr)
        data.setdefault("momentum", momentum)
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if ":" not in value and not _outer_optimizer_exists(value):
            raise ValueError(f"no outer optimizer {value!r} (built in: nesterov, sgd)")
        return value


class ExchangeSpec(_Model):
    """fleet: how a DiLoCo replica encodes its pseudo-gradient (docs/protocol.md section
    4.4): a codec of :data:`fleet.codec.codecs.CODECS` (``int8`` blockwise absmax with
    ``block_size`` values per scale; ``fp16``, ``bf16``, ``fp32``), with error feedback
    kept on the replica's worker (Karimireddy et al. 2019, arXiv:1901.09847)."""

    codec: str = "int8"
    block_size: int = Field(default=256, ge=1, le=1 << 16)
    """Values per scale (int8; a power of two)."""
    error_feedback: bool = True

    _power_of_two = field_validator("block_size")(power_of_two)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        from fleet.codec.codecs import CODECS

        if value not in CODECS:
            raise ValueError(f"no codec {value!r} (known: {', '.join(sorted(CODECS))})")
        return value


class WeightedPack(_Model):
    """A replica's pseudo-gradient pack and its weight in the average (its completed
    steps, by the merge policy)."""

    pack: PackRef
    weight: float = Field(gt=0.0)


class OuterStepSpec(_Model):
    """fleet: DiLoCo's outer step of round ``round`` (Douillard et al. 2023,
    arXiv:2311.08105, Algorithm 1): the merged replicas' pseudo-gradients and weights,
    the outer optimizer and merge policy, and, once the step was computed and
    committed, the digests of what it gives (the global model entering round ``round +
    1`` and the optimizer's buffers), which every worker that applies it checks."""

    round: int = Field(ge=0)
    replicas: list[WeightedPack] = Field(min_length=1)
    outer: OuterOptimizerConfig = Field(default_factory=OuterOptimizerConfig)
    merge_policy: Literal["WeightedMean", "NormClippedWeightedMean", "TrimmedMean"] = "WeightedMean"
    global_digest: str | None = None
    """The values digest of the global model after the step (None: not computed yet)."""
    state_digests: dict[str, str] = Field(default_factory=dict)
    """The values digest of each outer-optimizer buffer after the step, by name."""


class FullCheckpoint(_Model):
    """fleet: a global model published in full on the shared root: the model entering
    round ``round`` and the outer optimizer's buffers then, by name."""

    round: int = Field(ge=0)
    global_pack: PackRef
    state: dict[str, PackRef] = Field(default_factory=dict)


class GlobalModelSpec(_Model):
    """fleet: the global model entering round ``round``, and how a worker that does not
    hold it gets it (docs/protocol.md section 5.7): from ``checkpoint`` (the last full
    one, of round ``c <= round``) by applying ``steps`` (the committed outer steps of
    rounds ``c .. round - 1``, in order, each with the digests it gives). A worker that
    holds the model of a later round than ``c`` (by digest) applies only the steps
    after it."""

    round: int = Field(ge=0)
    values_digest: str
    state_digests: dict[str, str] = Field(default_factory=dict)
    """The outer optimizer's buffers entering ``round``, by name (none in round 0)."""
    layout_hash: str
    parameter_count: int = Field(ge=0)
    model_schema_hash: str
    checkpoint: FullCheckpoint
    steps: list[OuterStepSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _steps_lead_here(self) -> GlobalModelSpec:
        rounds = [s.round for s in self.steps]
        if rounds != list(range(self.checkpoint.round, self.round)):
            raise ValueError(
                f"steps {rounds} do not lead from checkpoint round {self.checkpoint.round} "
                f"to round {self.round}"
            )
        if any(s.global_digest is None for s in self.steps):
            raise ValueError("a committed step needs its global_digest")
        return self


class ReplicaCheckpoint(_Model):
    """fleet: a replica's state published on the shared root, off the critical path:
    the inner optimizer state file its loop wrote (if any) and its error-feedback
    residual (a v1 pack, if any), as they were after ``round`` attempt ``attempt``."""

    round: int
    attempt: int
    optimizer: str | None = None
    """The inner optimizer state file (shared-root relative)."""
    optimizer_encoding: str | None = None
    residual: PackRef | None = None


class ReplicaStart(_Model):
    """fleet: the replica state a DiLoCo attempt starts from: the state its worker keeps
    after the replica's last merged attempt (``round``, ``attempt``), else
    ``checkpoint`` (its last published one), else none (a fresh optimizer, zero
    residual)."""

    round: int | None = None
    attempt: int | None = None
    checkpoint: ReplicaCheckpoint | None = None


class FragmentSpec(_Model):
    """fleet: the Streaming DiLoCo fragment a replica's round synchronises
    (:mod:`fleet.diloco.fragments`; Douillard et al. 2025, arXiv:2501.18512): fragment
    ``index`` of ``count`` (contiguous ranges of the model's values). The replica starts
    from its own parameters after its last merged attempt, with the fragments
    synchronised since mixed in from the global model (weight ``mixing`` on its own),
    and sends the pseudo-gradient of fragment ``index`` only."""

    index: int = Field(ge=0)
    count: int = Field(ge=1)
    mixing: float = Field(default=0.0, ge=0.0, lt=1.0)
    late_step: OuterStepSpec | None = None
    """Pipelined rounds (``streaming.delay_steps`` > 0): the previous round's outer step,
    not yet committed when this attempt was launched (no digests). The replica applies
    it to the request's ``global_model`` itself, beside its first ``delay_steps`` inner
    steps, mixes that round's fragment in from the result after them, and sends its
    pseudo-gradient against the result (whose digest the run checks once the step
    commits). None: the request's ``global_model`` is the round's."""
    delay_steps: int = Field(default=0, ge=0)
    """With ``late_step``: the inner steps run before its fragment is mixed in."""

    @model_validator(mode="after")
    def _index_below_count(self) -> FragmentSpec:
        if self.index >= self.count:
            raise ValueError(f"fragment {self.index} of {self.count}")
        if self.late_step is not None and self.late_step.global_digest is not None:
            raise ValueError("a late step is not committed yet: it has no global_digest")
        return self


class ReplicaRoundRequest(_Model):
    """fleet: one attempt of a DiLoCo replica's round (docs/protocol.md section 5.7): get
    the round's global model (held, or caught up), train ``num_inner_steps`` steps from
    it with the replica's state, publish the encoded pseudo-gradient at
    ``output_path``; the replica's state stays on the worker (and, with
    ``checkpoint_path``, is published there in the background)."""

    run: str
    """The run (job id) the replica belongs to: names its state on the worker."""
    replica: int = Field(ge=0)
    round: int = Field(ge=0)
    attempt: int = Field(ge=0)
    model_id: str
    batches: list[BatchRef] = Field(default_factory=list)
    shard_checks: ShardChecks | None = None
    num_inner_steps: int = Field(ge=0)
    require_exact_steps: bool = True
    model_schema_hash: str
    state_dict_filter: StateDictFilter | None = None
    deadline_unix_s: float | None = None
    global_model: GlobalModelSpec
    start: ReplicaStart = Field(default_factory=ReplicaStart)
    exchange: ExchangeSpec = Field(default_factory=ExchangeSpec)
    fragment: FragmentSpec | None = None
    """Streaming DiLoCo: the fragment this round synchronises (None: the whole model,
    from the global model)."""
    output_path: str
    """Where the pseudo-gradient pack is published (shared-root relative)."""
    checkpoint_path: str | None = None
    """Publish the replica's state after this attempt here (a directory), in the
    background (None: not this round)."""

    @model_validator(mode="after")
    def _late_step_follows_global(self) -> ReplicaRoundRequest:
        late = self.fragment.late_step if self.fragment is not None else None
        if late is not None and not late.round == self.global_model.round == self.round - 1:
            raise ValueError(
                f"round {self.round}'s late step must be round {self.round - 1}'s, from its "
                f"global model; got step {late.round} from round {self.global_model.round}"
            )
        return self


class OuterStepRequest(_Model):
    """fleet: DiLoCo's outer step over packs on a worker (docs/protocol.md section 5.7):
    from ``global_model`` (held, or caught up), apply ``step`` (its digests unset) and
    keep the result on the worker; with ``checkpoint_path``, also publish it in full
    there (in the background unless ``wait``)."""

    run: str
    global_model: GlobalModelSpec
    step: OuterStepSpec
    chunk_bytes: int = Field(default=1 << 20, ge=4096)
    """Bytes of each pack held in memory at once."""
    checkpoint_path: str | None = None
    checkpoint_wait: bool = False


class EvaluateGlobalRequest(_Model):
    """fleet: evaluate a DiLoCo run's global model (held by the worker, or caught up) on
    ``split``: loaded into the held model ``model_id`` if given, else into a model the
    workload builds for it on ``device``."""

    run: str
    global_model: GlobalModelSpec
    split: EvalSplit
    model_id: str | None = None
    device: str = "cpu"
    state_dict_filter: StateDictFilter | None = None
    own_models: bool = False
    """Reach the model in a directory of this worker's own, not in the run directory
    the workers of its host share: an evaluation beside training, whose models the
    training workers' pruning must not delete under it."""


class PublishGlobalRequest(_Model):
    """fleet: publish a DiLoCo run's global model (held, or caught up) in full at
    ``path`` (and its optimizer buffers beside it), waiting for the upload."""

    run: str
    global_model: GlobalModelSpec
    path: str


class ReleaseRunRequest(_Model):
    """fleet: drop what this worker keeps of a DiLoCo run (global models, replica
    states) once the run ended."""

    run: str


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
    """fleet: bytes of the output pack's data files."""
    load_s: float = 0.0
    """fleet: seconds before the loop: loading ``input_parameter_pack``, fetching the
    leased shards, staging the optimizer state."""
    compute_s: float = 0.0
    """fleet: seconds of the inner steps (from the loop's start to its last step)."""
    publish_s: float = 0.0
    """fleet: seconds after the last step: the loop's own saves, writing the output pack."""
    started_at: float = 0.0
    """fleet: the worker's clock (unix s) when the task began."""
    finished_at: float = 0.0
    """fleet: the worker's clock (unix s) when the output pack was published."""


class ReplicaRoundResult(_Model):
    """fleet: one DiLoCo replica attempt: its steps, metrics, published pseudo-gradient,
    the global model it trained from, how it got that and its state, the bytes its
    worker moved to and from the shared root while it ran (counted by the store,
    background checkpoint uploads included), and its timings (seconds, worker clocks)."""

    steps_completed: int
    metrics: Metrics
    pack: PackRef
    """The pseudo-gradient pack."""
    base_digest: str
    """The values digest of the global model it trained from."""
    global_source: Literal["held", "stepped", "caught-up"]
    """held: the worker had the global model; stepped: it applied outer steps to a
    model it held; caught-up: it fetched a full checkpoint and applied the steps since."""
    steps_replayed: int = 0
    """Outer steps it applied to reach the global model."""
    state_source: Literal["held", "checkpoint", "fresh"]
    """Where the replica's optimizer state and residual came from."""
    checkpoint_scheduled: bool = False
    sent_bytes: int = 0
    received_bytes: int = 0
    store_requests: int = 0
    """Requests its worker sent to the store while it ran (every HTTP request of an
    object store, each try of a retried one; none on a local root)."""
    load_s: float = 0.0
    """Getting the global model, the replica's state and the leased shards."""
    compute_s: float = 0.0
    """The inner steps only (from the loop's start to its last step)."""
    save_s: float = 0.0
    """After the last step: the loop's own saves and writing the trained parameters."""
    encode_s: float = 0.0
    """Encoding the pseudo-gradient and the new residual (local disk)."""
    publish_s: float = 0.0
    """Uploading the pseudo-gradient pack."""
    started_at: float = 0.0
    finished_at: float = 0.0
    peak_rss_bytes: int = 0
    """The worker process's peak resident memory so far (``getrusage``), in bytes."""
    late_mix_step: int | None = None
    """With a late step (pipelined Streaming DiLoCo): the inner steps done when its
    fragment was mixed in (``delay_steps``, or the loop's last step when the mix had to
    wait for the loop's end)."""
    late_mix_s: float = 0.0
    """Seconds that mix held the inner loop up, waiting for the late step included."""


class OuterStepResult(_Model):
    """fleet: an outer step computed on a worker: the digests of the new global model and
    buffers (the worker keeps them), its layout, the bytes its worker moved, and the
    full checkpoint it published (with ``checkpoint_wait``)."""

    global_digest: str
    state_digests: dict[str, str] = Field(default_factory=dict)
    layout_hash: str
    parameter_count: int
    model_schema_hash: str
    checkpoint: FullCheckpoint | None = None
    checkpoint_scheduled: bool = False
    steps_replayed: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    store_requests: int = 0
    """Requests the step's worker sent to the store while it ran."""
    seconds: float


class EvaluateGlobalResult(_Model):
    """fleet: a global model's evaluation metrics, the bytes the worker moved to get
    the model (none when it held it), and when the evaluation started and ended on the
    worker's clock (unix s)."""

    metrics: Metrics
    sent_bytes: int = 0
    received_bytes: int = 0
    started_at: float | None = None
    finished_at: float | None = None


class PublishGlobalResult(_Model):
    """fleet: the published full checkpoint."""

    checkpoint: FullCheckpoint
    sent_bytes: int = 0
    received_bytes: int = 0


class ReleaseRunResult(_Model):
    """fleet: bytes of local disk freed."""

    freed_bytes: int


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
        MethodSpec(
            "replica_round",
            ReplicaRoundRequest,
            ReplicaRoundResult,
            "model_id",
            long=True,
            extension=True,
        ),
        MethodSpec("outer_step", OuterStepRequest, OuterStepResult, extension=True),
        MethodSpec("evaluate_global", EvaluateGlobalRequest, EvaluateGlobalResult, extension=True),
        MethodSpec("publish_global", PublishGlobalRequest, PublishGlobalResult, extension=True),
        MethodSpec("release_run", ReleaseRunRequest, ReleaseRunResult, extension=True),
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
