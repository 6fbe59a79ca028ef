"""A message a worker cannot run never stops it: it is dead-lettered with the reason, its
caller (if any) gets a typed error at once, and the worker keeps serving."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import CollectorRegistry

from fleet.errors import RejectedMessageError, RemoteTaskError
from fleet.metrics import FleetCollector
from tests.harness import wait_until


@pytest.mark.parametrize("where", ["own queue", "pool queue"])
@pytest.mark.parametrize(
    "raw", [b"definitely not json", b'{"hello": "a JSON object that is no message"}', b"[1, 2"]
)
def test_a_raw_item_that_is_no_message_is_dead_lettered(fleet, two_workers, where, raw):
    worker = two_workers[0]
    queue = worker.queue if where == "own queue" else fleet.settings.pool_queue
    before = fleet.registry.dead_letter_count()
    fleet.registry.redis.lpush(queue, raw)
    wait_until(lambda: fleet.registry.dead_letter_count() > before, 20, "the item dead-lettered")
    assert fleet.registry.dead_letter_count() == before + 1
    [entry] = fleet.registry.dead_letters(1)
    assert entry["queue"] == queue and "not a message envelope" in entry["reason"]
    assert entry["raw"] == raw.decode()
    for w in two_workers:  # both workers still serve (the pool item went to one of them)
        assert fleet.hello(worker=w.name, timeout_s=10).worker == w.name
    assert worker.proc.poll() is None


@pytest.mark.parametrize("serializer", ["pickle", "yaml"])
@pytest.mark.parametrize("where", ["own queue", "pool queue"])
def test_a_refused_content_type_fails_its_caller_at_once(fleet, two_workers, serializer, where):
    worker = two_workers[1]
    queue = worker.queue if where == "own queue" else fleet.settings.pool_queue
    before = fleet.registry.dead_letter_count()
    result = fleet.app.send_task(
        "fleet.hello", kwargs={"params": {}}, queue=queue, serializer=serializer
    )
    # failed at once, not after the call timeout (this get raises TimeoutError long before)
    assert fleet.settings.call_timeout_s > 20
    result.get(timeout=20, propagate=False)
    assert result.state == "FAILURE"
    error = fleet.remote_error_of("hello", result)
    assert isinstance(error, RejectedMessageError) and isinstance(error, RemoteTaskError)
    assert error.task_id == result.id and "ContentDisallowed" in error.reason
    assert error.content_type.startswith("application/x-") and error.queue == queue
    assert fleet.registry.dead_letter_count() == before + 1
    [entry] = fleet.registry.dead_letters(1)
    assert entry["task_id"] == result.id and entry["content_type"] == error.content_type
    assert fleet.hello(worker=worker.name, timeout_s=10).worker == worker.name


def test_the_exporter_counts_dead_letters(fleet_settings, fleet, two_workers):
    """The gauge counts what was dead-lettered: one more once this test's junk (not any
    earlier test's) has been refused."""
    collector = FleetCollector(fleet_settings)
    registry = CollectorRegistry()
    registry.register(collector)

    def gauge() -> float:
        value = registry.get_sample_value("fleet_deadletter_messages")
        assert value is not None, "the exporter has no fleet_deadletter_messages"
        return value

    before = gauge()
    junk = f"\x00\x01 binary junk {uuid.uuid4().hex}"
    fleet.registry.redis.lpush(two_workers[0].queue, junk.encode())
    wait_until(
        lambda: any(e["raw"] == junk for e in fleet.registry.dead_letters(10)),
        20,
        "this test's junk dead-lettered",
    )
    assert gauge() == before + 1
