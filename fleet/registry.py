"""The Redis registry: which workers are alive, and which worker holds each model handle.

Workers: a record per worker (``keys.worker``) and a liveness key with a TTL
(``keys.worker_alive``) renewed by heartbeats; a worker whose key expired is *lost*.
Handles: a record per global ``model_id`` (``keys.handle``) naming the owner worker and
its queue, the workload, the device, a generation (bumped on every change), the last
published PackRef and created/used timestamps. A handle is *live* while its owner is
alive in the same process (pid) that created it, *lost* otherwise. Multi-key updates
run as Lua scripts shipped in ``fleet/lua`` (docs/design.md decision 3).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from importlib import resources
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict

from fleet import keys
from fleet.connection import BACKOFF_CAP_S, redis_client, seconds_since_outage
from fleet.errors import HandleNotFound, OwnerLostError, WorkerSlotTakenError
from fleet.settings import FleetSettings
from fleet.storage import PackRef

#: CPU slots a node may run (``fleet-cpu0`` ... ``fleet-cpu255``).
MAX_CPU_SLOTS = 256


class WorkerInfo(BaseModel):
    """A worker as the registry knows it. ``status`` is ``"alive"`` while it heartbeats."""

    model_config = ConfigDict(frozen=True)

    name: str
    queue: str
    node: str
    gpu_index: int | None = None
    cuda_visible_devices: str | None = None
    device_name: str = "cpu"
    capability: dict[str, Any] | None = None
    default_workload: str | None = None
    pid: int
    started_at: float
    heartbeat_at: float | None = None
    status: Literal["alive", "lost"] = "alive"


class HandleRecord(BaseModel):
    """A model handle as the registry knows it. ``status`` is ``"live"`` or ``"lost"``."""

    model_config = ConfigDict(frozen=True)

    model_id: str
    owner: str
    queue: str
    owner_pid: int
    workload: str
    config: dict[str, Any]
    device: str
    generation: int
    last_pack: PackRef | None = None
    created_at: float
    used_at: float
    status: Literal["live", "lost"] = "live"


def _load_script(name: str) -> str:
    return resources.files("fleet.lua").joinpath(name).read_text(encoding="utf-8")


class Registry:
    """Typed access to the worker and handle registry in Redis."""

    def __init__(self, client: redis.Redis, *, heartbeat_ttl_s: float = 10.0) -> None:
        # Any: redis-py's stubs type replies as bytes | str even with decode_responses=True.
        self.redis: Any = client
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._release_handle = client.register_script(_load_script("release_handle.lua"))
        self._release_worker = client.register_script(_load_script("release_worker.lua"))
        self._publish_pack = client.register_script(_load_script("publish_pack.lua"))
        self._touch_handle = client.register_script(_load_script("touch_handle.lua"))
        self._heartbeat = client.register_script(_load_script("heartbeat.lua"))
        self._claim_name = client.register_script(_load_script("claim_name.lua"))

    @classmethod
    def from_settings(cls, settings: FleetSettings, *, retry_s: float | None = None) -> Registry:
        """A registry on a new client for ``settings``; ``retry_s`` overrides how long its
        commands retry through a Redis outage (short on shutdown paths)."""
        client = redis_client(settings, retry_s=retry_s)
        return cls(client, heartbeat_ttl_s=settings.heartbeat_ttl_s)

    # ------------------------------------------------------------------ workers

    def register_worker(self, info: WorkerInfo) -> None:
        """Record a worker and mark it alive (replaces a previous record of that name)."""
        data = info.model_dump(exclude={"status"}, exclude_none=True)
        fields = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in data.items()}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.worker(info.name))
            pipe.hset(keys.worker(info.name), mapping=fields)
            pipe.sadd(keys.WORKERS, info.name)
            pipe.set(
                keys.worker_alive(info.name), str(info.pid), px=int(self.heartbeat_ttl_s * 1000)
            )
            pipe.execute()

    def heartbeat(self, name: str, pid: int) -> bool:
        """Renew a worker's liveness for ``heartbeat_ttl_s`` seconds. False if its record
        is gone (Redis lost it): the worker must :meth:`register_worker` again."""
        found = self._heartbeat(
            keys=[keys.worker(name), keys.worker_alive(name)],
            args=[str(pid), int(self.heartbeat_ttl_s * 1000), str(time.time())],
        )
        return bool(found)

    @property
    def liveness_grace_s(self) -> float:
        """How long after a Redis outage a missing liveness key is not taken for a dead
        worker: a heartbeat TTL, plus the longest pause of the clients' reconnect backoff."""
        return self.heartbeat_ttl_s + BACKOFF_CAP_S

    def in_outage_grace(self) -> bool:
        """True within :attr:`liveness_grace_s` after Redis came back (or restarted)."""
        return seconds_since_outage(self.redis) < self.liveness_grace_s

    def update_worker(self, name: str, **fields: Any) -> None:
        """Set fields of a worker's record (dicts stored as JSON)."""
        mapping = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in fields.items()}
        self.redis.hset(keys.worker(name), mapping=mapping)

    def deregister_worker(self, name: str) -> list[str]:
        """Remove a worker and release every handle it owns; return the released ids."""
        while True:
            ids = sorted(self.redis.smembers(keys.worker_handles(name)))
            released = self._release_worker(
                keys=[
                    keys.worker(name),
                    keys.worker_handles(name),
                    keys.worker_alive(name),
                    keys.HANDLES,
                    keys.WORKERS,
                    keys.worker_workloads(name),
                    *(keys.handle(i) for i in ids),
                ],
                args=[name, *ids],
            )
            if released != -1:
                return list(released or [])

    def worker(self, name: str) -> WorkerInfo | None:
        """A worker's record (alive or lost), or None if never registered or removed."""
        return next(iter(self._workers([name])), None)

    def workers(self, *, include_lost: bool = True) -> list[WorkerInfo]:
        """Every registered worker, sorted by name (two round trips, whatever their number)."""
        infos = self._workers(sorted(self.redis.smembers(keys.WORKERS)))
        return [i for i in infos if include_lost or i.status == "alive"]

    def _workers(self, names: list[str]) -> list[WorkerInfo]:
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.worker(name))
                pipe.get(keys.worker_alive(name))
            replies = pipe.execute()
        out = []
        for raw, alive_pid in zip(replies[::2], replies[1::2], strict=True):
            if raw:
                alive = alive_pid is not None and int(alive_pid) == int(raw["pid"])
                out.append(_worker_from_hash(raw, alive=alive))
        return out

    # ------------------------------------------------------------------ worker names

    def claim_worker_name(self, name: str, *, pid: int, host: str, ttl_s: float) -> None:
        """Claim the worker name ``name`` for the process ``pid`` on ``host`` for ``ttl_s``
        seconds (renew with :meth:`renew_worker_name`). A claim left by a dead process
        on this same host is taken over.

        Raises:
            WorkerSlotTakenError: a live process holds the name.
        """
        claim = json.dumps({"pid": pid, "host": host, "claimed_at": time.time()})
        ttl_ms = int(ttl_s * 1000)
        current = self._claim_name(
            keys=[keys.worker_claim(name)], args=["claim", claim, ttl_ms, "", str(pid)]
        )
        while current:
            holder = json.loads(current)
            if holder["host"] != host or _pid_alive(int(holder["pid"])):
                age = time.time() - float(holder.get("renewed_at", holder["claimed_at"]))
                raise WorkerSlotTakenError(name, int(holder["pid"]), holder["host"], age)
            current = self._claim_name(
                keys=[keys.worker_claim(name)], args=["take", claim, ttl_ms, current, str(pid)]
            )

    def claim_free_cpu_slot(self, node: str, *, pid: int, host: str, ttl_s: float) -> int:
        """Claim the lowest free CPU slot ``fleet-cpu<N>@<node>``; return N.

        Raises:
            WorkerSlotTakenError: all :data:`MAX_CPU_SLOTS` slots are held.
        """
        for slot in range(MAX_CPU_SLOTS):
            try:
                self.claim_worker_name(f"fleet-cpu{slot}@{node}", pid=pid, host=host, ttl_s=ttl_s)
                return slot
            except WorkerSlotTakenError as exc:
                last = exc
        raise last

    def renew_worker_name(self, name: str, *, pid: int, host: str, ttl_s: float) -> bool:
        """Extend ``pid``'s claim on ``name``; False if it no longer holds it."""
        claim = json.dumps(
            {"pid": pid, "host": host, "claimed_at": time.time(), "renewed_at": time.time()}
        )
        renewed = self._claim_name(
            keys=[keys.worker_claim(name)],
            args=["renew", claim, int(ttl_s * 1000), "", str(pid)],
        )
        return bool(renewed)

    def release_worker_name(self, name: str, *, pid: int) -> None:
        """Drop ``pid``'s claim on ``name`` (a claim held by another process stays)."""
        self._claim_name(keys=[keys.worker_claim(name)], args=["release", "{}", 0, "", str(pid)])

    def add_worker_workload(self, name: str, spec: str) -> None:
        """Note that worker ``name`` has built workload ``spec``."""
        self.redis.sadd(keys.worker_workloads(name), spec)

    def worker_workloads(self, name: str) -> set[str]:
        """Workload specs worker ``name`` has built."""
        return set(self.redis.smembers(keys.worker_workloads(name)))

    # ------------------------------------------------------------------ handles

    def create_handle(self, record: HandleRecord) -> None:
        """Register a new handle, atomically indexed under its owner."""
        data = record.model_dump(exclude={"status", "last_pack"})
        fields = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in data.items()}
        if record.last_pack is not None:
            fields["last_pack"] = record.last_pack.model_dump_json()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.handle(record.model_id), mapping=fields)
            pipe.sadd(keys.HANDLES, record.model_id)
            pipe.sadd(keys.worker_handles(record.owner), record.model_id)
            pipe.execute()

    def handle(self, model_id: str) -> HandleRecord | None:
        """A handle's record with its live/lost status, or None if unknown."""
        return next(iter(self._handles([model_id])), None)

    def _handles(self, ids: Iterable[str]) -> list[HandleRecord]:
        with self.redis.pipeline(transaction=False) as pipe:
            for model_id in ids:
                pipe.hgetall(keys.handle(model_id))
            raws = [r for r in pipe.execute() if r]
        with self.redis.pipeline(transaction=False) as pipe:
            for raw in raws:
                pipe.get(keys.worker_alive(raw["owner"]))
            alive = pipe.execute()
        return [
            _handle_from_hash(raw, live=pid is not None and int(pid) == int(raw["owner_pid"]))
            for raw, pid in zip(raws, alive, strict=True)
        ]

    def live_handle(self, model_id: str) -> HandleRecord:
        """A handle that can be called now.

        Raises:
            HandleNotFound: no such handle in the registry.
            OwnerLostError: its owner is lost; names the last pack to restore from.
        """
        record = self.handle(model_id)
        if record is None:
            raise HandleNotFound(model_id)
        while record.status == "lost" and self.in_outage_grace():
            time.sleep(0.2)  # Redis was just away: give the owner time to heartbeat again
            record = self.handle(model_id)
            if record is None:
                raise HandleNotFound(model_id)
        if record.status == "lost":
            last = record.last_pack.model_dump() if record.last_pack else None
            raise OwnerLostError(model_id, record.owner, last)
        return record

    def handles(self, *, owner: str | None = None) -> list[HandleRecord]:
        """Every handle (or those of ``owner``), sorted by model_id (three round trips)."""
        ids = self.redis.smembers(keys.worker_handles(owner) if owner else keys.HANDLES)
        return self._handles(sorted(ids))

    def handle_counts(self) -> dict[str, int]:
        """Number of handles per worker name (one round trip per worker)."""
        names = sorted(self.redis.smembers(keys.WORKERS))
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.scard(keys.worker_handles(name))
            return dict(zip(names, pipe.execute(), strict=True))

    def touch(self, model_id: str, *, bump_generation: bool = False) -> int | None:
        """Update ``used_at`` (and bump the generation); the generation, or None if gone."""
        result = self._touch_handle(
            keys=[keys.handle(model_id)], args=[str(time.time()), "1" if bump_generation else "0"]
        )
        return None if result is None else int(result)

    def publish_pack(self, model_id: str, pack: PackRef) -> int | None:
        """Record ``pack`` as the handle's last published pack; its generation, or None if gone."""
        result = self._publish_pack(
            keys=[keys.handle(model_id)], args=[pack.model_dump_json(), str(time.time())]
        )
        return None if result is None else int(result)

    def release_handle(self, model_id: str) -> str | None:
        """Remove a handle; the owner's name, or None if it did not exist."""
        while True:
            owner = self.redis.hget(keys.handle(model_id), "owner")
            if owner is None:
                return None
            released = self._release_handle(
                keys=[keys.handle(model_id), keys.HANDLES, keys.worker_handles(owner)],
                args=[model_id, owner],
            )
            if released != "":
                return str(released) if released else None

    # ------------------------------------------------------------------ abort flags

    def request_abort(self, *task_ids: str, ttl_s: float = 24 * 3600) -> None:
        """Ask each task to stop at its next step boundary. The flag outlives the broker's
        visibility timeout, so a message redelivered later stops at once too. The only
        writer of abort flags."""
        if not task_ids:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.set(keys.abort(task_id), "1", px=int(ttl_s * 1000))
            pipe.execute()

    def abort_requested(self, task_id: str) -> bool:
        """True if someone asked ``task_id`` to abort."""
        return bool(self.redis.exists(keys.abort(task_id)))

    def dead_letters(self, n: int = 20) -> list[dict[str, Any]]:
        """The newest ``n`` messages workers refused (fleet.broker), newest first."""
        return [json.loads(e) for e in self.redis.lrange(keys.DEADLETTER, 0, n - 1)]

    def dead_letter_count(self) -> int:
        """How many refused messages ``fleet:deadletter`` holds."""
        return int(self.redis.llen(keys.DEADLETTER))

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a broker queue (kombu keeps a queue as a Redis list)."""
        return int(self.redis.llen(queue))


def _worker_from_hash(raw: dict[str, str], *, alive: bool) -> WorkerInfo:
    return WorkerInfo(
        name=raw["name"],
        queue=raw["queue"],
        node=raw["node"],
        gpu_index=int(raw["gpu_index"]) if raw.get("gpu_index") not in (None, "None") else None,
        cuda_visible_devices=raw.get("cuda_visible_devices"),
        device_name=raw.get("device_name", "cpu"),
        capability=json.loads(raw["capability"]) if raw.get("capability") else None,
        default_workload=raw.get("default_workload") or None,
        pid=int(raw["pid"]),
        started_at=float(raw["started_at"]),
        heartbeat_at=float(raw["heartbeat_at"]) if raw.get("heartbeat_at") else None,
        status="alive" if alive else "lost",
    )


def _handle_from_hash(raw: dict[str, str], *, live: bool) -> HandleRecord:
    return HandleRecord(
        model_id=raw["model_id"],
        owner=raw["owner"],
        queue=raw["queue"],
        owner_pid=int(raw["owner_pid"]),
        workload=raw["workload"],
        config=json.loads(raw.get("config") or "{}"),
        device=raw["device"],
        generation=int(raw["generation"]),
        last_pack=PackRef.model_validate_json(raw["last_pack"]) if raw.get("last_pack") else None,
        created_at=float(raw["created_at"]),
        used_at=float(raw["used_at"]),
        status="live" if live else "lost",
    )


def _pid_alive(pid: int) -> bool:
    """True if a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
