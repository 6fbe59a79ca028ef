"""fleet's own Prometheus gauges, read from Redis at scrape time.

Flower's metrics come from worker events, so they cannot see tasks still waiting in a
queue (workers prefetch one message). ``fleet exporter`` serves, on ``/metrics``:

- ``fleet_queue_length{queue}``: messages waiting in each worker queue and the pool queue;
- ``fleet_workers{status}``: registered workers, ``alive`` or ``lost``;
- ``fleet_handles{status}``: model handles, ``live`` or ``lost``;
- ``fleet_jobs{kind,status}``: jobs by kind and status (``orphaned``: running without a
  live orchestrator);
- ``fleet_deadletter_messages``: messages workers refused (not JSON, pickle, ...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet.jobs import JobStore
from fleet.registry import Registry
from fleet.settings import FleetSettings

#: Most recent jobs counted by ``fleet_jobs``.
JOBS_WINDOW = 500


class FleetCollector(Collector):
    """A Prometheus collector over the fleet registry and the broker queues."""

    def __init__(self, settings: FleetSettings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry.from_settings(settings)
        self.jobs = JobStore(self.registry)

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting per queue (every registered worker's queue and the pool)."""
        queues = {self.settings.pool_queue, *(w.queue for w in self.registry.workers())}
        return {q: self.registry.queue_length(q) for q in sorted(queues)}

    def collect(self) -> Iterator[Any]:
        queue = GaugeMetricFamily(
            "fleet_queue_length", "Messages waiting in a fleet queue", labels=["queue"]
        )
        for name, length in self.queue_lengths().items():
            queue.add_metric([name], length)
        yield queue

        workers = GaugeMetricFamily("fleet_workers", "Registered fleet workers", labels=["status"])
        worker_counts: Counter[str] = Counter(w.status for w in self.registry.workers())
        for status in ("alive", "lost"):
            workers.add_metric([status], worker_counts[status])
        yield workers

        handles = GaugeMetricFamily(
            "fleet_handles", "Model handles in the registry", labels=["status"]
        )
        handle_counts: Counter[str] = Counter(h.status for h in self.registry.handles())
        for status in ("live", "lost"):
            handles.add_metric([status], handle_counts[status])
        yield handles

        recent = self.jobs.list_jobs(limit=JOBS_WINDOW)
        jobs = GaugeMetricFamily("fleet_jobs", "Recent fleet jobs", labels=["kind", "status"])
        for (kind, status), n in Counter((j.kind, j.shown_status) for j in recent).items():
            jobs.add_metric([kind, status], n)
        yield jobs
        yield from self._diloco_rounds(
            [j for j in recent if j.kind == "diloco" and j.status == "running"]
        )

        dead = GaugeMetricFamily(
            "fleet_deadletter_messages", "Messages workers refused (fleet:deadletter)"
        )
        dead.add_metric([], self.registry.dead_letter_count())
        yield dead

    def _diloco_rounds(self, running: list[Any]) -> Iterator[Any]:
        """The last committed round of each running DiLoCo job: its round index, the bytes
        of the replicas' packs its outer step read, and its deadline."""
        index = GaugeMetricFamily(
            "fleet_diloco_round", "Last committed round of a running DiLoCo job", labels=["job"]
        )
        exchange = GaugeMetricFamily(
            "fleet_diloco_round_exchange_bytes",
            "Bytes of the merged replicas' packs in the last committed round",
            labels=["job"],
        )
        deadline = GaugeMetricFamily(
            "fleet_diloco_round_deadline_seconds",
            "The last committed round's deadline (fixed or adaptive), if it had one",
            labels=["job"],
        )
        for job in running:
            metrics = self.jobs.metrics(job.job_id)
            if not metrics:
                continue
            last = metrics[-1]
            index.add_metric([job.job_id], float(last.get("round", 0)))
            exchange.add_metric([job.job_id], float(last.get("exchange_bytes") or 0))
            if last.get("deadline_s") is not None:
                deadline.add_metric([job.job_id], float(last["deadline_s"]))
        yield index
        yield exchange
        yield deadline
