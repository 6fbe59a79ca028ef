"""Faults without loss (issue 12), each against a real Redis and real workers: two
orchestrators on one job, Redis restarted or down 60 s mid-round, corrupt checkpoints,
resume of a failed job, a restarted worker used again, a redelivered inner loop, ENOSPC
in the optimizer save on a small tmpfs shared root, and Redis gone for longer than the
retry budget.

These tests own their Redis (persistent, so it can be restarted without loss) and their
workers, so restarting or killing them touches no other test.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet import keys
from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.diloco.state import RoundRecord
from fleet.errors import (
    BrokerUnavailableError,
    CorruptCheckpointError,
    JobOwnedError,
    JobStateError,
    RoundFailed,
    StorageFullError,
)
from fleet.jobs import JobStore
from fleet.local import worker_env
from fleet.settings import FleetSettings
from tests.harness import (
    CHARLM,
    DIGITS,
    REPO,
    SMALL_CHARLM,
    RedisServer,
    WorkerProcess,
    inner_loops_started,
    run_in_thread,
    running_workers,
    settings_for,
    wait_until,
)

ALLOW = ["tests.workloads.*", "fleet.examples.*", "fleet.testing.*"]


@dataclass
class Cluster:
    server: RedisServer
    settings: FleetSettings
    workers: list[WorkerProcess]
    log_dir: Path

    def client(self, **overrides: object) -> Fleet:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        return Fleet(settings)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, artifacts_dir) -> Iterator[Cluster]:
    """A persistent private Redis and two digits workers of their own."""
    server = RedisServer(tmp_path_factory.mktemp("faults-redis"), persistent=True)
    settings = settings_for(
        server.url, tmp_path_factory.mktemp("faults-shared"), workload_allowlist=ALLOW
    )
    log_dir = artifacts_dir / "logs" / "faults"
    try:
        with running_workers(settings, [30, 31], log_dir) as workers:
            yield Cluster(server, settings, workers, log_dir)
    finally:
        # Celery results left pending by the killed orchestrators unsubscribe when they
        # are collected: let that happen while their Redis still runs.
        gc.collect()
        server.stop()


@pytest.fixture
def fleet(cluster) -> Iterator[Fleet]:
    client = cluster.client()
    yield client
    client.close()


def _finished(jobs: JobStore, job_id: str) -> int:
    return sum("replica_round finished" in line.line for line in jobs.logs(job_id))


def _digits(**overrides: object) -> DiLoCoConfig:
    values: dict[str, object] = {
        "workload": DIGITS,
        "config": {"step_sleep_s": 0.02},
        "replicas": 2,
        "rounds": 3,
        "inner_steps": 20,
        "eval_every": 1,
    }
    values.update(overrides)
    return DiLoCoConfig(**values)  # type: ignore[arg-type]


def _values_path(shared_root: Path, pack_path: str) -> Path:
    directory = shared_root / pack_path
    manifest = json.loads((directory / "manifest.json").read_text())
    return directory / manifest["values_f32_le"]


def _fleet_cli(settings: FleetSettings, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", *args],
        env=worker_env(settings, [str(REPO)]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _digits_cli(
    settings: FleetSettings, job_id: str, config_json: str, inner_steps: int
) -> subprocess.Popen[bytes]:
    """``fleet diloco`` on digits as its own process: 2 replicas, 3 rounds, no eval."""
    return _fleet_cli(
        settings,
        "diloco",
        "--workload",
        DIGITS,
        "--config-json",
        config_json,
        "--replicas",
        "2",
        "--rounds",
        "3",
        "--inner-steps",
        str(inner_steps),
        "--eval-every",
        "0",
        "--job-id",
        job_id,
    )


# --------------------------------------------------------------------------- 1. ownership


def test_one_orchestrator_per_job(cluster, fleet):
    """A second orchestrator is refused while the first lives (naming it); once the
    first is SIGKILLed the job shows orphaned, a resume takes it over, aborts the dead
    owner's replicas, and every round is committed exactly once."""
    job_id = f"owned-{time.time_ns()}"
    handles_before = {h.model_id for h in fleet.registry.handles()}
    first = _digits_cli(cluster.settings, job_id, '{"step_sleep_s": 0.15, "slow_replica": 1}', 40)
    jobs = JobStore(fleet.registry)
    try:
        # round 1 in flight: replica 0 finished (fast), replica 1 (slow) training
        wait_until(
            lambda: (
                jobs.redis.exists(f"fleet:job:{job_id}")
                and inner_loops_started(jobs, job_id) >= 4
                and _finished(jobs, job_id) >= 3
            ),
            90,
            "round 1 half done",
        )
        with pytest.raises(JobOwnedError) as refused:
            DiLoCoRun.resume(fleet, job_id).run()
        assert refused.value.owner_pid == first.pid
        assert refused.value.heartbeat_age_s < cluster.settings.job_lease_ttl_s
        second = _fleet_cli(cluster.settings, "diloco", "--resume", job_id)
        out = second.communicate(timeout=60)[0].decode()
        assert second.returncode == 1
        assert f"is run by pid {first.pid}" in out and "Traceback" not in out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    before = [m["round"] for m in jobs.metrics(job_id)]
    assert jobs.get(job_id).status == "running"
    wait_until(lambda: jobs.get(job_id).shown_status == "orphaned", 30, "orphaned")
    assert any(j.job_id == job_id and j.shown_status == "orphaned" for j in jobs.list_jobs())

    run = DiLoCoRun.resume(fleet, job_id)
    job = run.run()
    assert job.status == "completed"
    rounds = [m["round"] for m in jobs.metrics(job_id)]
    assert rounds == [0, 1, 2], "each round committed exactly once"
    assert rounds[: len(before)] == before
    logs = jobs.logs(job_id)
    # of the round in flight, the dead owner's finished replica was adopted (not run
    # again) and its running one aborted on its worker, then run again
    taken_over = run.rounds()[len(before)]
    aborted = [r for r in taken_over.replicas if r.status == "aborted"]
    assert [(r.replica, r.attempt, r.error) for r in aborted] == [(1, 0, "previous owner")]
    assert [(r.replica, r.attempt) for r in taken_over.merged] == [(0, 0), (1, 1)]
    wait_until(
        lambda: any("replica_round failed: TaskAborted" in x.line for x in jobs.logs(job_id)),
        10,
        "the old replica stopped",
    )
    assert inner_loops_started(jobs, job_id) == 3 * 2 + 1
    assert any("adopted 1 finished and aborted 1 running" in x.line for x in logs)
    assert jobs.tracked_tasks(job_id) == set()
    # the job released every handle it made (other tests' handles are theirs)
    assert {h.model_id for h in fleet.registry.handles()} == handles_before


