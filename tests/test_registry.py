"""The registry against a real Redis: workers, heartbeats, handles, atomic releases."""

from __future__ import annotations

import time

import pytest

from fleet import keys
from fleet.errors import HandleNotFound, OwnerLostError
from fleet.registry import HandleRecord, Registry, WorkerInfo
from fleet.storage import PackRef
from tests.harness import settings_for, wait_until


@pytest.fixture
def registry(redis_server, tmp_path):
    # a 2 s TTL: short enough to watch a worker expire, long enough that a loaded
    # machine's pause between registering and the next call does not expire it first
    reg = Registry.from_settings(settings_for(redis_server.url, tmp_path, heartbeat_ttl_s=2.0))
    yield reg
    # the session's Redis is every test's: no made-up worker outlives its test (a DiLoCo
    # run would otherwise see it, and send it an evaluation nobody takes up)
    for name in reg.redis.smembers(keys.WORKERS):
        if name.startswith("reg-w"):
            reg.deregister_worker(name)
    reg.redis.close()


def _worker(name: str, pid: int = 100) -> WorkerInfo:
    return WorkerInfo(name=name, queue=f"q.{name}", node="n", pid=pid, started_at=time.time())


def _handle(model_id: str, owner: str, pid: int = 100) -> HandleRecord:
    now = time.time()
    return HandleRecord(
        model_id=model_id,
        owner=owner,
        queue=f"q.{owner}",
        owner_pid=pid,
        workload="m:f",
        config={"a": 1},
        device="cpu",
        generation=0,
        created_at=now,
        used_at=now,
    )


def test_worker_heartbeat_and_expiry(registry):
    registry.register_worker(_worker("reg-w1"))
    assert registry.worker("reg-w1").status == "alive"
    registry.heartbeat("reg-w1", 100)
    assert registry.worker("reg-w1").heartbeat_at is not None
    # no heartbeat within heartbeat_ttl_s (2 s): lost
    wait_until(lambda: registry.worker("reg-w1").status == "lost", 30, "reg-w1 lost")
    registry.heartbeat("reg-w1", 100)
    assert registry.worker("reg-w1").status == "alive"


def test_handles_lifecycle_and_generation(registry):
    registry.register_worker(_worker("reg-w2"))
    registry.create_handle(_handle("m-reg-1", "reg-w2"))
    record = registry.live_handle("m-reg-1")
    assert record.owner == "reg-w2" and record.config == {"a": 1} and record.generation == 0
    assert registry.touch("m-reg-1", bump_generation=True) == 1
    pack = PackRef(path="packs/x", layout_hash="torch-layout-x", values_digest="xxh3_64:00")
    assert registry.publish_pack("m-reg-1", pack) == 1
    assert registry.handle("m-reg-1").last_pack == pack
    assert [h.model_id for h in registry.handles(owner="reg-w2")] == ["m-reg-1"]
    assert registry.release_handle("m-reg-1") == "reg-w2"
    assert registry.handle("m-reg-1") is None
    assert registry.release_handle("m-reg-1") is None
    assert registry.touch("m-reg-1") is None and registry.publish_pack("m-reg-1", pack) is None
    assert not registry.redis.sismember(keys.worker_handles("reg-w2"), "m-reg-1")
    with pytest.raises(HandleNotFound):
        registry.live_handle("m-reg-1")


def test_a_restarted_worker_does_not_own_old_handles(registry):
    registry.register_worker(_worker("reg-w3", pid=1))
    registry.create_handle(_handle("m-reg-3", "reg-w3", pid=1))
    registry.register_worker(_worker("reg-w3", pid=2))  # same name, new process
    with pytest.raises(OwnerLostError):
        registry.live_handle("m-reg-3")


def test_deregister_releases_every_handle_atomically(registry):
    registry.register_worker(_worker("reg-w4"))
    for i in range(5):
        registry.create_handle(_handle(f"m-reg-4-{i}", "reg-w4"))
    released = registry.deregister_worker("reg-w4")
    assert sorted(released) == [f"m-reg-4-{i}" for i in range(5)]
    assert registry.worker("reg-w4") is None
    assert all(registry.handle(f"m-reg-4-{i}") is None for i in range(5))
    assert not registry.redis.exists(keys.worker_handles("reg-w4"), keys.worker_alive("reg-w4"))


def test_abort_flags(registry):
    assert not registry.abort_requested("t-1")
    registry.request_abort("t-1")
    assert registry.abort_requested("t-1")
