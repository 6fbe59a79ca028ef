"""The Redis registry: which workers are alive, and which worker holds each model handle.

Workers: a record per worker (``keys.worker``) and a liveness key with a TTL
(``keys.worker_alive``) renewed by heartbeats; a worker whose key expired is *lost*.
Handles: a record per global ``model_id`` (``keys.handle``) naming the owner worker and
its queue, the workload, the device, a generation (bumped on every change), the last
published PackRef and created/used timestamps. A handle is *live* while its owner is
alive in the same process (pid) that created it, *lost* otherwise. Multi-key updates
run as Lua scripts shipped in ``fleet/lua`` (DESIGN.md decision 3).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict

from fleet import keys
from fleet.errors import HandleNotFound, OwnerLostError
from fleet.settings import FleetSettings
from fleet.storage import PackRef


def redis_client(settings: FleetSettings) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (password, ACL user and ``rediss://``
    TLS taken from the URL and the TLS settings), decoding responses to str."""
    kwargs: dict[str, Any] = {"decode_responses": True, "health_check_interval": 30}
    kwargs.update(settings.redis_tls() or {})
    return redis.Redis.from_url(settings.redis_url, **kwargs)


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

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> Registry:
        return cls(redis_client(settings), heartbeat_ttl_s=settings.heartbeat_ttl_s)

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

    def heartbeat(self, name: str, pid: int) -> None:
        """Renew a worker's liveness for ``heartbeat_ttl_s`` seconds."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.worker_alive(name), str(pid), px=int(self.heartbeat_ttl_s * 1000))
            pipe.hset(keys.worker(name), "heartbeat_at", str(time.time()))
            pipe.execute()

    def update_worker(self, name: str, **fields: Any) -> None:
        """Set fields of a worker's record (dicts stored as JSON)."""
        mapping = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in fields.items()}
        self.redis.hset(keys.worker(name), mapping=mapping)

    def deregister_worker(self, name: str) -> list[str]:
        """Remove a worker and release every handle it owns; return the released ids."""
        released = self._release_worker(
            keys=[
                keys.worker(name),
                keys.worker_handles(name),
                keys.worker_alive(name),
                keys.HANDLES,
                keys.WORKERS,
                keys.worker_workloads(name),
            ],
            args=[keys.PREFIX, name],
        )
        return list(released or [])

    def _alive_pid(self, name: str) -> int | None:
        value = self.redis.get(keys.worker_alive(name))
        return int(value) if value else None

    def worker(self, name: str) -> WorkerInfo | None:
        """A worker's record (alive or lost), or None if never registered or removed."""
        raw = self.redis.hgetall(keys.worker(name))
        if not raw:
            return None
        alive_pid = self._alive_pid(name)
        return _worker_from_hash(raw, alive=alive_pid is not None and alive_pid == int(raw["pid"]))

    def workers(self, *, include_lost: bool = True) -> list[WorkerInfo]:
        """Every registered worker, sorted by name."""
        out = []
        for name in sorted(self.redis.smembers(keys.WORKERS)):
            info = self.worker(name)
            if info is not None and (include_lost or info.status == "alive"):
                out.append(info)
        return out

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
        raw = self.redis.hgetall(keys.handle(model_id))
        if not raw:
            return None
        alive_pid = self._alive_pid(raw["owner"])
        return _handle_from_hash(
            raw, live=alive_pid is not None and alive_pid == int(raw["owner_pid"])
        )

    def live_handle(self, model_id: str) -> HandleRecord:
        """A handle that can be called now.

        Raises:
            HandleNotFound: no such handle in the registry.
            OwnerLostError: its owner is lost; names the last pack to restore from.
        """
        record = self.handle(model_id)
        if record is None:
            raise HandleNotFound(model_id)
        if record.status == "lost":
            last = record.last_pack.model_dump() if record.last_pack else None
            raise OwnerLostError(model_id, record.owner, last)
        return record

    def handles(self, *, owner: str | None = None) -> list[HandleRecord]:
        """Every handle (or those of ``owner``), sorted by model_id."""
        ids = self.redis.smembers(keys.worker_handles(owner) if owner else keys.HANDLES)
        out = [self.handle(i) for i in sorted(ids)]
        return [r for r in out if r is not None]

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
        owner = self._release_handle(
            keys=[keys.handle(model_id), keys.HANDLES], args=[model_id, keys.PREFIX]
        )
        return str(owner) if owner else None

    # ------------------------------------------------------------------ abort flags

    def request_abort(self, task_id: str, ttl_s: float = 24 * 3600) -> None:
        """Ask the task ``task_id`` to stop at its next step boundary."""
        self.redis.set(keys.abort(task_id), "1", px=int(ttl_s * 1000))

    def abort_requested(self, task_id: str) -> bool:
        """True if someone asked ``task_id`` to abort."""
        return bool(self.redis.exists(keys.abort(task_id)))


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