def test_a_stalled_orchestrator_is_fenced_out_when_it_wakes(cluster, fleet):
    """The first orchestrator is SIGSTOPped mid-round (alive, but silent): its lease
    runs out, a second takes the job over and finishes it. Woken with SIGCONT, the
    first finds its fencing token stale: it writes nothing, says FencedOutError and
    exits non-zero; every round is committed exactly once, by the second."""
    job_id = f"fenced-{time.time_ns()}"
    first = _digits_cli(cluster.settings, job_id, '{"step_sleep_s": 0.1}', 30)
    jobs = JobStore(fleet.registry)
    try:
        wait_until(
            lambda: (
                jobs.redis.exists(f"fleet:job:{job_id}") and inner_loops_started(jobs, job_id) >= 2
            ),
            90,
            "round 0 training",
        )
        first.send_signal(signal.SIGSTOP)
        wait_until(lambda: jobs.get(job_id).shown_status == "orphaned", 30, "lease expired")
        run = DiLoCoRun.resume(fleet, job_id)
        job = run.run()
        assert job.status == "completed"
        committed = [m["round"] for m in jobs.metrics(job_id)]
        first.send_signal(signal.SIGCONT)
        out = first.communicate(timeout=120)[0].decode()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait(10)
    assert first.returncode not in (0, None), out
    assert "FencedOutError" in out and "Traceback" not in out, out
    assert committed == [0, 1, 2]
    assert [m["round"] for m in jobs.metrics(job_id)] == [0, 1, 2], "nothing written after"
    assert jobs.get(job_id).status == "completed"


