"""Jobs in Redis: status transitions, artifacts, metrics, logs, cancel; the `fleet jobs` CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.jobs import JobNotFound, JobStateError, JobStore


@pytest.fixture
def store(fleet_settings):
    return JobStore.from_settings(fleet_settings)


def test_status_transitions_are_timestamped_and_final(store):
    job = store.create("test", {"x": 1})
    assert job.status == "new" and job.spec == {"x": 1}
    store.set_status(job.job_id, "scheduled")
    store.set_status(job.job_id, "running")
    done = store.set_status(job.job_id, "completed")
    assert list(done.status_times) == ["new", "scheduled", "running", "completed"]
    assert done.status_times["new"] <= done.status_times["completed"]
    with pytest.raises(JobStateError):
        store.set_status(job.job_id, "running")
    assert store.cancel(job.job_id).status == "completed"  # a finished job stays finished
    with pytest.raises(JobNotFound):
        store.get("no-such-job")


def test_artifacts_metrics_logs_and_cancel(store, fleet_settings, monkeypatch):
    job = store.create("test", {})
    store.set_status(job.job_id, "running")
    store.add_artifact(job.job_id, "final_pack", "runs/x/final")
    store.add_metrics(job.job_id, {"round": 0, "loss": 2.0})
    store.add_metrics(job.job_id, {"round": 1, "loss": 1.0})
    for i in range(3):
        store.append_log(
            job.job_id, worker="w0", task_id=f"t{i}", level="INFO", logger="x", line=f"line {i}"
        )
    store.track_task(job.job_id, "task-a")
    assert store.get(job.job_id).artifacts == {"final_pack": "runs/x/final"}
    assert [m["round"] for m in store.metrics(job.job_id)] == [0, 1]
    lines = store.logs(job.job_id)
    assert [line.line for line in lines] == ["line 0", "line 1", "line 2"]
    assert [line.line for line in store.logs(job.job_id, after=lines[0].id)] == ["line 1", "line 2"]

    env = {"FLEET_REDIS_URL": fleet_settings.redis_url}
    runner = CliRunner(env=env)
    listed = runner.invoke(main, ["jobs", "list"], terminal_width=200)
    assert listed.exit_code == 0 and job.job_id in listed.output
    shown = runner.invoke(main, ["jobs", "show", job.job_id, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["metrics"][1]["loss"] == 1.0
    table = runner.invoke(main, ["jobs", "show", job.job_id], terminal_width=200)
    assert table.exit_code == 0 and "2 metrics records" in table.output and "{" not in table.output
    logs = runner.invoke(main, ["jobs", "logs", job.job_id])
    assert logs.exit_code == 0 and logs.output.count("line ") == 3 and "w0" in logs.output
    cancelled = runner.invoke(main, ["jobs", "cancel", job.job_id])
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    assert store.redis.exists("fleet:abort:task-a"), "running tasks are asked to abort"
    followed = runner.invoke(main, ["jobs", "logs", "--follow", job.job_id])  # ends: job is final
    assert followed.exit_code == 0 and followed.output.count("line ") == 3
    missing = runner.invoke(main, ["jobs", "show", "nope"])
    assert missing.exit_code == 1 and "JobNotFound" in missing.output
