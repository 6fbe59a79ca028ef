"""DiLoCoConfig: one DiLoCo run (Douillard et al. 2023, arXiv:2311.08105)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.devices import AUTO
from fleet.protocol import EvalSplit, MergePolicy, OuterOptimizer

#: Merge policies that make sense for averaging replica models in the outer step.
OUTER_MERGE_POLICIES = ("WeightedMean", "NormClippedWeightedMean", "TrimmedMean")


#: The outer optimizer of a run (lr 0.7, momentum 0.9, Nesterov by default).
OuterOptimizerConfig = OuterOptimizer


class QuorumConfig(BaseModel):
    """When a round closes without waiting for every replica."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    min_replicas: int | None = Field(default=None, ge=1)
    """Close the round as soon as this many replicas have published (None: all)."""
    round_deadline_s: float | None = Field(default=None, gt=0.0)
    """Close the round this many seconds after it started, with the replicas done by
    then (at least one; the round waits for the first if none is)."""


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
    """The outer optimizer (SGD with Nesterov momentum on the pseudo-gradient)."""
    merge_policy: MergePolicy = "WeightedMean"
    """How replica models are averaged (WeightedMean, NormClippedWeightedMean, TrimmedMean)."""
    device: str = AUTO
    """Device string passed to the workload: ``"auto"`` (the worker's pinned GPU if it
    has one, else its CPU; fleet.devices), or an explicit ``"cpu"``, ``"cuda"``, ..."""
    eval_every: int = Field(default=1, ge=0)
    """Evaluate the global model every this many rounds (and after the last); 0: never."""
    eval_split: EvalSplit = "Validation"
    """The split the global model is evaluated on."""
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
    replica_call_timeout_s: float = Field(default=300.0, gt=0.0)
    """Timeout of the short calls (import, load, evaluate)."""
    max_wall_s: float | None = Field(default=None, gt=0.0)
    """Stop after the round during which the run's wall-clock time reached this many
    seconds (e.g. a baseline on the same time budget). None: run every round."""
    keep_rounds: int = Field(default=2, ge=1)
    """Global and momentum packs of this many latest rounds are kept; older ones, and
    every replica pack and optimizer state nothing refers to, are deleted as the run
    goes (rounds that are checkpoints are kept too)."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Keep the global pack of every this many rounds as a checkpoint artifact
    (``checkpoint-RRRR``); 0: only the latest round is a checkpoint."""
    dataset: DatasetConfig | None = None
    """Microshards leased to the replicas each round; None: the workload draws its own
    data, sharded by the BatchRef's ``payload.replica`` (docs/protocol.md)."""
    merge_chunk_bytes: int = Field(default=1 << 20, ge=4096)
    """Bytes of each pack the outer step holds in memory at once (its extra memory is
    about ``(2 * replicas + 6) * merge_chunk_bytes``, whatever the model's size)."""

    @field_validator("merge_policy")
    @classmethod
    def _outer_policy(cls, value: Any) -> Any:
        if value not in OUTER_MERGE_POLICIES:
            raise ValueError(
                f"merge_policy for DiLoCo must be one of {OUTER_MERGE_POLICIES}, got {value!r}"
            )
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
