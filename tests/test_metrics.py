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
