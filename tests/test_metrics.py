"""fleet's Prometheus exporter: queue lengths from the broker, workers, handles, jobs."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest

from fleet.metrics import FleetCollector
from fleet.registry import WorkerInfo


def test_exporter_reports_queue_backlog_workers_handles_and_jobs(
    fleet, fleet_settings, two_workers
):
    ghost = WorkerInfo(
        name="ghost@testnode",
        queue="fleet.testnode.ghost",
        node="testnode",
        pid=1,
        started_at=time.time(),
    )
    fleet.registry.register_worker(ghost)  # a worker that never takes its messages
    handle = fleet.init_model("cpu", worker=two_workers[0].name)
    try:
        for _ in range(3):
            fleet.app.send_task("fleet.hello", kwargs={"params": {}}, queue=ghost.queue)

        registry = CollectorRegistry()
        collector = FleetCollector(fleet_settings, fleet.registry)
        registry.register(collector)
        lengths = collector.queue_lengths()
        assert lengths[ghost.queue] == 3
        assert lengths[two_workers[0].queue] == 0 and "fleet.gpu" in lengths
        text = generate_latest(registry).decode()
        assert 'fleet_queue_length{queue="fleet.testnode.ghost"} 3.0' in text
        alive = next(
            line for line in text.splitlines() if line.startswith('fleet_workers{status="alive"}')
        )
        assert float(alive.split()[-1]) >= 2
        live = next(
            line for line in text.splitlines() if line.startswith('fleet_handles{status="live"}')
        )
        assert float(live.split()[-1]) >= 1
        assert "fleet_jobs" in text
    finally:  # a failure must not leave a ghost worker or its queue for later tests
        fleet.release_model(handle)
        fleet.registry.deregister_worker(ghost.name)
        fleet.registry.redis.delete(ghost.queue)


def test_round_gauges_leave_out_what_a_round_record_lacks(fleet_settings):
    """An older round record (no parameter count, no sent or received bytes) still gives
    its timings; the bytes-per-parameter gauges are left out for it, not an error."""
    from fleet.diloco.state import ReplicaOutcome, RoundRecord
    from fleet.jobs import JobStore
    from fleet.protocol import OuterStepSpec, WeightedPack
    from fleet.storage import PackRef

    jobs = JobStore.from_settings(fleet_settings)
    job = jobs.create("diloco", {"replicas": 1})
    jobs.set_status(job.job_id, "running")
    step = OuterStepSpec(round=3, replicas=[WeightedPack(pack=PackRef(path="p"), weight=1.0)])
    record = RoundRecord(
        round=3, started_at=0.0, closed_at=2.0, wall_s=2.0, outer_step_s=0.1,
        step=step, exchange_bytes=400,
        replicas=[ReplicaOutcome(replica=0, attempt=0, worker="w", status="merged",
                                 started_at=0, finished_at=1, load_s=0.2, publish_s=0.1)],
    )  # fmt: skip
    jobs.add_metrics(job.job_id, record.model_dump(mode="json", exclude_none=True))
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet_settings))
    text = generate_latest(registry).decode()
    mine = [line for line in text.splitlines() if f'job_id="{job.job_id}"' in line]
    jobs.set_status(job.job_id, "cancelled")
    assert f'fleet_diloco_round{{job_id="{job.job_id}"}} 3.0' in mine
    assert f'fleet_diloco_round_wall_seconds{{job_id="{job.job_id}"}} 2.0' in mine
    assert any(line.startswith("fleet_diloco_round_exchange_seconds{") for line in mine)
    assert not [line for line in mine if "bytes_per_parameter" in line or "deadline" in line]
    merged = f'fleet_diloco_round_replicas{{job_id="{job.job_id}",status="merged"}} 1.0'
    assert merged in mine


def test_an_evaluation_that_landed_beside_later_rounds_reaches_the_exporter(fleet_settings):
    """The last committed round was evaluated beside the next round's training: its
    record has no evaluation, the job's landed evaluations have it, the gauge shows it."""
    from fleet.diloco.state import Evaluation, LandedEvaluation, ReplicaOutcome, RoundRecord
    from fleet.jobs import JobStore
    from fleet.protocol import OuterStepSpec, WeightedPack
    from fleet.storage import PackRef

    jobs = JobStore.from_settings(fleet_settings)
    job = jobs.create("diloco", {"replicas": 1})
    jobs.set_status(job.job_id, "running")
    step = OuterStepSpec(round=0, replicas=[WeightedPack(pack=PackRef(path="p"), weight=1.0)])
    record = RoundRecord(
        round=0, started_at=0.0, closed_at=2.0, wall_s=2.0, outer_step_s=0.1, step=step,
        replicas=[ReplicaOutcome(replica=0, attempt=0, worker="w", status="merged",
                                 started_at=0, finished_at=1)],
    )  # fmt: skip
    jobs.add_metrics(job.job_id, record.model_dump(mode="json", exclude_none=True))
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet_settings))

    def eval_gauges() -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if f'job_id="{job.job_id}"' in line
                and line.startswith("fleet_diloco_eval_loss")]  # fmt: skip

    assert eval_gauges() == []
    landed = LandedEvaluation(
        evaluation=Evaluation(at=3.0, worker="spare", metrics={"loss": 1.25}), eval_s=1.0
    )
    jobs.record_evaluation(job.job_id, 0, landed.model_dump_json())
    assert eval_gauges() == [f'fleet_diloco_eval_loss{{job_id="{job.job_id}"}} 1.25']
    jobs.set_status(job.job_id, "cancelled")
