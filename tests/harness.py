"""Our tests' settings and worker helpers over :mod:`fleet.local` and :mod:`fleet.testing`
(the test workloads under ``tests/workloads``, the repository on PYTHONPATH)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fleet import local
from fleet.local import RedisServer, WorkerProcess
from fleet.settings import FleetSettings
from fleet.testing import wait_until

if TYPE_CHECKING:
    from fleet.diloco import DiLoCoRun
    from fleet.jobs import JobStore

REPO = Path(__file__).resolve().parents[1]
DIGITS = "tests.workloads.digits:make_workload"
CHARLM = "fleet.examples.charlm:make"
#: A charlm small enough for tests: a few ms per step on one CPU thread.
SMALL_CHARLM = {
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "context": 32,
    "batch_size": 8,
    "max_corpus_mb": 1,
    "eval_windows": 16,
}

__all__ = [
    "CHARLM",
    "DIGITS",
    "REPO",
    "SMALL_CHARLM",
    "RedisServer",
    "WorkerProcess",
    "inner_loops_started",
    "run_in_thread",
    "running_workers",
    "settings_for",
    "wait_until",
]


def run_in_thread(run: DiLoCoRun) -> tuple[threading.Thread, dict[str, object]]:
    """Run a DiLoCo job in a daemon thread; its outcome dict gets ``"job"`` (the finished
    Job) or ``"error"`` (what the run raised)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["job"] = run.run()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def inner_loops_started(jobs: JobStore, job_id: str, worker: str | None = None) -> int:
    """How many inner loops of the job (on ``worker``, or any) have started so far."""
    return sum(
        "replica_round started" in line.line and worker in (None, line.worker)
        for line in jobs.logs(job_id)
    )


def settings_for(redis_url: str, shared_root: Path, **overrides: object) -> FleetSettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "shared_root": shared_root,
        "workload_allowlist": ["tests.workloads.*", "fleet.testing.*", "benchmarks.user_mlp"],
        "node": "testnode",
        "heartbeat_interval_s": 0.5,
        "heartbeat_ttl_s": 3.0,
        "call_timeout_s": 120.0,
        "job_lease_ttl_s": 3.0,
    }
    values.update(overrides)
    return FleetSettings(**values)  # type: ignore[arg-type]


@contextmanager
def running_workers(
    settings: FleetSettings,
    slots: list[int],
    log_dir: Path,
    *,
    workload: str | None = DIGITS,
    config_json: str | None = None,
    gpu: bool = False,
) -> Iterator[list[WorkerProcess]]:
    """Test workers: the digits workload by default, the repo on PYTHONPATH."""
    with local.running_workers(
        settings,
        slots,
        log_dir,
        workload=workload,
        config_json=config_json,
        pythonpath=[str(REPO)],
        cwd=REPO,
        gpu=gpu,
    ) as workers:
        yield workers
