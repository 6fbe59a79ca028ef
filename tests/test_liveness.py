"""Which workers a DiLoCo round counts on (fleet/diloco/liveness.py), against a real Redis:
a worker whose liveness key is gone is lost, except in the grace after the orchestrator
itself was held up by Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fleet import keys
from fleet.client import Fleet
from fleet.diloco.liveness import STALL_S, Liveness
from fleet.registry import WorkerInfo
from tests.harness import settings_for, wait_until

#: A Redis database of this module's own (its made-up worker is nobody else's).
DB = 11
WORKER = "liveness-w1"
GRACE_S = 1.5


@pytest.fixture
def fleet_without_heartbeat(redis_server, tmp_path) -> Iterator[Fleet]:
    """A client whose registry holds WORKER, with its liveness key gone (as if it expired
    while Redis was out of reach), Redis up for longer than the registry's own grace."""
    url = f"{redis_server.url.rsplit('/', 1)[0]}/{DB}"
    fleet = Fleet(settings_for(url, tmp_path))
    info = WorkerInfo(name=WORKER, queue=f"q.{WORKER}", node="n", pid=1, started_at=time.time())
    fleet.registry.register_worker(info)
    fleet.registry.redis.delete(keys.worker_alive(WORKER))
    wait_until(lambda: not fleet.registry.in_outage_grace(), 30, "Redis up past the grace")
    try:
        yield fleet
    finally:
        fleet.registry.deregister_worker(WORKER)
        fleet.close()


def test_a_stall_between_the_tick_and_the_question_gives_the_worker_its_grace(
    fleet_without_heartbeat: Fleet,
) -> None:
    """A poll loop ticks its liveness, then makes a call that waits out an outage that
    fleet's own clients never see (Celery's result backend, in ``future.ready()``), then
    asks about a worker whose key is gone. Its heartbeat may not have reached Redis again
    yet: the worker is not lost until the grace has passed. Asked right after a tick, it
    is lost at once."""
    liveness = Liveness(fleet_without_heartbeat, GRACE_S)
    liveness.tick()
    assert liveness.lost(WORKER)
    liveness.tick()
    time.sleep(STALL_S * 1.5)  # the held-up call itself: the scenario, not a synchronisation
    held_at = time.monotonic()
    assert not liveness.lost(WORKER)
    wait_until(lambda: liveness.lost(WORKER), 30, "the worker lost once the grace passed")
    assert time.monotonic() - held_at >= GRACE_S


def test_a_liveness_never_ticked_takes_no_pause_for_a_stall(
    fleet_without_heartbeat: Fleet,
) -> None:
    """A liveness asked now and then (at each commit, about the evaluations beside
    training) is not a poll loop's: the time between two questions is no stall."""
    liveness = Liveness(fleet_without_heartbeat, GRACE_S)
    assert liveness.lost(WORKER)
    time.sleep(STALL_S * 1.5)  # a round between two commits, shortened
    assert liveness.lost(WORKER)


def test_a_worker_seen_alive_is_lost_to_a_poll_loop_only_once_its_absence_is_confirmed(
    fleet_without_heartbeat: Fleet,
) -> None:
    """Workers cut off together stop their heartbeats at once, but their keys expire up
    to a heartbeat interval apart. A poll loop that saw a worker alive takes it for lost
    only once its key has stayed missing for ``confirm_s``, by when the others' keys are
    gone too."""
    fleet = fleet_without_heartbeat
    fleet.registry.heartbeat(WORKER, 1)
    liveness = Liveness(fleet, GRACE_S)
    liveness.tick()
    assert not liveness.lost(WORKER)
    fleet.registry.redis.delete(keys.worker_alive(WORKER))
    gone_at = time.monotonic()
    wait_until(lambda: liveness.lost(WORKER), 30, "the worker lost once confirmed")
    assert time.monotonic() - gone_at >= liveness.confirm_s
