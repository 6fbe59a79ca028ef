"""Round deadlines from observed speed (fleet.diloco.deadline), on real workers with the
burn_p2p-style workload: the tight adaptive deadline drops a 4x straggler and gives its
microshards back; with default settings a replica stuck inside a hook is aborted within
a few median rounds, its worker interrupted, and the job completes."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from fleet.diloco import DiLoCoConfig, DiLoCoRun, QuorumConfig
from fleet.diloco.config import AdaptiveDeadlineConfig, DatasetConfig
from fleet.diloco.deadline import RoundDeadline
from fleet.diloco.state import ReplicaOutcome, RoundRecord
from fleet.protocol import OuterStepSpec, WeightedPack
from fleet.storage import PackRef
from fleet.testing.shard_workload import write_shards
from tests.harness import run_in_thread

SHARDS = "fleet.testing.shard_workload:make"


def _record(index: int, seconds: list[float], steps: int = 10) -> RoundRecord:
    outcomes = [
        ReplicaOutcome(
            replica=i,
            attempt=0,
            worker="w",
            status="merged",
            started_at=0.0,
            finished_at=s,
            steps_completed=steps,
        )
        for i, s in enumerate(seconds)
    ]
    pack = PackRef(path="p")
    step = OuterStepSpec(round=index, replicas=[WeightedPack(pack=pack, weight=1.0)])
    return RoundRecord(
        round=index, started_at=0, closed_at=0, wall_s=0, outer_step_s=0, step=step,
        replicas=outcomes,
    )  # fmt: skip


def test_the_deadline_is_median_plus_k_mad_within_its_bounds():
    cfg = DiLoCoConfig(workload=SHARDS, inner_steps=10)
    policy = RoundDeadline(cfg)
    assert policy.deadline_s() is None, "nothing observed: no deadline in round 0"
    policy.observe(_record(0, [1.0, 1.2]))  # 0.10 and 0.12 s per step
    # median 0.11, MAD 0.01: generous max(0.11 + 10 * 0.01, 3 * 0.11) * 10 steps = 3.3 s,
    # under the floor of 10 s
    assert policy.deadline_s() == pytest.approx(10.0)
    slow = RoundDeadline(cfg, [_record(0, [10.0, 12.0])])
    assert slow.deadline_s() == pytest.approx(33.0)
    tight = RoundDeadline(
        cfg.model_copy(
            update={"quorum": QuorumConfig(adaptive_deadline=AdaptiveDeadlineConfig(tight=True))}
        ),
        [_record(0, [1.0, 1.2])],
    )
    assert tight.deadline_s() == pytest.approx(1.65)  # max(0.11 + 0.03, 1.5 * 0.11) * 10
    unequal = RoundDeadline(cfg, [_record(r, [1.0, 10.0]) for r in range(3)])
    assert unequal.deadline_s() > 10.0, "a slower worker's spread is in the MAD: not cut"
    fixed = cfg.model_copy(update={"quorum": QuorumConfig(round_deadline_s=2.0)})
    assert RoundDeadline(fixed, [_record(0, [1.0, 1.2])]).deadline_s() == 2.0, "the earlier"
    off = cfg.model_copy(
        update={"quorum": QuorumConfig(adaptive_deadline=AdaptiveDeadlineConfig(enabled=False))}
    )
    assert RoundDeadline(off, [_record(0, [1.0, 1.2])]).deadline_s() is None
    window = RoundDeadline(cfg, [_record(r, [100.0, 100.0]) for r in range(5)])
    for r in range(5):
        window.observe(_record(5 + r, [1.0, 1.2]))
    assert window.deadline_s() == pytest.approx(10.0), "only the last window_rounds rounds"


STEP_S = 0.2


@pytest.fixture
def shards_dataset(fleet_settings):
    name = f"datasets/deadline-{time.time_ns()}"
    write_shards(Path(fleet_settings.shared_root) / name, 12)
    return name


def test_the_tight_adaptive_deadline_drops_the_straggler_and_returns_its_shards(
    fleet, two_workers, shards_dataset
):
    cfg = DiLoCoConfig(
        workload=SHARDS,
        config={  # the sleep outweighs an attempt's fixed costs on a loaded machine
            "step_sleep_s": STEP_S,
            "straggler": {"replica": 1, "factor": 4, "rounds": [2, 4]},
        },
        replicas=2,
        rounds=6,
        inner_steps=8,
        eval_every=0,
        quorum=QuorumConfig(adaptive_deadline=AdaptiveDeadlineConfig(tight=True)),
        dataset=DatasetConfig(
            path=shards_dataset, microshards_per_lease=2, batch_kind="micro_epoch"
        ),
    )
    run = DiLoCoRun.start(fleet, cfg)
    assert run.run().status == "completed"
    records = run.rounds()
    assert records[0].deadline_s is None and all(r.deadline_s for r in records[1:])
    for index in (2, 4):
        status = {o.replica: o.status for o in records[index].replicas if o.attempt == 0}
        assert status == {0: "merged", 1: "aborted"}, (index, records[index].replicas)
        assert records[index].deadline_s < 4 * STEP_S * 8, "cut before the straggler finished"
    dropped = [(m.round, o.lease) for m in records for o in m.replicas if o.status == "aborted"]
    merged = [(m.round, s) for m in records for o in m.merged for s in o.lease.shards]
    for round_index, lease in dropped:
        if round_index < records[-1].round:  # given back: merged in a later round
            for shard in lease.shards:
                assert any(r > round_index and s == shard for r, s in merged), shard
    keys = [(s.epoch, s.microshard_id) for _, s in merged]
    assert len(keys) == len(set(keys)), "no microshard merged twice in an epoch"


def test_a_replica_stuck_in_its_hook_is_aborted_by_the_default_deadline(
    fleet, two_workers, shards_dataset
):
    """Replica 1 sleeps for an hour inside its hook in round 2 (releasing the GIL, and
    heartbeating): with no deadline set, round 2 closes within a few median round times,
    the stuck task is interrupted on its worker, and later rounds merge both replicas."""
    cfg = DiLoCoConfig(
        workload=SHARDS,
        config={"step_sleep_s": 0.02, "stuck": {"replica": 1, "round": 2}},
        replicas=2,
        rounds=6,
        inner_steps=8,
        eval_every=0,
        dataset=DatasetConfig(
            path=shards_dataset, microshards_per_lease=2, batch_kind="micro_epoch"
        ),
    )
    run = DiLoCoRun.start(fleet, cfg)
    thread, outcome = run_in_thread(run)
    thread.join(timeout=300)  # a run that waited for the stuck replica takes an hour
    assert not thread.is_alive(), "the run waited for the stuck replica"
    assert outcome["job"].status == "completed"
    records = run.rounds()
    stuck = records[2]
    assert {o.replica: o.status for o in stuck.replicas if o.attempt == 0} == {
        0: "merged",
        1: "aborted",
    }
    median_round = statistics.median(r.wall_s for r in records[:2])
    assert stuck.deadline_s == 10.0, "the floor: a cold worker's start fits in it"
    # closed at its deadline, plus the cost of an ordinary round or so (generously)
    assert stuck.wall_s < stuck.deadline_s + 5 * median_round
    assert any(len(r.merged) == 2 for r in records[3:]), "the interrupted worker came back"
    logs = [x.line for x in run.jobs.logs(run.job_id)]
    assert any("replica_round failed: TaskAborted" in line for line in logs)
