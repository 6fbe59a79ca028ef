"""Stacks of what hung (fleet.stacks), on real workers: a DiLoCo replica stuck in its
hook, a task past its soft time limit, and one killed at its hard time limit each leave
every thread's Python stack on the shared root, naming the function it was stuck in,
and ``fleet jobs show`` and the job's log point to the file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.diloco.config import DatasetConfig
from fleet.jobs import JobStore
from fleet.local import worker_env
from fleet.stacks import artifact_name, stacks_path
from fleet.testing.shard_workload import write_shards
from tests.harness import run_in_thread, running_workers, wait_until

SHARDS = "fleet.testing.shard_workload:make"
#: The shards workload's hook that sleeps for an hour (fleet/testing/shard_workload.py).
STUCK_FUNCTION = "_step_sleep_s"


@pytest.fixture(scope="module")
def shards_dataset(fleet_settings) -> tuple[str, Path]:
    name = f"datasets/stacks-{time.time_ns()}"
    root = Path(fleet_settings.shared_root) / name
    write_shards(root, 8)
    return name, root


def _show(settings, job_id: str) -> tuple[str, dict]:
    """``fleet jobs show JOB`` as a user runs it: its text and its --json."""
    runner = CliRunner(env=worker_env(settings))
    text = runner.invoke(main, ["jobs", "show", job_id])
    assert text.exit_code == 0, text.output
    as_json = runner.invoke(main, ["jobs", "show", job_id, "--json"])
    assert as_json.exit_code == 0, as_json.output
    return text.output, json.loads(as_json.output)


def _stacks_of(settings, shared, job_id: str, task_id: str | None = None) -> dict[str, str]:
    """The job's stacks artifacts as ``fleet jobs show --json`` lists them, each read
    back from the shared root (artifact name -> the file's text)."""
    _, shown = _show(settings, job_id)
    found = {
        name: path
        for name, path in shown["artifacts"].items()
        if name.startswith("stacks/") and (task_id is None or name == artifact_name(task_id))
    }
    return {name: shared.read_bytes(path).decode() for name, path in found.items()}


def test_a_replica_stuck_in_its_hook_leaves_its_stacks_in_jobs_show(
    fleet, fleet_settings, two_workers, shards_dataset
):
    """Replica 1 sleeps for an hour in its hook in round 2; the round's deadline aborts
    it and its worker interrupts it: the stacks file, listed by ``fleet jobs show``,
    holds the main thread inside the stuck function, when asked to abort and again
    before the interrupt, and the job's log names the file."""
    cfg = DiLoCoConfig(
        workload=SHARDS,
        config={"step_sleep_s": 0.02, "stuck": {"replica": 1, "round": 2}},
        replicas=2,
        rounds=3,
        inner_steps=8,
        eval_every=0,
        dataset=DatasetConfig(
            path=shards_dataset[0], microshards_per_lease=2, batch_kind="micro_epoch"
        ),
    )
    run = DiLoCoRun.start(fleet, cfg)
    thread, outcome = run_in_thread(run)
    thread.join(timeout=150)
    assert not thread.is_alive() and outcome["job"].status == "completed", outcome
    [stuck] = [o for o in run.rounds()[2].replicas if o.status == "aborted"]
    assert stuck.replica == 1

    def stuck_stacks() -> dict[str, str]:
        found = _stacks_of(fleet_settings, fleet.shared, run.job_id)
        return {k: v for k, v in found.items() if "stuck: still running" in v}

    wait_until(stuck_stacks, 60, "the stuck replica's stacks before its interrupt", interval_s=0.5)
    [(name, text)] = stuck_stacks().items()
    task_id = name.removeprefix("stacks/")
    assert "replica_round task" in text and "asked to abort" in text
    for section in text.split("\n== ")[:2]:
        main_thread = section.split("-- thread MainThread")[1].split("-- thread")[0]
        assert STUCK_FUNCTION in main_thread, section
        assert "time.sleep(3600)" in main_thread
    shown, _ = _show(fleet_settings, run.job_id)
    path = stacks_path(run.job_id, task_id)
    assert f"artifact {name}" in shown and path in shown, shown
    logs = [x for x in run.jobs.logs(run.job_id) if x.task_id == task_id]
    assert any(f"stacks of every thread written to {path}" in x.line for x in logs)
    assert {x.worker for x in logs} == {stuck.worker}


@pytest.fixture(scope="module")
def limited_worker(fleet_settings, artifacts_dir, tmp_path_factory):
    """One more worker, with a cache directory of its own (where faulthandler writes)."""
    settings = fleet_settings.model_copy(
        update={"cache_dir": tmp_path_factory.mktemp("stacks-cache")}
    )
    with running_workers(settings, [7], artifacts_dir / "logs", workload=SHARDS) as workers:
        yield workers[0]


def _stuck_task(
    fleet, worker, shards_dataset, job_id: str, *, hold_gil: bool = False, **limits: float
) -> str:
    """Send a ``train_window`` whose first step hangs (sleeps for an hour, or with
    ``hold_gil`` spins in C holding the GIL) to ``worker`` with Celery's per-task
    ``time_limit`` / ``soft_time_limit``; returns its task id."""
    config = {"stuck": {"replica": 0, "round": 0, "hold_gil": hold_gil}}
    handle = fleet.init_model("cpu", worker=worker.name, workload=SHARDS, config=config)
    batch = {
        "kind": "micro_epoch",
        "lease_id": "l0",
        "microshard_ids": ["00000"],
        "ordinals": [0],
        "bytes_len": 1,
        "pipeline_kind": "test",
        "payload": {
            "replica": 0,
            "round": 0,
            "shard_paths": [str(shards_dataset[1] / "00000.bin")],
        },
    }
    sent = fleet.app.send_task(
        "fleet.train_window",
        kwargs={
            "params": {"model_id": handle.model_id, "batches": [batch]},
            "workload": {"spec": SHARDS, "config": config},
            "job_id": job_id,
        },
        queue=worker.queue,
        **limits,
    )
    return str(sent.id)


def test_a_task_past_its_soft_time_limit_leaves_its_stacks(
    fleet, fleet_settings, limited_worker, shards_dataset
):
    jobs = JobStore(fleet.registry)
    job = jobs.create("stacks-test", {})
    task_id = _stuck_task(
        fleet, limited_worker, shards_dataset, job.job_id, soft_time_limit=3, time_limit=120
    )
    wait_until(
        lambda: _stacks_of(fleet_settings, fleet.shared, job.job_id, task_id),
        60,
        "stacks at the soft time limit",
        interval_s=0.5,
    )
    [text] = _stacks_of(fleet_settings, fleet.shared, job.job_id, task_id).values()
    assert "train_window task" in text and "soft time limit exceeded" in text
    main_thread = text.split("-- thread MainThread")[1].split("-- thread")[0]
    assert STUCK_FUNCTION in main_thread, text
    wait_until(  # the task's log lines reach Redis through a listener thread
        lambda: any(
            f"stacks of every thread written to {stacks_path(job.job_id, task_id)}" in x.line
            for x in jobs.logs(job.job_id)
        ),
        30,
        "the log line naming the stacks",
    )


def test_a_task_killed_at_its_hard_time_limit_leaves_its_stacks(
    fleet, fleet_settings, limited_worker, shards_dataset
):
    """A hook stuck in a C call that holds the GIL ignores the soft limit (no Python
    handler can run); Celery's hard limit then sends the pool child SIGTERM and SIGKILL:
    faulthandler writes the stacks locally at the SIGTERM, without the GIL, and the
    worker's next child uploads them."""
    jobs = JobStore(fleet.registry)
    job = jobs.create("stacks-test", {})
    task_id = _stuck_task(
        fleet,
        limited_worker,
        shards_dataset,
        job.job_id,
        hold_gil=True,
        soft_time_limit=2,
        time_limit=4,
    )
    wait_until(
        lambda: _stacks_of(fleet_settings, fleet.shared, job.job_id, task_id),
        90,
        "stacks of the killed task, uploaded by the next pool child",
        interval_s=0.5,
    )
    [text] = _stacks_of(fleet_settings, fleet.shared, job.job_id, task_id).values()
    assert "train_window task" in text and "killed (signal SIGTERM" in text
    assert "in _deadlock_holding_the_gil\n  File " in text and f"in {STUCK_FUNCTION}" in text
    assert text.count("Thread 0x") + text.count("Current thread 0x") >= 3, "every thread"
    shown, _ = _show(fleet_settings, job.job_id)
    assert stacks_path(job.job_id, task_id) in shown
    wait_until(  # logged, then the local copy deleted, after the upload seen above
        lambda: any(
            "train_window was killed" in x.line and x.task_id == task_id
            for x in jobs.logs(job.job_id)
        ),
        30,
        "the log line of the killed task",
    )
    wait_until(
        lambda: not list((Path(limited_worker.settings.cache_dir) / "stacks").rglob("*.txt")),
        30,
        "uploaded files leave the worker's disk",
    )