# --------------------------------------------------------------------------- 2. Redis outages


def _charlm(job_suffix: str) -> DiLoCoConfig:
    return DiLoCoConfig(
        workload=CHARLM,
        config=SMALL_CHARLM,
        replicas=2,
        rounds=3,
        inner_steps=120,
        eval_every=1,
    )


@dataclass
class Outcome:
    losses: list[float]
    final_digest: str | None
    job_log: list[str]
    replica_statuses: list[str]


def _charlm_run(fleet: Fleet, during_round_1: Callable[[], None] | None = None) -> Outcome:
    run = DiLoCoRun.start(fleet, _charlm(""))
    thread, outcome = run_in_thread(run)
    if during_round_1 is not None:
        wait_until(lambda: inner_loops_started(run.jobs, run.job_id) >= 4, 120, "round 1 training")
        during_round_1()
    thread.join(timeout=240)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    job = outcome["job"]
    assert job.status == "completed", job.error
    rounds = run.rounds()
    state = run.state()
    assert state is not None
    return Outcome(
        losses=[r.eval.loss for r in rounds if r.eval is not None],
        final_digest=state.global_digest,
        job_log=[x.line for x in run.jobs.logs(run.job_id)],
        replica_statuses=[r.status for m in rounds for r in m.replicas],
    )


@pytest.fixture(scope="module")
def undisturbed(cluster) -> Outcome:
    client = cluster.client()
    try:
        return _charlm_run(client)
    finally:
        client.close()


@pytest.mark.parametrize("down_s", [2.0, 60.0], ids=["restart-2s", "down-60s"])
def test_a_redis_outage_mid_round_changes_nothing(cluster, fleet, undisturbed, down_s):
    """Redis stopped while round 1's replicas train, back after ``down_s``: the
    orchestrator, the workers and the replicas ride it out; the job completes with the
    very losses and final model of an undisturbed run, with no replica lost or re-run."""
    offsets = {w.name: w.log_path.stat().st_size for w in cluster.workers}
    disturbed = _charlm_run(fleet, lambda: cluster.server.restart(down_s))
    assert disturbed.losses == undisturbed.losses
    assert disturbed.final_digest == undisturbed.final_digest
    assert set(disturbed.replica_statuses) == {"merged"}
    assert len(disturbed.replica_statuses) == 6
    assert not any("Traceback" in line for line in disturbed.job_log)
    for w in cluster.workers:
        fleet.hello(worker=w.name, timeout_s=10)
        with w.log_path.open("rb") as f:
            f.seek(offsets[w.name])
            text = f.read().decode(errors="replace")
        # one line per outage and client, no tracebacks; the worker never stopped
        assert "Traceback" not in text and "Unrecoverable error" not in text
        assert text.count("Cannot connect to") <= 1
        # one line per outage and process (the worker's parent and its pool child)
        assert text.count("is unreachable") <= 2 and text.count("is back after") <= 2
        assert w.proc.poll() is None


def test_redis_gone_past_the_retry_budget_fails_the_job_once_it_is_back(cluster):
    """An orchestrator whose Redis stays away longer than its retry budget (3 s here)
    fails the job with the reason, recorded once Redis is back, and the job resumes."""
    short = cluster.client(redis_retry_s=3.0)
    try:
        run = DiLoCoRun.start(short, _digits(config={"step_sleep_s": 0.1}, rounds=2))
        thread, outcome = run_in_thread(run)
        wait_until(lambda: inner_loops_started(run.jobs, run.job_id) >= 2, 60, "round 0 training")
        cluster.server.stop()
        stopped = time.monotonic()
        # the outage outlasts the 3 s budget: its length is the scenario, not a sync
        wait_until(lambda: time.monotonic() - stopped >= 8.0, 10, "the outage")
        assert thread.is_alive(), "the orchestrator waits to record the failure"
        cluster.server.start()
        thread.join(timeout=60)
        assert isinstance(outcome.get("error"), BrokerUnavailableError)
        job = run.jobs.get(run.job_id)
        assert job.status == "failed" and "BrokerUnavailableError" in (job.error or "")
        assert any("recorded once Redis was back" in x.line for x in run.jobs.logs(run.job_id))
    finally:
        short.close()
    client = cluster.client()
    try:
        resumed = DiLoCoRun.resume(client, run.job_id).run()
        assert resumed.status == "completed"
        assert [r.round for r in DiLoCoRun.resume(client, run.job_id).rounds()] == [0, 1]
    finally:
        client.close()


