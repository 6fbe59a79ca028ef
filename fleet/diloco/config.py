"""DiLoCoConfig: one DiLoCo run (Douillard et al. 2023, arXiv:2311.08105)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.devices import AUTO
from fleet.protocol import (
    EvalSplit,
    ExchangeSpec,
    MergePolicy,
    OuterOptimizerConfig,
    power_of_two,
)

__all__ = [
    "OUTER_MERGE_POLICIES",
    "AdaptiveDeadlineConfig",
    "DatasetConfig",
    "DiLoCoConfig",
    "OuterOptimizerConfig",
    "PseudoGradientConfig",
    "QuorumConfig",
    "StreamingConfig",
]

#: Merge policies that make sense for averaging replica models in the outer step.
OUTER_MERGE_POLICIES = ("WeightedMean", "NormClippedWeightedMean", "TrimmedMean")


class PseudoGradientConfig(BaseModel):
    """What each replica publishes for the outer step: its pseudo-gradient, encoded
    (docs/protocol.md section 4.4), with error feedback kept on its worker."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    codec: str = "int8"
    """A codec of fleet.codec.codecs: int8 (the default: 1 byte a value plus a float32
    scale per block; with error feedback it lost nothing measurable against fp32 at
    0.254x the bytes, benchmarks/compression.py), fp16, bf16 (2 bytes), fp32 (4 bytes,
    exact), or topk: sparse, as SparseLoCo (arXiv:2508.15706): of each block of
    block_size values the largest 1/16 by magnitude, at 2 bits each (sign and one of
    two magnitudes per block) with their indices packed, 0.11 bytes a value; the rest is
    carried by error feedback. With it, scale the outer lr by the replica count
    (averaging: --outer-lr 2 for 2 replicas), as the mean of sparse pseudo-gradients
    moves a value only one replica sent by 1/replicas of it: over 20 rounds of charlm it
    came within 1.5 % of fp32's eval loss at 0.14 bytes per parameter up."""
    block_size: int = Field(default=256, ge=1, le=1 << 16)
    """Values per int8 scale (a power of two)."""
    error_feedback: bool = True
    """Carry each replica's quantization residual into its next round (kept on its
    worker; meaningless for fp32)."""

    _power_of_two = field_validator("block_size")(power_of_two)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        from fleet.codec.codecs import CODECS

        if value not in CODECS:
            raise ValueError(f"no codec {value!r} (known: {', '.join(sorted(CODECS))})")
        return value

    def spec(self) -> ExchangeSpec:
        """The request field of a replica's round."""
        return ExchangeSpec(
            codec=self.codec,
            block_size=self.block_size,
            error_feedback=self.error_feedback and self.codec != "fp32",
        )


class StreamingConfig(BaseModel):
    """Streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512;
    :mod:`fleet.diloco.fragments`): the model's values are split into ``fragments``
    ranges and round ``r`` synchronises fragment ``r mod fragments`` only, so each
    fragment is synchronised every ``fragments`` rounds, staggered, and a round sends
    ``1/fragments`` of the model. A replica keeps its own values of the other fragments
    between rounds (on its worker). For the paper's H steps between a fragment's
    synchronisations, set ``inner_steps`` to H / fragments.

    With ``delay_steps`` tau > 0 (the paper's overlap, section 2.3) the rounds are
    pipelined: round ``r + 1`` starts as soon as round ``r``'s pseudo-gradients are in,
    before round ``r``'s outer step; each replica applies that step itself, beside its
    first tau inner steps, and mixes round ``r``'s fragment in after them. The
    exchange's outer step and download leave the critical path; the pseudo-gradient's
    encode and upload stay on it (fleet.diloco.round)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    fragments: int = Field(default=1, ge=1)
    """P: fragments of the model, synchronised one per round in turn (1: the whole model
    every round, bit for bit synchronous DiLoCo)."""
    mixing: float = Field(default=0.0, ge=0.0, lt=1.0)
    """alpha: the weight a replica keeps on its own values when it takes a synchronised
    fragment's global values back (0: replaced by them, as synchronous DiLoCo)."""
    delay_steps: int = Field(default=0, ge=0)
    """tau: inner steps of round ``r + 1`` a replica runs before it mixes in round ``r``'s
    fragment (0: no overlap, each round starts from the committed global model; at most
    ``inner_steps``; a workload whose loop reports no progress between steps, or loads
    packs only through an ``import_parameter_pack_path`` hook, mixes it in after its
    last step)."""


