"""CeleryExecutor: launch, poll, logs, cancel, collect on real workers."""

from __future__ import annotations

import time

import pytest

from fleet.errors import BadFactorySpecError, WorkerNotFound
from fleet.executor import CeleryExecutor
from tests.harness import wait_until

EP = "tests.workloads.entrypoints"


@pytest.fixture
def executor(fleet):
    return CeleryExecutor(fleet)


def _until_done(executor, handle, timeout_s=30.0):
    wait_until(lambda: executor.poll(handle) not in ("pending", "running"), timeout_s, "done")
    return executor.poll(handle)


def test_launch_collect_in_rank_order_with_real_logs(executor, two_workers):
    handles = executor.launch_replicas(3, f"{EP}:train", {"steps": 2})
    assert [h.rank for h in handles] == [0, 1, 2]
    results = executor.collect(handles, timeout=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["status"] == "succeeded" and r["exit_code"] == 0 and r["error"] is None
        assert r["result"] == {"rank": r["rank"], "world_size": 3, "steps": 2}
    logs = executor.stream_logs(handles[2])
    assert (
        "rank 2 step 0" in logs
        and "rank 2 step 1" in logs
        and "INFO tests.entrypoints: rank 2 done" in logs
    )
    assert executor.stream_logs(handles[2], n_lines=1).count("\n") == 0


def test_dotted_entrypoint_and_custom_rank_env(executor, two_workers):
    handles = executor.launch_replicas(
        2, f"{EP}.custom_rank", ["OTHER_RANK"], rank_env="OTHER_RANK"
    )
    assert [r["result"] for r in executor.collect(handles, timeout=60)] == ["0", "1"]


def test_a_replica_that_raises(executor, two_workers):
    good, bad = (
        executor.launch_replicas(1, f"{EP}:train")[0],
        executor.launch_replicas(1, f"{EP}:boom")[0],
    )
    assert _until_done(executor, bad) == "failed"
    [result] = executor.collect([bad])
    assert result["exit_code"] == 1 and result["error"] == "ValueError: replica exploded"
    logs = executor.stream_logs(bad)
    assert "about to fail" in logs and "[stderr] Traceback" in logs and "replica exploded" in logs
    assert executor.collect([good])[0]["status"] == "succeeded"


def test_poll_running_then_cancel(executor, fleet, two_workers):
    sleep_s = 60
    [handle] = executor.launch_replicas(1, f"{EP}:sleepy", {"seconds": sleep_s})
    wait_until(lambda: executor.poll(handle) == "running", 30, "the replica running")
    assert "still sleeping" in executor.stream_logs(handle, 5)
    started = time.monotonic()
    executor.cancel(handle)
    assert _until_done(executor, handle, timeout_s=sleep_s) == "cancelled"
    # cut short: well inside the sleep it would otherwise have finished
    assert time.monotonic() - started < sleep_s / 4
    [result] = executor.collect([handle])
    assert result["status"] == "cancelled"
    for w in two_workers:  # the workers and their models live on
        assert fleet.hello(worker=w.name, timeout_s=10).worker == w.name


def test_cancel_a_pending_replica(executor, two_workers):
    blockers = executor.launch_replicas(2, f"{EP}:sleepy", {"seconds": 3})
    [queued] = executor.launch_replicas(1, f"{EP}:train")
    assert executor.poll(queued) == "pending"
    executor.cancel(queued)
    assert executor.poll(queued) == "cancelled"
    executor.collect(blockers, timeout=60)
    [result] = executor.collect([queued], timeout=30)
    assert result["status"] == "cancelled" and result["result"] is None


def test_bad_entrypoints(executor, two_workers):
    with pytest.raises(BadFactorySpecError):
        executor.launch_replicas(1, "nodots")
    [handle] = executor.launch_replicas(1, "os:system", ["true"])
    [result] = executor.collect([handle], timeout=30)
    assert result["status"] == "failed" and result["error"].startswith("NotAllowlistedError")
    with pytest.raises(WorkerNotFound):
        executor.launch_replicas(1, f"{EP}:train", gpu=True)  # no GPU workers here