# --------------------------------------------------------------------------- 3. checkpoints


class _StopAfter(Exception):
    pass


def _nan(values: Path) -> None:
    with values.open("r+b") as f:
        f.seek(4 * 17)
        f.write(struct.pack("<f", float("nan")))


def _flip_bit(values: Path) -> None:
    with values.open("r+b") as f:
        f.seek(4 * 17 + 1)
        byte = f.read(1)[0]
        f.seek(4 * 17 + 1)
        f.write(bytes([byte ^ 0x10]))


def _checkpointed_and_failed(cluster, fleet: Fleet) -> tuple[DiLoCoRun, Path]:
    """A job checkpointing every round that failed after committing 2 rounds, with its
    round-2 checkpoint landed, and no worker holding any of its global models (their
    local state wiped, as on new machines): the checkpoint's values file."""
    run = DiLoCoRun.start(fleet, _digits(checkpoint_every=1), on_round=_stop_after(2))
    with pytest.raises(_StopAfter):
        run.run()
    wait_until(lambda: "global/2" in run.jobs.checkpoints(run.job_id), 30, "checkpoint 2 landed")
    shutil.rmtree(Path(cluster.settings.cache_dir) / "diloco" / run.job_id, ignore_errors=True)
    root = Path(cluster.settings.shared_root)
    return run, _values_path(root, run.layout.checkpoint(2))


def _stop_after(rounds_done: int):  # type: ignore[no-untyped-def]
    def stop(record: RoundRecord) -> None:
        if record.round + 1 == rounds_done:
            raise _StopAfter(f"stopped after round {record.round}")

    return stop


@pytest.mark.parametrize("corrupt", [_nan, _flip_bit], ids=["nan", "flipped-bit"])
def test_a_corrupt_checkpoint_is_rebuilt_to_the_same_bits(cluster, fleet, corrupt):
    """A failed job resumes (failed is not final); its newest full checkpoint, corrupted
    on disk (a NaN, or one flipped bit at the same length), is caught before use and
    rebuilt by a worker from the checkpoint before it and the committed outer step
    since (fetched from the shared root: no worker holds the model) to the very same
    bytes."""
    run, values = _checkpointed_and_failed(cluster, fleet)
    original = values.read_bytes()
    corrupt(values)
    assert values.read_bytes() != original and len(values.read_bytes()) == len(original)

    job = DiLoCoRun.resume(fleet, run.job_id).run()
    assert job.status == "completed"
    lines = [x.line for x in run.jobs.logs(run.job_id)]
    corrupt_line = next(x for x in lines if "checkpoint is corrupt" in x)
    assert "round 2" in corrupt_line
    assert "DigestMismatchError" in corrupt_line  # read and hashed in one pass
    assert any("rebuilt: the same bits" in x for x in lines)
    assert any("caught up from round 1's checkpoint" in x for x in lines)
    assert values.read_bytes() == original
    assert [r.round for r in run.rounds()] == [0, 1, 2]

    # a completed job cannot be resumed: a typed error, and a non-zero exit in the CLI
    with pytest.raises(JobStateError):
        DiLoCoRun.resume(fleet, run.job_id).run()
    again = _fleet_cli(cluster.settings, "diloco", "--resume", run.job_id)
    out = again.communicate(timeout=60)[0].decode()
    assert again.returncode == 1 and "is completed" in out


def test_a_corrupt_checkpoint_without_its_inputs_fails_naming_the_round(cluster, fleet):
    run, values = _checkpointed_and_failed(cluster, fleet)
    _nan(values)
    step = run.state().steps[-1]  # round 1's outer step: its pseudo-gradients
    assert step.round == 1
    shutil.rmtree(Path(cluster.settings.shared_root) / step.replicas[0].pack.path)
    with pytest.raises(CorruptCheckpointError) as error:
        DiLoCoRun.resume(fleet, run.job_id).run()
    assert error.value.round == 2 and error.value.path == run.layout.checkpoint(2)
    job = run.jobs.get(run.job_id)
    assert job.status == "failed" and "CorruptCheckpointError" in (job.error or "")