class AdaptiveDeadlineConfig(BaseModel):
    """A round's deadline from the replicas' observed speed (:mod:`fleet.diloco.deadline`):
    ``inner_steps * max(median + k * MAD, min_factor * median)`` of the seconds per inner
    step of the attempts merged in the last ``window_rounds`` rounds, within
    ``[floor_s, ceiling_s]`` (none in the first round). On by default and generous (a replica
    stuck in a hook costs a few median rounds, never the task time limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    enabled: bool = True
    """Close a round at its adaptive deadline (false: wait for every replica, or for
    quorum.round_deadline_s)."""
    tight: bool = False
    """Cut stragglers close to the median (k 3, min_factor 1.5) instead of only stuck
    replicas (k 10, min_factor 3)."""
    k: float | None = Field(default=None, ge=0.0)
    """MADs above the median (None: 10, or 3 when tight)."""
    min_factor: float | None = Field(default=None, ge=1.0)
    """The deadline is at least this many median durations (None: 3, or 1.5 when tight)."""
    window_rounds: int = Field(default=5, ge=1)
    """Rounds of observations the deadline is computed from."""
    floor_s: float | None = Field(default=None, ge=0.0)
    """The deadline is never below this many seconds (None: 10, room for a cold worker's
    start and a pack import; 0.5 when tight)."""
    ceiling_s: float | None = Field(default=None, gt=0.0)
    """Nor above this many (None: no ceiling)."""


class QuorumConfig(BaseModel):
    """When a round closes without waiting for every replica."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_replicas: int | None = Field(default=None, ge=1)
    """Close the round as soon as this many replicas have published (None: all)."""
    round_deadline_s: float | None = Field(default=None, gt=0.0)
    """Close the round this many seconds after it started, with the replicas done by
    then (at least one; the round waits for the first if none is)."""
    adaptive_deadline: AdaptiveDeadlineConfig = Field(default_factory=AdaptiveDeadlineConfig)
    """A deadline from the replicas' observed speed (the earlier of the two applies)."""


class DatasetConfig(BaseModel):
    """The microshard dataset a run leases to its replicas (fleet.data)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    path: str
    """The dataset directory, relative to the shared root."""
    glob: str | None = None
    """For a plain directory of shard files: only names matching this glob."""
    microshards_per_batch: int = Field(default=1, ge=1)
    """Microshards per BatchRef."""
    batch_kind: Literal["cached_microshard_group", "micro_epoch"] = "cached_microshard_group"
    """The BatchRef kind: ``shard_paths`` on the BatchRef, or in ``micro_epoch``'s payload
    ``{dataset_root, shard_paths, microshards_per_batch, replica, num_replicas, round, step}``."""
    microshards_per_lease: int | None = Field(default=None, ge=1)
    """A fixed lease size. None: each round's budget is spread over the replicas in
    proportion to their workers' measured speed (at least one each)."""
    microshards_per_round: int | None = Field(default=None, ge=1)
    """A round's budget of microshards (None: the dataset spread over the run's rounds,
    so a run covers about one epoch; at least one per replica)."""
    seed: int = 0
    """Seeds each epoch's permutation."""


