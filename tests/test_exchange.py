"""DiLoCo's exchange (docs/protocol.md section 5.7) on workers that share nothing but the
shared root: each keeps its own cache directory, as on separate machines. Only the
encoded pseudo-gradients move each round; every worker rebuilds the committed global
model bit for bit (checked by digest); a worker whose disk was wiped, or whose copy of
a global model went bad, catches up from the last full checkpoint; a replica's state
is published off the critical path and a replica re-run elsewhere starts from it; a
worker that joins mid-run catches up and is used."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.diloco.state import RoundRecord
from fleet.local import WorkerProcess
from fleet.registry import Registry
from tests.harness import (
    DIGITS,
    REPO,
    inner_loops_started,
    run_in_thread,
    settings_for,
    wait_until,
)

#: digits at ~4.5M parameters: packs large enough that manifests and records are noise
WIDE = {"hidden": 60_000}


class PrivateWorkers:
    """Digits workers, each with a cache directory of its own (as on separate boxes)."""

    def __init__(self, settings, tmp_path: Path, log_dir: Path) -> None:  # type: ignore[no-untyped-def]
        self.settings, self.tmp_path, self.log_dir = settings, tmp_path, log_dir
        self.procs: dict[int, WorkerProcess] = {}

    def start(self, slot: int) -> WorkerProcess:
        proc = WorkerProcess(
            self.settings.model_copy(update={"cache_dir": self.cache(slot)}),
            slot,
            self.log_dir,
            workload=DIGITS,
            pythonpath=[str(REPO)],
            cwd=REPO,
        )
        proc.wait_alive(Registry.from_settings(self.settings))
        self.procs[slot] = proc
        return proc

    def cache(self, slot: int) -> Path:
        return self.tmp_path / f"cache-{slot}"

    def slot_of(self, name: str) -> int:
        return next(s for s, p in self.procs.items() if p.name == name)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture
def settings(redis_server, tmp_path):  # type: ignore[no-untyped-def]
    """A Redis database of its own: the session's digits workers (which share one cache
    directory) are not in its registry, so every replica runs on a private worker."""
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/5"
    return settings_for(
        redis_url, tmp_path / "shared", node="exchange", pool_queue="fleet.exchange"
    )


@pytest.fixture
def private(settings, tmp_path, artifacts_dir) -> Iterator[PrivateWorkers]:
    workers = PrivateWorkers(settings, tmp_path, artifacts_dir / "logs" / "exchange")
    try:
        yield workers
    finally:
        workers.stop()


def _config(private: PrivateWorkers, **overrides: object) -> DiLoCoConfig:
    values: dict[str, object] = {
        "workload": DIGITS,
        "config": WIDE,
        "replicas": 2,
        "rounds": 4,
        "inner_steps": 3,
        "eval_every": 0,
        "workers": [p.name for p in private.procs.values()],
        "outer": OuterOptimizerConfig(name="nesterov"),  # a momentum buffer to carry
    }
    values.update(overrides)
    return DiLoCoConfig(**values)  # type: ignore[arg-type]


def test_only_pseudo_gradients_move_and_every_worker_rebuilds_the_committed_model(
    settings, private
):
    for slot in (20, 21):
        private.start(slot)
    fleet = Fleet(settings)
    try:
        run = DiLoCoRun.start(fleet, _config(private))
        job = run.run()
    finally:
        fleet.close()
    assert job.status == "completed", job.error
    records = run.rounds()
    params = records[0].parameter_count
    assert params > 4_000_000
    initial = run.state().checkpoints[0].global_pack.values_digest
    for r in records:
        assert [o.replica for o in r.merged] == [0, 1]
        # each replica trained from the global model the run committed (its worker
        # checked the bits it rebuilt against that digest)
        entering = initial if r.round == 0 else records[r.round - 1].global_digest
        assert {o.base_digest for o in r.merged} == {entering}
        if r.round == 0:  # nobody held the initial model: both fetched it in full
            assert {o.global_source for o in r.merged} == {"caught-up"}
            continue
        # the outer step's worker made the new model; the other applied the step itself
        sources = {o.worker: o.global_source for o in r.merged}
        assert sources[records[r.round - 1].outer_step_worker] == "held"
        assert sorted(sources.values()) == ["held", "stepped"]
        assert {o.state_source for o in r.merged} == {"held"}
        if r.round == len(records) - 1:  # the last one also publishes the final model
            continue
        # on the wire (the stores' counters): each worker sends its int8
        # pseudo-gradient, about 1 byte per parameter
        for worker, moved in r.wire.items():
            assert 1.0 * params < moved.sent < 1.1 * params, (worker, moved)
    # and receives the other's once per round: in the outer step it computes, or in its
    # next attempt (which worker finishes first varies), so over rounds 1..n-2 a worker
    # received one pseudo-gradient per round, give or take the one at either end
    middle = records[1:-1]
    for worker in records[0].wire:
        received = sum(r.wire[worker].received for r in middle)
        assert (len(middle) - 1) * params < received < (len(middle) + 1) * 1.1 * params, (
            worker,
            received,
        )
    both = sum(r.wire[w].received for r in middle for w in r.wire)
    assert (2 * len(middle) - 1) * params < both < (2 * len(middle) + 1) * 1.1 * params
    final = run.state().checkpoint
    assert final.round == 4 and final.global_pack.values_digest == records[-1].global_digest
    # the outer step's worker published it in full (the model and the momentum), and
    # waited for it: 4 bytes a parameter each
    last = records[-1].wire[records[-1].outer_step_worker]
    assert 9.0 * params < last.sent < 9.2 * params


def test_a_worker_whose_disk_was_wiped_catches_up_from_the_last_checkpoint(settings, private):
    """Checkpoints every 2 rounds; after round 2 one worker loses its local disk: in round
    3 its replica fetches checkpoint 2 and applies round 2's outer step (one step), and
    starts its optimizer afresh (no state checkpoint yet); the run goes on to the same
    committed digests on both workers."""
    for slot in (22, 23):
        private.start(slot)
    fleet = Fleet(settings)
    wiped: list[str] = []

    def on_round(record: RoundRecord) -> None:
        if record.round == 1:  # checkpoint 2 (round 1's outer step) lands in the background
            wait_until(lambda: "global/2" in run.jobs.checkpoints(run.job_id), 30, "landed")
        if record.round == 2:
            victim = next(o.worker for o in record.merged if o.replica == 0)
            shutil.rmtree(private.cache(private.slot_of(victim)))
            wiped.append(victim)

    try:
        run = DiLoCoRun.start(
            fleet, _config(private, rounds=5, checkpoint_every=2), on_round=on_round
        )
        job = run.run()
    finally:
        fleet.close()
    assert job.status == "completed", job.error
    records = run.rounds()
    after = next(o for o in records[3].merged if o.worker == wiped[0])
    assert after.global_source == "caught-up" and after.steps_replayed == 1
    assert after.state_source == "fresh"
    assert after.base_digest == records[2].global_digest
    assert {o.base_digest for o in records[4].merged} == {records[3].global_digest}


def test_a_global_model_that_rotted_on_a_workers_disk_is_fetched_again(settings, private):
    """After round 1 every global model one worker keeps gets a flipped byte: its next
    attempt notices while loading (the digest), forgets what it held and catches up
    from the initial checkpoint; the run completes with the committed bits."""
    for slot in (24, 25):
        private.start(slot)
    fleet = Fleet(settings)
    rotted: list[str] = []

    def on_round(record: RoundRecord) -> None:
        if record.round != 1:
            return
        victim = next(o.worker for o in record.merged if o.replica == 1)
        for values in (private.cache(private.slot_of(victim)) / "diloco").rglob("values.f32le"):
            if values.parent.parent.name == "global":
                with values.open("r+b") as f:
                    f.seek(40)
                    byte = f.read(1)[0]
                    f.seek(40)
                    f.write(bytes([byte ^ 0x20]))
        rotted.append(victim)

    try:
        run = DiLoCoRun.start(fleet, _config(private), on_round=on_round)
        job = run.run()
    finally:
        fleet.close()
    assert job.status == "completed", job.error
    records = run.rounds()
    after = next(o for o in records[2].merged if o.worker == rotted[0])
    assert after.global_source == "caught-up" and after.steps_replayed == 2
    assert after.base_digest == records[1].global_digest
    lines = [x.line for x in run.jobs.logs(run.job_id)]
    assert any("held here is corrupt" in x and "DigestMismatchError" in x for x in lines)


def test_a_lost_replica_restarts_from_its_published_state_on_another_worker(settings, private):
    """Replica states are published after every round (in the background); the worker
    of replica 0 is SIGKILLed while round 2 trains: the replica is re-run on the other
    worker from its state checkpoint (not bit-identical to the lost attempt, which
    started from the state its own worker kept), and the round commits once."""
    survivor, victim = private.start(26), private.start(27)
    fleet = Fleet(settings)
    try:
        cfg = _config(
            private,
            config={**WIDE, "step_sleep_s": 0.2},
            rounds=4,
            inner_steps=10,
            state_checkpoint_every=1,
            workers=[victim.name, survivor.name],
        )
        run = DiLoCoRun.start(fleet, cfg)
        thread, outcome = run_in_thread(run)
        wait_until(lambda: len(run.rounds()) >= 2, 120, "two rounds committed")
        wait_until(
            lambda: inner_loops_started(run.jobs, run.job_id, victim.name) >= 3,
            60,
            "round 2 training on the victim",
        )
        victim.kill()
        thread.join(timeout=240)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    finally:
        fleet.close()
    records = run.rounds()
    assert [r.round for r in records] == [0, 1, 2, 3], "each round committed once"
    lost_round = next(r for r in records if any(o.status == "lost" for o in r.replicas))
    lost = next(o for o in lost_round.replicas if o.status == "lost")
    assert lost.worker == victim.name and lost.replica == 0
    rerun = next(o for o in lost_round.merged if o.replica == 0)
    assert rerun.worker == survivor.name and rerun.state_source == "checkpoint"
    assert rerun.base_digest == records[lost_round.round - 1].global_digest
    state = run.state()
    assert all(start.checkpoint is not None for start in state.replicas)


def test_a_worker_that_joins_mid_run_catches_up_and_is_used(settings, private):
    """3 replicas on 2 workers; a third worker (its disk empty) joins after round 0: from
    then on it gets a replica, whose first attempt there fetches the initial checkpoint
    and applies every outer step since."""
    for slot in (28, 29):
        private.start(slot)
    fleet = Fleet(settings)
    joined: list[WorkerProcess] = []

    def on_round(record: RoundRecord) -> None:
        if record.round == 0:
            joined.append(private.start(30))

    try:
        run = DiLoCoRun.start(fleet, _config(private, replicas=3, rounds=3), on_round=on_round)
        job = run.run()
    finally:
        fleet.close()
    assert job.status == "completed", job.error
    records = run.rounds()
    assert joined and joined[0].name not in {o.worker for o in records[0].replicas}
    first = next(o for o in records[1].merged if o.worker == joined[0].name)
    assert first.global_source == "caught-up" and first.steps_replayed == 1
    assert first.base_digest == records[0].global_digest
    assert joined[0].name in {o.worker for o in records[2].merged}
    assert os.path.isdir(private.cache(30))


def test_a_committed_pseudo_gradient_gone_bad_on_the_store_is_replaced_by_a_checkpoint(
    settings, private
):
    """Round 0 commits; then one bit of the outer step's worker's own pseudo-gradient is
    flipped on the shared root (that worker read its copy from its disk, so the step was
    computed right). The other worker cannot replay round 0's step in round 1: its
    attempt fails naming the pack, the worker holding the model publishes it in full as
    round 1's checkpoint, the replica is re-run, and the other worker catches up from that
    checkpoint in round 2. Every round commits once, with both replicas."""
    for slot in (28, 29):
        private.start(slot)
    fleet = Fleet(settings)
    flipped: list[str] = []

    def on_round(record: RoundRecord) -> None:
        if record.round != 0:
            return
        own = next(o for o in record.merged if o.worker == record.outer_step_worker)
        assert own.pack is not None
        values = fleet.shared.resolve(own.pack.path) / "values.bin"  # the int8 codes
        data = bytearray(values.read_bytes())
        data[len(data) // 2] ^= 0x01
        values.write_bytes(bytes(data))
        flipped.append(own.pack.path)

    try:
        run = DiLoCoRun.start(fleet, _config(private, rounds=3), on_round=on_round)
        job = run.run()
    finally:
        fleet.close()
    assert job.status == "completed", job.error
    records = run.rounds()
    assert [r.round for r in records] == [0, 1, 2]
    assert all([o.replica for o in r.merged] == [0, 1] for r in records)
    failed = [o for o in records[1].replicas if o.status == "failed"]
    assert len(failed) == 1 and "DigestMismatchError" in (failed[0].error or "")
    assert flipped[0] in (failed[0].error or "")
    # round 1's model was published in full and the failed worker caught up from it
    back = next(o for o in records[2].merged if o.worker == failed[0].worker)
    assert back.global_source == "caught-up" and back.steps_replayed == 1
    assert {o.base_digest for o in records[2].merged} == {records[1].global_digest}