# --------------------------------------------------------------------------- 4. workers


def test_a_restarted_worker_is_used_again_from_the_next_round(cluster, fleet):
    """A worker killed mid-round loses its replica (re-run on the survivor); restarted
    before the next round, it gets a replica again: placement is redone every round."""
    survivor = cluster.workers[0]
    victim = WorkerProcess(
        cluster.settings, 32, cluster.log_dir, workload=DIGITS, pythonpath=[str(REPO)], cwd=REPO
    )
    victim.wait_alive(fleet.registry)
    restarted: list[WorkerProcess] = []

    def restart_after_round_0(record: RoundRecord) -> None:
        if record.round != 0:
            return
        wait_until(
            lambda: (info := fleet.registry.worker(victim.name)) is None or info.status != "alive",
            30,
            "victim gone",
        )
        for _ in range(20):  # its name claim expires with its last heartbeat
            worker = WorkerProcess(
                cluster.settings,
                32,
                cluster.log_dir,
                workload=DIGITS,
                pythonpath=[str(REPO)],
                cwd=REPO,
            )
            try:
                worker.wait_alive(fleet.registry, timeout_s=60)
                restarted.append(worker)
                return
            except RuntimeError:
                worker.stop()
                time.sleep(0.5)
        raise AssertionError("the worker did not come back")

    cfg = _digits(
        config={"step_sleep_s": 0.05},
        eval_every=0,
        workers=[survivor.name, victim.name],
    )
    run = DiLoCoRun.start(fleet, cfg, on_round=restart_after_round_0)
    thread, outcome = run_in_thread(run)
    try:
        wait_until(
            lambda: any(
                x.worker == victim.name and "replica_round started" in x.line
                for x in run.jobs.logs(run.job_id)
            ),
            60,
            "a replica on the victim",
        )
        victim.kill()
        thread.join(timeout=180)
        assert not thread.is_alive()
        assert outcome.get("job") is not None, outcome.get("error")
        rounds = run.rounds()
        assert any(r.status == "lost" and r.worker == victim.name for r in rounds[0].replicas)
        assert all(r.worker == survivor.name for r in rounds[0].merged)
        for later in rounds[1:]:
            assert sorted(r.worker for r in later.merged) == sorted([survivor.name, victim.name])
    finally:
        victim.stop()
        for worker in restarted:
            worker.stop()


class Freezer:
    """Freezes workers with SIGSTOP (their heartbeats stop, as when their site's link is
    cut) and thaws each one still frozen on leaving the ``with``."""

    def __init__(self) -> None:
        self.frozen: list[WorkerProcess] = []

    def freeze(self, *workers: WorkerProcess) -> None:
        for worker in workers:
            os.killpg(worker.proc.pid, signal.SIGSTOP)
            self.frozen.append(worker)

    def thaw(self, worker: WorkerProcess) -> None:
        os.killpg(worker.proc.pid, signal.SIGCONT)
        self.frozen.remove(worker)

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in list(self.frozen):
            self.thaw(worker)