class DiLoCoConfig(BaseModel):
    """A DiLoCo run on the fleet.

    Each of ``rounds`` rounds, ``replicas`` replicas each run ``inner_steps`` steps of the
    workload's inner optimizer from the round's global model on their own data shard;
    the outer step averages their models (by ``merge_policy``, weighting each by its
    completed steps), takes the pseudo-gradient ``global - average`` and applies the
    outer optimizer. Replica ``i`` of round ``r`` gets, for step ``s``, the BatchRef
    ``{"kind": "micro_epoch", "microshard_ids": ["shard-i"], "ordinals": [r*H + s],
    "payload": {"replica": i, "num_replicas": N, "round": r, "step": s}, ...}``:
    workloads shard their data by ``payload.replica`` / ``payload.num_replicas``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    workload: str
    """Factory spec ``module:attr``."""
    config: dict[str, Any] = Field(default_factory=dict)
    """JSON config for the factory."""
    replicas: int = Field(default=2, ge=1)
    """Replicas training in parallel, one per worker."""
    rounds: int = Field(default=3, ge=1)
    """Outer rounds: each is H inner steps per replica, then the outer step."""
    inner_steps: int = Field(default=50, ge=1)
    """H: inner optimizer steps per replica per round."""
    outer: OuterOptimizerConfig = Field(default_factory=OuterOptimizerConfig)
    """The outer optimizer applied to the merged pseudo-gradient (default: averaging)."""
    pseudo_gradient: PseudoGradientConfig = Field(default_factory=PseudoGradientConfig)
    """What each replica publishes for the outer step (codec, error feedback)."""
    streaming: StreamingConfig | None = None
    """Streaming DiLoCo: synchronise one fragment of the model per round (None: the
    whole model every round)."""
    merge_policy: MergePolicy = "WeightedMean"
    """How replica models are averaged (WeightedMean, NormClippedWeightedMean, TrimmedMean)."""
    device: str = AUTO
    """Device string passed to the workload: ``"auto"`` (the worker's pinned GPU if it
    has one, else its CPU; fleet.devices), or an explicit ``"cpu"``, ``"cuda"``, ..."""
    eval_every: int = Field(default=1, ge=0)
    """Evaluate the global model every this many rounds (and after the last); 0: never."""
    eval_split: EvalSplit = "Validation"
    """The split the global model is evaluated on."""
    eval_overlap: bool = True
    """Evaluate a round's global model beside the next rounds' training, so the next
    round starts as soon as the outer step has committed; the result is recorded against
    its round when it lands (fleet.diloco.evaluation). It runs on ``eval_worker``, else
    on an idle worker (alive, running no replica of the round). Without one, or with
    False, the evaluation runs on the outer step's worker before the next round starts.
    The run's last round is evaluated before the run ends either way."""
    eval_worker: str | None = None
    """The worker that evaluates beside training (kept out of the replicas' placement
    while another worker is alive). None: any idle worker."""
    quorum: QuorumConfig = Field(default_factory=QuorumConfig)
    """When a round closes without waiting for every replica."""
    model_schema_hash: str = "fleet-diloco"
    """The schema id written into the run's packs."""
    workers: list[str] | None = None
    """Preferred workers for the replicas, in order (None: every alive worker). A
    replica whose worker dies is re-queued on any alive worker."""
    require_exact_steps: bool = True
    """Each replica must complete exactly ``inner_steps`` (as burn_p2p); an attempt that
    completes another number fails (``StepBudgetError``) and is re-run, up to
    ``max_attempts``."""
    max_attempts: int = Field(default=3, ge=1)
    """Tries per replica per round before the round goes on without it."""
    lost_worker_wait_s: float = Field(default=120.0, ge=0.0)
    """Seconds a round keeps the attempt of a replica whose worker looks lost while no
    worker at all is alive to re-run it on (the whole fleet, or this orchestrator's own
    link, cut off): the attempt goes on if its worker comes back, and is re-run on a
    worker that joins; past this, the replica is given up."""
    replica_call_timeout_s: float = Field(default=300.0, gt=0.0)
    """Timeout of the short calls (import, load, evaluate)."""
    max_wall_s: float | None = Field(default=None, gt=0.0)
    """Stop after the round during which the run's wall-clock time reached this many
    seconds (e.g. a baseline on the same time budget). None: run every round."""
    checkpoint_every: int = Field(default=10, ge=1)
    """Publish the global model and the outer optimizer's buffers in full on the shared
    root every this many rounds (in the background, off the critical path) and after the
    last round. A worker that lacks the round's global model (new, restarted, its disk
    wiped) fetches the last one and applies the outer steps since; each costs the
    worker that publishes it 4 bytes per parameter per pack."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Full checkpoints kept on the shared root (the newest ones), with the
    pseudo-gradients since the oldest, so a corrupt newest one can be rebuilt from the
    one before it."""
    state_checkpoint_every: int = Field(default=40, ge=1)
    """Publish each replica's state (inner optimizer state, error-feedback residual) every
    this many rounds, in the background, staggered across replicas. A replica whose
    worker dies restarts from it. 40 keeps AdamW's 8 bytes per parameter plus the
    4-byte residual at 0.3 bytes per parameter per round."""
    dataset: DatasetConfig | None = None
    """Microshards leased to the replicas each round; None: the workload draws its own
    data, sharded by the BatchRef's ``payload.replica`` (docs/protocol.md)."""
    outer_step_chunk_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        validation_alias=AliasChoices("outer_step_chunk_bytes", "merge_chunk_bytes"),
    )
    """Bytes of each pack the outer step holds in memory at once (its extra memory is
    about ``(2 * (replicas + buffers) + 6) * outer_step_chunk_bytes``, whatever the
    model's size). Its earlier name, ``merge_chunk_bytes``, is read as an alias."""

    @model_validator(mode="after")
    def _delay_within_round(self) -> DiLoCoConfig:
        streaming = self.streaming
        if streaming is not None and streaming.delay_steps > self.inner_steps:
            raise ValueError(
                f"streaming.delay_steps ({streaming.delay_steps}) is above inner_steps "
                f"({self.inner_steps}): a fragment is mixed in within the next round"
            )
        return self

    @field_validator("merge_policy")
    @classmethod
    def _outer_policy(cls, value: Any) -> Any:
        if value not in OUTER_MERGE_POLICIES:
            raise ValueError(
                f"merge_policy for DiLoCo must be one of {OUTER_MERGE_POLICIES}, got {value!r}"
            )
        return value

    @field_validator("outer")
    @classmethod
    def _outer_builds(cls, value: OuterOptimizerConfig) -> OuterOptimizerConfig:
        from fleet.diloco.optim import outer_optimizer

        outer_optimizer(value)  # a user's module:Class must import and accept its config
        return value

    @model_validator(mode="after")
    def _quorum_fits(self) -> DiLoCoConfig:
        if self.quorum.min_replicas is not None and self.quorum.min_replicas > self.replicas:
            raise ValueError(
                f"quorum.min_replicas {self.quorum.min_replicas} > replicas {self.replicas}"
            )
        return self

    @property
    def min_replicas(self) -> int:
        """Replicas needed to close a round before its deadline."""
        return self.quorum.min_replicas or self.replicas
