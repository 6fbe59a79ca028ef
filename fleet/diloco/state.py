"""The records of a DiLoCo run, persisted in Redis through :class:`~fleet.jobs.JobStore`
only, each write checked against the owner's fencing token (:class:`RunStore`):

- :class:`DriverState`: what the driver needs to run the next round (the committed
  global pack and outer optimizer buffers, each replica's committed optimizer state,
  error-feedback residual and warm handle,
  the data cursor), replaced atomically when a round commits;
- :class:`RoundPlan`: the round in flight (its leases and every attempt launched), so a
  resumed run aborts those attempts, reuses the leases and numbers attempts on;
- :class:`RoundRecord`: one per committed round (each replica's outcome, the merge, the
  evaluation), appended in the same transaction as the state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fleet.data.leases import DataCursor, Lease
from fleet.jobs import JobStore
from fleet.protocol import EagerStart, MetricValue, RunInnerLoopResult
from fleet.storage import PackRef

ReplicaStatus = Literal["merged", "aborted", "lost", "failed", "dropped"]
"""merged: in the outer step; aborted: stopped when the round closed (quorum) or a
previous owner's attempt; lost: its worker died; failed: the task failed; dropped: its
pack was refused by the outer step (corrupt, non-finite)."""


class OptState(BaseModel):
    """An inner optimizer state file (shared-root relative) and its encoding."""

    path: str
    encoding: str | None = None


class HandleRef(BaseModel):
    """A warm model handle kept for a replica across rounds (a cache, never needed)."""

    model_id: str
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
    opt_path: str
    residual_path: str | None = None
    start: EagerStart | None = None
    """The eager start point it trained from (an overlapped round; None: the global
    pack)."""
    started_at: float
    result: RunInnerLoopResult | None = None


class ReplicaOutcome(BaseModel):
    """How one attempt of a replica ended, with its timings (seconds, worker clocks)."""

    replica: int
    attempt: int
    worker: str
    status: ReplicaStatus
    started_at: float
    finished_at: float
    steps_completed: int | None = None
    loss: float | None = None
    compute_s: float = 0.0
    load_s: float = 0.0
    publish_s: float = 0.0
    pack: PackRef | None = None
    opt_state: OptState | None = None
    residual: PackRef | None = None
    """The error-feedback residual this attempt published."""
    exchange_bytes: int | None = None
    """Bytes of the pack it published."""
    start: EagerStart | None = None
    """The eager start point it trained from (None: the round's global pack)."""
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    error: str | None = None
    lease: Lease | None = None


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
    """A committed round: when it ran (unix s), how long its parts took (s), where the
    outer step ran, the packs it published, every attempt's outcome, the evaluation of
    the new global model, and the data cursor after it."""

    round: int
    started_at: float
    closed_at: float
    wall_s: float
    merge_s: float
    eval_s: float = 0.0
    merge_worker: str | None = None
    input_global: PackRef | None = None
    """The global model that entered the round (an input of the outer step)."""
    input_state: dict[str, PackRef] = Field(default_factory=dict)
    """The outer optimizer's buffers that entered the round, by name."""
    global_pack: PackRef
    outer_state: dict[str, PackRef] = Field(default_factory=dict)
    """The outer optimizer's buffers after the round, by name (e.g. ``momentum``)."""
    replicas: list[ReplicaOutcome]
    eval: Evaluation | None = None
    data: DataCursor | None = None
    exchange_bytes: int = 0
    """Bytes of the merged replicas' published packs (what the outer step read of them)."""
    deadline_s: float | None = None
    """Seconds after the round's start at which it would close without its stragglers
    (fixed, or adaptive: :mod:`fleet.diloco.deadline`); None: it waited for all."""

    @property
    def merged(self) -> list[ReplicaOutcome]:
        """The outcomes that entered the outer step, by replica."""
        return sorted((r for r in self.replicas if r.status == "merged"), key=lambda r: r.replica)


class DriverState(BaseModel):
    """What the driver persists after every committed round."""

    next_round: int
    global_pack: PackRef
    """The global model entering ``next_round``."""
    outer_state: dict[str, PackRef] = Field(default_factory=dict)
    """The outer optimizer's buffers after the last round, by name (none at first)."""
    replica_opt: list[OptState | None]
    """Each replica's last committed inner optimizer state (None: the workload builds
    its optimizer, e.g. a workload that keeps no optimizer file)."""
    replica_residual: list[PackRef | None] = Field(default_factory=list)
    """Each replica's last committed error-feedback residual (empty or None: zero)."""
    prediction: PackRef | None = None
    """An overlapped run's eager prediction of the start point of round
    ``next_round + 1``, published by the last round's outer step
    (:mod:`fleet.diloco.eager`); None in a synchronous run."""

    def residual_of(self, replica: int) -> PackRef | None:
        """Replica ``replica``'s committed residual, if any."""
        return self.replica_residual[replica] if replica < len(self.replica_residual) else None

    handles: list[HandleRef | None]
    abandoned: list[HandleRef] = Field(default_factory=list)
    """Handles of attempts given up on (their worker seemed lost), released once their
    worker answers again."""
    data: DataCursor | None = None
    dataset_view: str | None = None
    """The dataset's view id when the run started (a resumed run checks it)."""
    started_at: float
    initial_eval: Evaluation | None = None


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
    """Every committed round of a DiLoCo job, in order."""
    return [RoundRecord.model_validate(m) for m in jobs.metrics(job_id)]


def state_of(jobs: JobStore, job_id: str) -> DriverState | None:
    """The committed driver state of a DiLoCo job (None before its first round)."""
    state, _ = jobs.driver_state(job_id)
    return DriverState.model_validate_json(state) if state else None