def test_every_worker_frozen_mid_round_is_waited_for_and_thawed_one_by_one(cluster):
    """Both workers are frozen (SIGSTOP: their heartbeats stop, as when their site's link
    is cut) mid-round, past the heartbeat TTL. With no worker alive to re-run on, the
    round keeps both attempts and says it waits. They are thawed one at a time, as a
    healed link's workers reconnect each on its own backoff: the first back gets its
    attempt going again, and the other gets the liveness grace rather than its replica
    re-run on the first. The job completes, each round committed once, every attempt
    merged: none was lost or re-run."""
    # The orchestrator's grace (a heartbeat TTL and the backoff cap) is ~32 s, so the
    # second thaw falls within it; the workers' own liveness keys expire after 3 s. No
    # adaptive deadline: the freeze outlasts it, and it would cut the second worker's
    # attempt once the first's is in (as it should: that is what deadlines are for).
    fleet = cluster.client(heartbeat_ttl_s=30.0)
    first, second = cluster.workers
    cfg = _digits(
        config={"step_sleep_s": 0.1},
        eval_every=0,
        quorum={"adaptive_deadline": {"enabled": False}},
    )
    try:
        run = DiLoCoRun.start(fleet, cfg)
        thread, outcome = run_in_thread(run)
        with Freezer() as freezer:
            wait_until(lambda: inner_loops_started(run.jobs, run.job_id) >= 4, 90, "round 1")
            freezer.freeze(first, second)
            wait_until(
                lambda: _logged(run.jobs, run.job_id, "no worker is alive; waiting"),
                60,
                "the round waiting for a worker",
            )
            freezer.thaw(first)
            wait_until(
                lambda: _logged(run.jobs, run.job_id, f"worker {first.name} is back"),
                60,
                "the first worker back",
            )
        thread.join(timeout=180)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["job"].status == "completed", outcome["job"].error
        rounds = run.rounds()
        assert [m.round for m in rounds] == [0, 1, 2]
        assert [r.status for m in rounds for r in m.replicas] == ["merged"] * 6
        assert _logged(run.jobs, run.job_id, "they get")
        assert _logged(run.jobs, run.job_id, f"worker {second.name} is back")
    finally:
        fleet.close()


def test_a_round_whose_workers_stay_lost_past_the_wait_fails_and_says_why(cluster, fleet):
    """Every worker frozen for longer than ``lost_worker_wait_s``: the round gives its
    replicas up and fails, and its error names each replica's reason (CI once saw a round
    fail with none)."""
    cfg = _digits(config={"step_sleep_s": 0.1}, eval_every=0, lost_worker_wait_s=1.0)
    run = DiLoCoRun.start(fleet, cfg)
    thread, outcome = run_in_thread(run)
    with Freezer() as freezer:
        wait_until(lambda: inner_loops_started(run.jobs, run.job_id) >= 4, 90, "round 1")
        freezer.freeze(*cluster.workers)
        thread.join(timeout=120)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, RoundFailed), error
    assert error.round == 1
    names = [w.name for w in cluster.workers]
    for replica in (0, 1):
        lost = [f"replica {replica} on {name}: its worker was lost" for name in names]
        assert any(reason in error.errors for reason in lost), error.errors
        # "no worker is alive", or "no live worker named ..." if its re-run's new worker
        # was found lost a heartbeat later than its own (a worse freeze than this one)
        assert any(e.startswith(f"replica {replica} not re-run: ") for e in error.errors)
    assert run.jobs.get(run.job_id).status == "failed"


def test_a_re_run_whose_new_worker_freezes_before_building_is_given_up_and_released(cluster, fleet):
    """One worker is frozen mid-round: its replica is re-run on the other, where the model
    build queues behind that worker's own attempt. The other worker freezes too before
    the build runs (CI saw this when both froze together and their liveness keys expired
    half a second apart). The round stops waiting for the build once that worker is lost,
    not after ``replica_call_timeout_s`` (300 s), and keeps its attempt for it to come
    back. Both are thawed: the round commits with the kept attempt, and the handle the
    late build made is released (the worker holds no more handles after the run than
    before it)."""
    first, second = cluster.workers
    handles_before = fleet.registry.redis.scard(keys.worker_handles(first.name))
    cfg = _digits(
        config={"step_sleep_s": 0.5},
        eval_every=0,
        quorum={"adaptive_deadline": {"enabled": False}},
    )
    run = DiLoCoRun.start(fleet, cfg)
    thread, outcome = run_in_thread(run)
    with Freezer() as freezer:
        wait_until(lambda: inner_loops_started(run.jobs, run.job_id) >= 4, 90, "round 1")
        freezer.freeze(second)
        wait_until(
            lambda: _logged(run.jobs, run.job_id, f"worker {second.name} lost mid-round"),
            60,
            "the first frozen worker lost",
        )
        freezer.freeze(first)
        wait_until(lambda: _logged(run.jobs, run.job_id, "is not re-run"), 60, "the build given up")
        wait_until(
            lambda: _logged(run.jobs, run.job_id, "no worker is alive; waiting"),
            60,
            "the round waiting for its other worker",
        )
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    rounds = run.rounds()
    assert [r.status for r in rounds[1].replicas if r.worker == second.name] == ["lost"]
    assert [r.worker for r in rounds[1].merged] == [first.name]
    handles_after = fleet.registry.redis.scard(keys.worker_handles(first.name))
    assert handles_after == handles_before
    assert _logged(run.jobs, run.job_id, "after it was given up on")


