"""DiLoCoConfig: one DiLoCo run (Douillard et al. 2023, arXiv:2311.08105)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.protocol import EvalSplit, MergePolicy

#: Merge policies that make sense for averaging replica models in the outer step.
OUTER_MERGE_POLICIES = ("WeightedMean", "NormClippedWeightedMean", "TrimmedMean")


class OuterOptimizerConfig(BaseModel):
    """The outer optimizer: SGD with (Nesterov) momentum on the pseudo-gradient.
    Defaults from the paper: lr 0.7, momentum 0.9, Nesterov."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=0.7, gt=0.0)
    """Outer learning rate."""
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    """Momentum coefficient (0: plain SGD on the pseudo-gradient)."""
    nesterov: bool = True
    """Nesterov momentum (as ``torch.optim.SGD(nesterov=True)``)."""


class QuorumConfig(BaseModel):
    """When a round closes without waiting for every replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int | None = Field(default=None, ge=1)
    """Close the round as soon as this many replicas have published (None: all)."""
    round_deadline_s: float | None = Field(default=None, gt=0.0)
    """Close the round this many seconds after it started, with the replicas done by
    then (at least one; the round waits for the first if none is)."""


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

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str
    """Factory spec ``module:attr``."""
    config: dict[str, Any] = Field(default_factory=dict)
    """JSON config for the factory."""
    replicas: int = Field(default=2, ge=1)
    rounds: int = Field(default=3, ge=1)
    inner_steps: int = Field(default=50, ge=1)
    """H: inner optimizer steps per replica per round."""
    outer: OuterOptimizerConfig = Field(default_factory=OuterOptimizerConfig)
    merge_policy: MergePolicy = "WeightedMean"
    """How replica models are averaged (WeightedMean, NormClippedWeightedMean, TrimmedMean)."""
    device: str = "cpu"
    """Device string passed to the workload (``"cuda"`` is the worker's pinned GPU)."""
    eval_every: int = Field(default=1, ge=0)
    """Evaluate the global model every this many rounds (and after the last); 0: never."""
    eval_split: EvalSplit = "Validation"
    quorum: QuorumConfig = Field(default_factory=QuorumConfig)
    model_schema_hash: str = "fleet-diloco"
    workers: list[str] | None = None
    """Preferred workers for the replicas, in order (None: every alive worker). A
    replica whose worker dies is re-queued on any alive worker."""
    max_attempts: int = Field(default=3, ge=1)
    """Tries per replica per round before the round goes on without it."""
    replica_call_timeout_s: float = Field(default=300.0, gt=0.0)
    """Timeout of the short calls (import, load, evaluate)."""
    max_wall_s: float | None = Field(default=None, gt=0.0)
    """Stop after the round during which the run's wall-clock time reached this many
    seconds (e.g. a baseline on the same time budget). None: run every round."""

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
