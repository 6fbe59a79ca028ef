"""fleet's own Prometheus gauges, read from Redis at scrape time.

Flower's metrics come from worker events, so they cannot see tasks still waiting in a
queue (workers prefetch one message). ``fleet exporter`` serves, on ``/metrics``:

- ``fleet_queue_length{queue}``: messages waiting in each worker queue and the pool queue;
- ``fleet_workers{status}``: registered workers, ``alive`` or ``lost``;
- ``fleet_handles{status}``: model handles, ``live`` or ``lost``;
- ``fleet_jobs{kind,status}``: jobs by kind and status (``orphaned``: running without a
  live orchestrator);
- ``fleet_deadletter_messages``: messages workers refused (not JSON, pickle, ...);
- for the last committed round of each running DiLoCo job (label ``job_id``, not ``job``,
  which Prometheus gives the scrape job), the numbers its trackers get
  (:func:`fleet.tracking.round_scalars`):

  ``fleet_diloco_round`` (its index), ``fleet_diloco_round_wall_seconds`` (launch to
  commit), ``..._inner_loop_seconds`` (the slowest merged replica's inner steps),
  ``..._exchange_seconds`` (the slowest merged replica's global model and state load
  and its upload), ``..._outer_step_seconds``, ``..._exchange_bytes`` (every byte the
  round's workers moved to and from the shared root), ``..._deadline_seconds`` (if it
  had one), ``fleet_diloco_round_bytes_per_parameter{direction}`` (the busiest worker's
  ``sent``, ``received`` and ``total`` bytes per model parameter in the round) and
  ``fleet_diloco_round_replicas{status}`` (the round's replica attempts by how they
  ended: ``merged``, ``aborted`` at the deadline or quorum, ``lost``, ``failed``,
  ``dropped``).

  A field a round record lacks leaves its gauge out for that job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, get_args

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError

from fleet.diloco.state import LandedEvaluation, ReplicaStatus, RoundRecord
from fleet.jobs import JobStore
from fleet.registry import Registry
from fleet.settings import FleetSettings
from fleet.tracking import round_scalars

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
        """The gauges of the last committed round of each running DiLoCo job."""
        labels = ["job_id"]
        gauges = {
            name: GaugeMetricFamily(f"fleet_diloco_{name}", text, labels=labels)
            for name, text in (
                ("round", "Last committed round of a running DiLoCo job"),
                ("round_wall_seconds", "The last committed round, launch to commit"),
                (
                    "round_inner_loop_seconds",
                    "The slowest merged replica's inner steps in the last committed round",
                ),
                (
                    "round_exchange_seconds",
                    "The slowest merged replica's pack load and publish in the last committed "
                    "round",
                ),
                ("round_outer_step_seconds", "The last committed round's outer step"),
                (
                    "round_exchange_bytes",
                    "Bytes of the merged replicas' packs in the last committed round",
                ),
                (
                    "round_deadline_seconds",
                    "The last committed round's deadline (fixed or adaptive), if it had one",
                ),
                (
                    "eval_loss",
                    "Eval loss of the newest evaluated global model (evaluations beside "
                    "training land a round or so after their round commits)",
                ),
            )
        }
        per_parameter = GaugeMetricFamily(
            "fleet_diloco_round_bytes_per_parameter",
            "Bytes per model parameter the busiest worker sent, received, or both, to and "
            "from the shared root in the last committed round",
            labels=["job_id", "direction"],
        )
        replicas = GaugeMetricFamily(
            "fleet_diloco_round_replicas",
            "Replica attempts of the last committed round, by how they ended",
            labels=["job_id", "status"],
        )
        for job in running:
            metrics = self.jobs.metrics(job.job_id)
            if not metrics:
                continue
            last = metrics[-1]
            values = round_gauges(last, int(job.spec.get("replicas", 1)))
            for name, value in values.items():
                gauges[name].add_metric([job.job_id], value)
            loss = newest_eval_loss(metrics, self.jobs.evaluations(job.job_id))
            if loss is not None:
                gauges["eval_loss"].add_metric([job.job_id], loss)
            for direction, value in bytes_per_parameter(last).items():
                per_parameter.add_metric([job.job_id, direction], value)
            ended = Counter(str(r.get("status")) for r in last.get("replicas") or [])
            for status in get_args(ReplicaStatus):
                replicas.add_metric([job.job_id, status], ended[status])
        yield from gauges.values()
        yield per_parameter
        yield replicas


def with_landed_json(record: dict[str, Any], landed: dict[int, str]) -> dict[str, Any]:
    """A round record's JSON with the evaluation that landed for it beside later rounds
    (``landed``: :meth:`~fleet.jobs.JobStore.evaluations`), if it has none of its own."""
    found = landed.get(record.get("round", -1)) if record.get("eval") is None else None
    if found is None:
        return record
    evaluation = LandedEvaluation.model_validate_json(found)
    return {**record, "eval": evaluation.evaluation.model_dump(mode="json"),
            "eval_s": evaluation.eval_s}  # fmt: skip


def newest_eval_loss(records: list[dict[str, Any]], landed: dict[int, str]) -> float | None:
    """The eval loss of the newest round record (JSON) that has an evaluation, its own or
    one that landed beside later rounds (``landed``); None if none has."""
    for record in reversed(records):
        evaluation = with_landed_json(record, landed).get("eval")
        loss = _number((evaluation or {}).get("metrics", {}).get("loss"))
        if loss is not None:
            return loss
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def round_gauges(record: dict[str, Any], replicas: int) -> dict[str, float]:
    """``{gauge name without fleet_diloco_: value}`` of one round record (its JSON, as
    the job's metrics list holds it), computed as the trackers' scalars are; a record
    the current :class:`~fleet.diloco.state.RoundRecord` cannot read gives its round
    index only."""
    out: dict[str, float] = {}
    index = _number(record.get("round"))
    if index is not None:
        out["round"] = index
    try:
        scalars = round_scalars(RoundRecord.model_validate(record), replicas)
    except ValidationError:
        return out
    names = {
        "round_wall_seconds": "round/wall_s",
        "round_inner_loop_seconds": "round/inner_loop_s",
        "round_exchange_seconds": "round/exchange_s",
        "round_outer_step_seconds": "round/outer_step_s",
        "round_exchange_bytes": "round/exchange_bytes",
        "round_deadline_seconds": "round/deadline_s",
    }
    out |= {gauge: scalars[scalar] for gauge, scalar in names.items() if scalar in scalars}
    return out


def bytes_per_parameter(record: dict[str, Any]) -> dict[str, float]:
    """``{direction: bytes per parameter}`` of one round record (its JSON), counted by the
    workers' stores where the bytes moved: ``sent``, ``received`` and ``total`` of the
    busiest worker in the round (its ``wire`` entry); left out when the record has no
    parameter count or no ``wire``."""
    count = _number(record.get("parameter_count"))
    wire = record.get("wire")
    if not count or not isinstance(wire, dict) or not wire:
        return {}
    rows = [w for w in wire.values() if isinstance(w, dict)]
    sent = [_number(w.get("sent")) or 0.0 for w in rows]
    received = [_number(w.get("received")) or 0.0 for w in rows]
    return {
        "sent": max(sent) / count,
        "received": max(received) / count,
        "total": max(a + b for a, b in zip(sent, received, strict=True)) / count,
    }