def _logged(jobs: JobStore, job_id: str, text: str) -> bool:
    return any(text in line.line for line in jobs.logs(job_id))


def test_a_redelivered_inner_loop_returns_its_recorded_result(cluster, fleet):
    """The same run_inner_loop message delivered twice (a worker died before its ack)
    runs once: the second delivery returns the result recorded beside the pack."""
    worker = cluster.workers[0]
    handle = fleet.init_model("cpu", workload=DIGITS, worker=worker.name)
    try:
        batches = [
            {
                "kind": "micro_epoch",
                "lease_id": "redelivery",
                "microshard_ids": ["shard-0"],
                "ordinals": [step],
                "bytes_len": 0,
                "pipeline_kind": "test",
                "payload": {"replica": 0, "num_replicas": 1, "round": 0, "step": step},
            }
            for step in range(4)
        ]
        out = f"redelivery/{time.time_ns()}/pack"
        first = fleet.run_inner_loop(handle.model_id, batches, 4, out, "schema")
        generation = fleet.registry.handle(handle.model_id).generation  # type: ignore[union-attr]
        second = fleet.run_inner_loop(handle.model_id, batches, 4, out, "schema")
        assert second == first  # same timestamps: not run again
        assert fleet.registry.handle(handle.model_id).generation == generation
        assert "already ran" in worker.log_path.read_text()
    finally:
        fleet.release_model(handle.model_id)


# --------------------------------------------------------------------------- 5. ENOSPC


@pytest.fixture
def tiny_shared_root(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a shared root that can be filled."""
    root = tmp_path / "tmpfs"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _fill(root: Path) -> Path:
    """Fill the file system at ``root`` to its last byte."""
    filler = root / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def test_enospc_in_the_pseudo_gradient_publish_fails_the_job_cleanly_and_resume_completes(
    tmp_path, tiny_shared_root, artifacts_dir
):
    """The shared root fills up while round 0's replica trains: publishing its
    pseudo-gradient gets ENOSPC, which arrives as StorageFullError naming the path; the
    job fails with no temp file left; with space freed, the failed job resumes and
    completes."""
    server = RedisServer(tmp_path / "redis")
    settings = settings_for(server.url, tiny_shared_root)
    client = Fleet(settings)
    try:
        with running_workers(settings, [40], artifacts_dir / "logs" / "enospc") as (worker,):
            cfg = _digits(config={"step_sleep_s": 0.05}, replicas=1, rounds=2, eval_every=0)
            run = DiLoCoRun.start(client, cfg)
            thread, outcome = run_in_thread(run)
            wait_until(
                lambda: inner_loops_started(run.jobs, run.job_id) >= 1, 60, "round 0 training"
            )
            filler = _fill(tiny_shared_root)
            thread.join(timeout=120)
            error = outcome.get("error")
            assert isinstance(error, StorageFullError), error
            assert error.path.endswith("round-0000/replica-0-a0")
            job = run.jobs.get(run.job_id)
            assert job.status == "failed"
            assert "StorageFullError: no space left writing" in (job.error or "")
            assert "(ENOSPC)" in (job.error or "")
            leftovers = [p for p in tiny_shared_root.rglob("*") if ".tmp" in p.name]
            assert leftovers == []
            assert "enforce fail" not in (job.error or "")

            filler.unlink()
            resumed = DiLoCoRun.resume(client, run.job_id).run()
            assert resumed.status == "completed"
            assert [r.round for r in run.rounds()] == [0, 1]
            assert worker.proc.poll() is None
    finally:
        client.close()
        server.stop()
