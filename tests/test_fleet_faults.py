"""Dead and departing workers: SIGKILL, graceful shutdown, and what the registry says."""

from __future__ import annotations

import pytest

from fleet.client import Fleet
from fleet.errors import OwnerLostError, WorkerNotFound
from tests.harness import running_workers, wait_until

SCHEMA = "digits-mlp-v1"


def test_sigkilled_worker_handles_are_lost_and_name_their_last_pack(
    fleet_settings, artifacts_dir, two_workers
):
    with running_workers(fleet_settings, [5], artifacts_dir / "logs") as (worker,):
        fleet = Fleet(fleet_settings)
        published = fleet.init_model("cpu", worker=worker.name)
        ref = fleet.export_parameter_pack(published, "packs/before-crash", SCHEMA)
        never_published = fleet.init_model("cpu", worker=worker.name)
        assert fleet.handle_record(published).status == "live"

        worker.kill()  # parent and pool child, no cleanup at all
        wait_until(
            lambda: fleet.handle_record(published).status == "lost",
            fleet_settings.heartbeat_ttl_s + 10,
        )

        lost = {w.name: w for w in fleet.workers(include_lost=True)}
        assert lost[worker.name].status == "lost"
        assert worker.name not in {w.name for w in fleet.workers()}
        # fails fast: a call that waited on the dead queue would end in a timeout instead
        with pytest.raises(OwnerLostError) as info:
            fleet.evaluate(published, "Test", timeout_s=30)
        assert info.value.owner == worker.name
        assert info.value.last_pack["path"] == ref.path
        assert ref.path in str(info.value)
        with pytest.raises(OwnerLostError) as unpublished:
            fleet.train_window(never_published, [])
        assert unpublished.value.last_pack is None
        with pytest.raises(WorkerNotFound):
            fleet.hello(worker=worker.name)
        # the pack it left is whole and loads anywhere
        restored = fleet.import_parameter_pack(info.value.last_pack["path"])
        assert fleet.handle_record(restored).status == "live"
        fleet.close()


def test_shutdown_is_graceful_and_releases_handles(fleet_settings, artifacts_dir, two_workers):
    with running_workers(fleet_settings, [6], artifacts_dir / "logs") as (worker,):
        fleet = Fleet(fleet_settings)
        handles = [fleet.init_model("cpu", worker=worker.name) for _ in range(2)]
        assert len(fleet.registry.handles(owner=worker.name)) == 2
        assert fleet.shutdown(worker.name) is True
        worker.proc.wait(30)
        assert worker.proc.returncode == 0
        assert fleet.registry.worker(worker.name) is None
        assert fleet.registry.handles(owner=worker.name) == []
        for h in handles:
            assert fleet.handle_record(h) is None
        assert {w.name for w in two_workers} <= {
            w.name for w in fleet.workers()
        }  # others untouched
        fleet.close()


def test_sigterm_deregisters_the_worker(fleet_settings, artifacts_dir):
    with running_workers(fleet_settings, [7], artifacts_dir / "logs") as (worker,):
        fleet = Fleet(fleet_settings)
        handle = fleet.init_model("cpu", worker=worker.name)
        worker.stop()
        assert worker.proc.returncode == 0
        assert fleet.registry.worker(worker.name) is None
        assert fleet.handle_record(handle) is None
        fleet.close()
