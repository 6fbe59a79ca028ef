"""The records of a DiLoCo run, persisted in Redis through :class:`~fleet.jobs.JobStore`
only, each write checked against the owner's fencing token (:class:`RunStore`):

- :class:`DriverState`: what the driver needs to run the next round (the global model
  entering it, by digest, with the full checkpoints kept and the committed outer steps
  since the oldest of them; each replica's last merged attempt and last published
  state; warm handles; the data cursor), replaced atomically when a round commits;
- :class:`RoundPlan`: the round in flight (its leases and every attempt launched), so a
  resumed run adopts or aborts those attempts, reuses the leases and numbers attempts on;
- :class:`RoundRecord`: one per committed round (each replica's outcome, the outer
  step, the bytes on the wire, the evaluation), appended in the same transaction as the
  state.

The replicas' own state (inner optimizer, error-feedback residual) and the global
models between checkpoints live on the workers (docs/protocol.md section 5.7); the
driver knows only where each was last published.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fleet.data.leases import DataCursor, Lease
from fleet.jobs import JobStore
from fleet.protocol import (
    FullCheckpoint,
    GlobalModelSpec,
    MetricValue,
    OuterStepSpec,
    ReplicaCheckpoint,
    ReplicaRoundResult,
    ReplicaStart,
)
from fleet.storage import PackRef

ReplicaStatus = Literal["merged", "aborted", "lost", "failed", "dropped"]
"""merged: in the outer step; aborted: stopped when the round closed (quorum) or a
previous owner's attempt; lost: its worker died; failed: the task failed; dropped: its
pack was refused by the outer step (corrupt, non-finite)."""


class HandleRef(BaseModel):
    """A warm model handle kept for a replica across rounds (a cache, never needed)."""

    model_id: str
    worker: str


class UnclaimedBuild(BaseModel):
    """A model build (``init_model`` task ``task_id`` on ``worker``) given up on before it
    answered: its worker looked lost or it timed out. The handle it may still make is
    released once it does."""

    task_id: str
    worker: str


class Evaluation(BaseModel):
    """An evaluation of a global model: when (unix s), on which worker, its metrics."""

    at: float
    worker: str | None = None
    metrics: dict[str, MetricValue]

    @property
    def loss(self) -> float | None:
        """The ``loss`` metric, if the workload reports a number under that name."""
        return _number(self.metrics.get("loss"))

    @property
    def loss_stderr(self) -> float | None:
        """The ``loss_stderr`` metric (the standard error of ``loss`` over the held-out
        examples), if the workload reports one."""
        return _number(self.metrics.get("loss_stderr"))


class LandedEvaluation(BaseModel):
    """The evaluation of a committed round's global model that ran beside later rounds'
    training, recorded against its round once it landed: the evaluation (``at``: when
    it ended, on its worker's clock), its seconds on that worker and the bytes it moved."""

    evaluation: Evaluation
    eval_s: float
    sent_bytes: int = 0
    received_bytes: int = 0


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Attempt(BaseModel):
    """One launched attempt of a replica: where it runs and writes, and its result once
    the orchestrator has read it (a new owner of the job adopts it instead of running
    the replica again)."""

    replica: int
    attempt: int
    worker: str
    task_id: str
    pack_path: str
    checkpoint_path: str | None = None
    """Where it publishes the replica's state in the background (a checkpoint round)."""
    started_at: float
    result: ReplicaRoundResult | None = None
    aborted: bool = False
    """Aborted before the round could use it (launched, pipelined, with an outer step
    that was not committed): never adopted, its number not used again."""


class ReplicaOutcome(BaseModel):
    """How one attempt of a replica ended, with its timings (seconds, worker clocks) and
    the bytes its worker moved to and from the shared root while it ran (counted by the
    store: what crosses the worker's link, requests' headers aside)."""

    replica: int
    attempt: int
    worker: str
    status: ReplicaStatus
    started_at: float
    finished_at: float
    steps_completed: int | None = None
    loss: float | None = None
    compute_s: float = 0.0
    """The inner steps only."""
    load_s: float = 0.0
    """Getting the global model, the replica's state and its shards."""
    save_s: float = 0.0
    encode_s: float = 0.0
    publish_s: float = 0.0
    sent_bytes: int = 0
    received_bytes: int = 0
    store_requests: int = 0
    """Requests its worker sent to the store while it ran (none on a local root)."""
    peak_rss_bytes: int = 0
    """Its worker process's peak resident memory when it finished."""
    global_source: str | None = None
    """held, stepped or caught-up (:class:`~fleet.protocol.ReplicaRoundResult`)."""
    base_digest: str | None = None
    """The values digest of the global model it trained from (its worker checked it
    against the committed one)."""
    steps_replayed: int = 0
    state_source: str | None = None
    """held, checkpoint or fresh."""
    pack: PackRef | None = None
    """The pseudo-gradient it published."""
    late_mix_step: int | None = None
    """Pipelined Streaming DiLoCo: the inner steps done when it mixed the previous
    round's fragment in (None: it started from the committed global model)."""
    late_mix_s: float = 0.0
    """Seconds that mix held its inner loop up."""
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    error: str | None = None
    lease: Lease | None = None


class WireBytes(BaseModel):
    """Bytes a worker sent to and received from the shared root in a round (its
    attempts, the outer step and the evaluation it ran)."""

    sent: int = 0
    received: int = 0


class RoundPlan(BaseModel):
    """The round in flight: its leases (one per replica, when the run has a dataset) and
    every attempt launched so far."""

    round: int
    started_at: float
    leases: list[Lease] | None = None
    cursor_after: DataCursor | None = None
    """The data cursor once every lease of the round is consumed."""
    attempts: list[Attempt] = Field(default_factory=list)

    def next_attempt(self, replica: int) -> int:
        """The next attempt number of ``replica`` (unique across orchestrators)."""
        return 1 + max((a.attempt for a in self.attempts if a.replica == replica), default=-1)

    def lease_of(self, replica: int) -> Lease | None:
        return None if self.leases is None else self.leases[replica]


class RoundRecord(BaseModel):
    """A committed round: when it ran (unix s), how long its parts took (s), where its
    outer step ran, the step itself (the merged pseudo-gradients and the digests it
    gives), every attempt's outcome, the bytes on the wire, the evaluation of the new
    global model, and the data cursor after it."""

    round: int
    started_at: float
    closed_at: float
    wall_s: float
    outer_step_s: float
    eval_s: float = 0.0
    outer_step_worker: str | None = None
    outer_step_requests: int = 0
    """Requests the outer step's worker sent to the store while it stepped."""
    input_digest: str | None = None
    """The values digest of the global model that entered the round."""
    step: OuterStepSpec
    """The committed outer step: its pseudo-gradients, weights and resulting digests."""
    parameter_count: int = 0
    checkpoint: FullCheckpoint | None = None
    """The full checkpoint of the new global model, when this round published one and
    waited for it (the last round); others land in the background (DriverState)."""
    replicas: list[ReplicaOutcome]
    wire: dict[str, WireBytes] = Field(default_factory=dict)
    """Bytes each worker moved in the round, by worker name."""
    exchange_bytes: int = 0
    """Every byte the round's workers moved to and from the shared root (``wire``
    summed)."""
    bytes_per_parameter: float | None = None
    """The busiest worker's bytes (sent + received) per parameter in the round."""
    eval: Evaluation | None = None
    data: DataCursor | None = None
    deadline_s: float | None = None
    """Seconds after the round's start at which it would close without its stragglers
    (fixed, or adaptive: :mod:`fleet.diloco.deadline`); None: it waited for all."""

    @property
    def merged(self) -> list[ReplicaOutcome]:
        """The outcomes that entered the outer step, by replica."""
        return sorted((r for r in self.replicas if r.status == "merged"), key=lambda r: r.replica)

    @property
    def global_digest(self) -> str:
        """The values digest of the global model the round made."""
        return self.step.global_digest or ""


class DriverState(BaseModel):
    """What the driver persists after every committed round."""

    next_round: int
    global_digest: str
    """The values digest of the global model entering ``next_round``."""
    state_digests: dict[str, str] = Field(default_factory=dict)
    """The outer optimizer's buffers entering ``next_round``, by name (none at first)."""
    layout_hash: str
    parameter_count: int
    model_schema_hash: str
    checkpoints: list[FullCheckpoint]
    """The full checkpoints kept, oldest first (``keep_checkpoints``); never empty."""
    steps: list[OuterStepSpec] = Field(default_factory=list)
    """The committed outer steps since the oldest checkpoint, in order."""
    replicas: list[ReplicaStart]
    """Each replica's last merged attempt and last published state."""
    pending_checkpoints: list[ReplicaCheckpoint | None] = Field(default_factory=list)
    """Each replica's newest state checkpoint of a merged attempt not yet landed."""
    handles: list[HandleRef | None]
    abandoned: list[HandleRef] = Field(default_factory=list)
    """Handles of attempts given up on (their worker seemed lost), released once their
    worker answers again."""
    unclaimed_builds: list[UnclaimedBuild] = Field(default_factory=list)
    """Model builds given up on before they answered, released once they do."""
    data: DataCursor | None = None
    dataset_view: str | None = None
    """The dataset's view id when the run started (a resumed run checks it)."""
    started_at: float
    initial_eval: Evaluation | None = None

    @property
    def checkpoint(self) -> FullCheckpoint:
        """The newest full checkpoint."""
        return self.checkpoints[-1]

    def global_model(self, checkpoint: int = -1) -> GlobalModelSpec:
        """The global model entering ``next_round``, reached from the kept checkpoint at
        index ``checkpoint`` (default: the newest) by the committed steps since."""
        base = self.checkpoints[checkpoint]
        return self.model_at(self.next_round, base)

    def model_at(self, round_index: int, base: FullCheckpoint | None = None) -> GlobalModelSpec:
        """The global model entering ``round_index`` (a kept checkpoint's round or later),
        from ``base`` (default: the newest kept checkpoint at or before it)."""
        if base is None:
            base = [c for c in self.checkpoints if c.round <= round_index][-1]
        steps = [s for s in self.steps if base.round <= s.round < round_index]
        if round_index == self.next_round:
            digest, state = self.global_digest, self.state_digests
        elif steps:
            digest, state = steps[-1].global_digest or "", steps[-1].state_digests
        else:
            digest = base.global_pack.values_digest or ""
            state = {n: p.values_digest or "" for n, p in base.state.items()}
        return GlobalModelSpec(
            round=round_index,
            values_digest=digest,
            state_digests=state,
            layout_hash=self.layout_hash,
            parameter_count=self.parameter_count,
            model_schema_hash=self.model_schema_hash,
            checkpoint=base,
            steps=steps,
        )


class RunStore:
    """Typed reads and fenced writes of a run's records through :class:`JobStore`."""

    def __init__(self, jobs: JobStore, job_id: str, token: int) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.token = token

    def load(self) -> tuple[DriverState | None, RoundPlan | None]:
        """The committed state and the plan of the round in flight (None when unset)."""
        state, plan = self.jobs.driver_state(self.job_id)
        return (
            DriverState.model_validate_json(state) if state else None,
            RoundPlan.model_validate_json(plan) if plan else None,
        )

    def save_state(self, state: DriverState) -> None:
        self.jobs.put_state(self.job_id, self.token, state.model_dump_json())

    def save_plan(self, plan: RoundPlan) -> None:
        self.jobs.put_plan(self.job_id, self.token, plan.model_dump_json())

    def commit(self, state: DriverState, record: RoundRecord) -> None:
        """Commit a round: state and record at once, the plan dropped.

        Raises:
            FencedOutError: another orchestrator owns the job now.
        """
        self.jobs.commit_round(
            self.job_id, self.token, state.model_dump_json(), record.model_dump_json()
        )


def rounds_of(jobs: JobStore, job_id: str) -> list[RoundRecord]:
    """Every committed round of a DiLoCo job, in order, each with its evaluation (one
    that ran beside later rounds is taken from where it landed)."""
    records = [RoundRecord.model_validate(m) for m in jobs.metrics(job_id)]
    landed = jobs.evaluations(job_id) if any(r.eval is None for r in records) else {}
    return [with_landed(r, landed.get(r.round)) for r in records]


def with_landed(record: RoundRecord, landed_json: str | None) -> RoundRecord:
    """``record`` with the evaluation that landed for it (JSON of a
    :class:`LandedEvaluation`, or None: ``record`` as it is)."""
    if record.eval is not None or landed_json is None:
        return record
    landed = LandedEvaluation.model_validate_json(landed_json)
    return record.model_copy(update={"eval": landed.evaluation, "eval_s": landed.eval_s})


def state_of(jobs: JobStore, job_id: str) -> DriverState | None:
    """The committed driver state of a DiLoCo job (None before its first round)."""
    state, _ = jobs.driver_state(job_id)
    return DriverState.model_validate_json(state) if state else None
