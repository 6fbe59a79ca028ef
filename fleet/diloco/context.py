"""What every round of a DiLoCo run shares (:class:`RunContext`), and the one poll loop
its waits use (:meth:`RunContext.poll`): liveness ticks, the job lease, cancellation,
and a pause that grows with the time waited."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fleet.client import Fleet
from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.data import RunData
from fleet.diloco.deadline import RoundDeadline
from fleet.diloco.layout import RunLayout
from fleet.diloco.liveness import Liveness
from fleet.diloco.state import RunStore
from fleet.errors import DatasetError, JobCancelled, JobError, StorageFullError
from fleet.jobs import JobLease, JobStore

#: Seconds between two looks at running tasks (N+1 Redis calls each): a hundredth of
#: the time waited so far, within these bounds.
POLL_INTERVAL_S = (0.005, 0.02)
#: Errors of an attempt that re-running cannot mend: the run fails (and can be resumed
#: once the data is fixed or space is freed on the shared root).
FATAL = (DatasetError, JobError, StorageFullError)


@dataclass
class RunContext:
    """What every round of a run shares."""

    fleet: Fleet
    config: DiLoCoConfig
    layout: RunLayout
    store: RunStore
    jobs: JobStore
    lease: JobLease
    log: Callable[..., None]
    data: RunData | None = None
    """The run's dataset and leases (None: the workload draws its own data)."""
    deadline: RoundDeadline = field(init=False)
    """The round deadline policy, fed each committed round."""

    def __post_init__(self) -> None:
        self.deadline = RoundDeadline(self.config)

    def poll(self, on_cancel: Callable[[], None] | None = None) -> Iterator[Liveness]:
        """Yield once per look at running tasks, forever (the caller breaks): each time
        workers' liveness is ticked, the job lease checked and cancellation looked for;
        between two looks, a pause of a hundredth of the time waited
        (:data:`POLL_INTERVAL_S`).

        Raises:
            JobCancelled: the job was cancelled (``on_cancel`` ran first).
            FencedOutError: another orchestrator took the job over.
        """
        liveness = Liveness(self.fleet, self.fleet.registry.liveness_grace_s)
        started = time.monotonic()
        low, high = POLL_INTERVAL_S
        while True:
            liveness.tick()
            self.lease.check()
            if self.jobs.is_cancelled(self.store.job_id):
                if on_cancel is not None:
                    on_cancel()
                raise JobCancelled(self.store.job_id)
            yield liveness
            time.sleep(min(high, max(low, (time.monotonic() - started) / 100)))
