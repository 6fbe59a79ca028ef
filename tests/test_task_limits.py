"""Limits and cancellation on real workers (docs/design.md decisions 1 and 2): the hard
task time limit kills a child stuck where no signal reaches it, and an abort flag
outlives the broker's visibility timeout, so a message redelivered after its worker died
stops before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import keys
from fleet.client import Fleet
from fleet.errors import HandleNotFound, OwnerLostError, RemoteTaskError
from fleet.registry import Registry
from fleet.settings import FleetSettings
from tests.harness import DIGITS, REPO, WorkerProcess, settings_for, wait_until

SCHEMA = "digits-mlp-v1"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _worker(settings: FleetSettings, slot: int, artifacts_dir: Path) -> WorkerProcess:
    worker = WorkerProcess(
        settings, slot, artifacts_dir / "logs", workload=DIGITS, pythonpath=[str(REPO)], cwd=REPO
    )
    try:
        worker.wait_alive(Registry.from_settings(settings))
    except BaseException:
        worker.stop()
        raise
    return worker


def test_the_hard_time_limit_kills_a_stuck_child(redis_server, tmp_path, artifacts_dir):
    """A hook stuck for an hour with the soft limit's signal blocked (a call stuck in
    native code): at task_time_limit_s the child is killed, the caller gets
    TimeLimitExceeded instead of waiting, and the worker serves again from a new child."""
    settings = settings_for(
        redis_server.url,
        tmp_path / "shared",
        pool_queue="fleet.time-limit-test",
        # limits every task of the worker: init_model took over 2 s once under the
        # suite's load, and its soft limit failed the test before the hang began
        task_soft_time_limit_s=6,
        task_time_limit_s=8,
    )
    worker = _worker(settings, 21, artifacts_dir)
    fleet = Fleet(settings)
    try:
        pid_file = tmp_path / "stuck.pid"
        config = {"hang_in": "evaluate", "hang_pid_file": str(pid_file)}
        handle = fleet.init_model("cpu", worker=worker.name, workload=DIGITS, config=config)
        # a caller that waited for the hook would wait an hour: it waits 60 s at most here
        with pytest.raises(RemoteTaskError) as info:
            fleet.evaluate(handle, "Test", timeout_s=60)
        assert info.value.error_type == "TimeLimitExceeded", info.value
        stuck = int(pid_file.read_text())
        wait_until(lambda: not _alive(stuck), 30, f"the stuck child {stuck} gone")
        assert worker.proc.poll() is None, "the worker itself lives on"

        # a new child registered, serves, and the old child's handle is not its own
        def new_child() -> bool:
            info = fleet.registry.worker(worker.name)
            return info is not None and info.status == "alive" and info.pid != stuck

        wait_until(new_child, 60, "a new child registered")
        assert fleet.hello(worker=worker.name, timeout_s=30).worker == worker.name
        # the killed child's model is gone with it: its handle is not served as live (the
        # child's shutdown hook, run on the pool's SIGTERM before the SIGKILL, released it)
        record = fleet.handle_record(handle)
        assert record is None or record.status == "lost", record
        with pytest.raises((HandleNotFound, OwnerLostError)):
            fleet.evaluate(handle, "Test", timeout_s=60)
        fresh = fleet.init_model("cpu", worker=worker.name, workload=DIGITS)
        assert fleet.evaluate(fresh, "Test", timeout_s=60)["examples"] > 0
    finally:
        fleet.close()
        worker.stop()


def test_an_abort_flag_outlives_the_visibility_timeout(redis_server, tmp_path, artifacts_dir):
    """An inner loop's worker dies mid-task (its message stays unacked in Redis); the
    task is aborted; once the visibility timeout passes, the message is redelivered to
    the worker restarted in the same slot, and the task stops before its first step."""
    # a Redis database of its own: kombu keeps one unacked-message hash per database,
    # and the restarted worker's 1 s visibility timeout would put back every other
    # test's unacked message in it
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/14"
    settings = settings_for(redis_url, tmp_path / "shared", pool_queue="fleet.abort-test")
    default_visibility_s = FleetSettings.model_fields["visibility_timeout_s"].default
    assert settings.visibility_timeout_s == default_visibility_s
    victim = _worker(settings, 22, artifacts_dir)
    fleet = Fleet(settings)
    restarted = None
    try:
        handle = fleet.init_model(
            "cpu", worker=victim.name, workload=DIGITS, config={"step_sleep_s": 0.05}
        )
        future = fleet.run_inner_loop(handle, [], 10_000, "packs/redelivered", SCHEMA, wait=False)
        wait_until(lambda: future.progress() is not None, 60, "the inner loop running")
        victim.kill()  # parent and child: the message is never acked
        future.cancel()  # the orchestrator gives the attempt up and aborts it
        # the flag lasts longer than any redelivery can take (the default visibility
        # timeout, 12 h), not only this test's
        ttl_ms = fleet.registry.redis.pttl(keys.abort(future.task_id))
        assert ttl_ms > default_visibility_s * 1000, ttl_ms
        # the same slot restarted with a 1 s visibility timeout: at start it restores the
        # unacked message (delivered seconds ago) to its queue, and runs it
        quick = settings.model_copy(update={"visibility_timeout_s": 1})
        restarted = _worker(quick, 22, artifacts_dir)
        with pytest.raises(RemoteTaskError) as info:
            future.result(timeout_s=120)
        assert info.value.error_type == "TaskAborted", info.value
        assert info.value.worker == restarted.name
        assert info.value.data["steps_completed"] == 0, "stopped before its first step"
        assert not fleet.shared.resolve("packs/redelivered").exists()
    finally:
        fleet.close()
        victim.stop()
        if restarted is not None:
            restarted.stop()
