"""The state of one worker process: identity, model store, workloads, registry.

One :class:`WorkerRuntime` per worker process (the Celery pool child that runs the
tasks). It holds every model handle's state in memory, builds workloads through the
allowlisted cache, keeps the registry current (heartbeats from a daemon thread) and
resolves shared-root paths. Protocol methods (``fleet.tasks``) are plain functions of
a runtime and a request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fleet.connection import redis_client
from fleet.errors import FleetError, HandleNotFound, NoWorkloadError
from fleet.protocol import WorkloadRef
from fleet.registry import HandleRecord, Registry, WorkerInfo
from fleet.settings import FleetSettings
from fleet.storage import LocalStore, Store, open_store
from fleet.workload import Workload, WorkloadCache

log = logging.getLogger("fleet.runtime")


#: Seconds shutdown paths keep retrying Redis (the fleet may be stopping with it).
SHUTDOWN_REDIS_RETRY_S = 2.0


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this worker is: Celery node ``name``, its own ``queue``, GPU index (None on
    CPU), and the default workload it was started with (if any)."""

    name: str
    queue: str
    gpu_index: int | None = None
    default_workload: str | None = None
    default_config: dict[str, Any] | None = None


@dataclass
class HeldModel:
    """A model handle's state in this process."""

    state: Any
    workload: Workload
    device: str
    loaded: tuple[str, str] | None = None
    """``(values digest, filter)`` of the pack last loaded into ``state`` when nothing
    changed it since, so the same pack is not loaded twice (None: unknown)."""
    state_key: tuple[str, int, int, int] | None = None
    """``(run, replica, round, attempt)`` of the DiLoCo replica state the held state's
    inner optimizer holds, when nothing changed it since that attempt finished (so the
    next round need not load it from disk; :mod:`fleet.diloco.replica`)."""


def new_model_id() -> str:
    """A fresh global model id: ``"m-"`` + 32 hex digits."""
    return "m-" + uuid.uuid4().hex


class WorkerRuntime:
    """Everything one worker process needs to serve protocol methods."""

    def __init__(
        self, settings: FleetSettings, identity: WorkerIdentity, registry: Registry
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.registry = registry
        #: The same registry without retries, for checks that must never wait (abort).
        self.quick_registry = Registry(
            redis_client(settings, retry_s=0), heartbeat_ttl_s=settings.heartbeat_ttl_s
        )
        self.shared: Store = open_store(settings)
        self.workloads = WorkloadCache(settings.workload_allowlist)
        self.models: dict[str, HeldModel] = {}
        self._noted_workloads: set[str] = set()
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.device_name = "cpu"
        self.started_at = time.time()

    # ------------------------------------------------------------------ lifecycle

    def start(self, device_name: str = "cpu") -> None:
        """Register this worker and start heartbeating."""
        if isinstance(self.shared, LocalStore):
            self.shared.root.mkdir(parents=True, exist_ok=True)
        self.device_name = device_name
        self.started_at = time.time()
        self._register()
        self._heartbeat = threading.Thread(target=self._beat, name="fleet-heartbeat", daemon=True)
        self._heartbeat.start()

    def _register(self) -> None:
        """Write this worker's record and the records of the models it holds (again, after
        Redis lost them)."""
        self.registry.register_worker(
            WorkerInfo(
                name=self.identity.name,
                queue=self.identity.queue,
                node=self.settings.node,
                gpu_index=self.identity.gpu_index,
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                device_name=self.device_name,
                default_workload=self.identity.default_workload,
                pid=self.pid,
                started_at=self.started_at,
                heartbeat_at=time.time(),
            )
        )
        for model_id, held in self.models.items():
            if self.registry.handle(model_id) is None:
                self._create_record(model_id, held)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                if not self.registry.heartbeat(self.identity.name, self.pid):
                    log.warning(
                        "registry record of %s is gone; registering again", self.identity.name
                    )
                    self._register()
            except FleetError:  # Redis away: the client logs the outage once; beat again
                continue

    def stop(self) -> list[str]:
        """Stop heartbeating, drop every model and deregister; return released ids (none
        if Redis cannot be reached within a few seconds: the records turn "lost")."""
        self._stop.set()
        self.models.clear()
        registry = Registry.from_settings(self.settings, retry_s=SHUTDOWN_REDIS_RETRY_S)
        try:
            return registry.deregister_worker(self.identity.name)
        except FleetError as exc:
            log.warning("could not deregister %s: %s", self.identity.name, exc)
            return []
        finally:
            registry.redis.close()

    # ------------------------------------------------------------------ workloads

    def workload(self, ref: WorkloadRef | None) -> Workload:
        """The workload named by ``ref``, or this worker's default.

        Raises:
            NoWorkloadError: no ref and no default.
            WorkloadError: see :meth:`fleet.workload.WorkloadCache.get`.
        """
        if ref is None:
            if self.identity.default_workload is None:
                raise NoWorkloadError()
            spec, config = self.identity.default_workload, self.identity.default_config or {}
        else:
            spec, config = ref.spec, ref.config
        workload = self.workloads.get(spec, config)
        if spec not in self._noted_workloads:
            self.registry.add_worker_workload(self.identity.name, spec)
            self._noted_workloads.add(spec)
        return workload

    # ------------------------------------------------------------------ model store

    def held(self, model_id: str, *, tracks_loaded: bool = False) -> HeldModel:
        """The state behind ``model_id`` in this process. By default the model forgets
        which pack it last held (:attr:`HeldModel.loaded`, ``state_key``), since the
        caller may change its state; ``tracks_loaded`` is for a caller that keeps both
        right itself (it loads packs through ``load_pack_into_held``, or resets them
        before it trains).

        Raises:
            HandleNotFound: not held here; carries the registry record if any.
        """
        held = self.models.get(model_id)
        if held is None:
            record = self.registry.handle(model_id)
            raise HandleNotFound(
                model_id,
                worker=self.identity.name,
                record=record.model_dump(mode="json") if record else None,
            )
        if not tracks_loaded:
            held.loaded = held.state_key = None
        return held

    def add_model(self, state: Any, workload: Workload, device: str) -> str:
        """Hold ``state`` under a new global model id and register the handle."""
        model_id = new_model_id()
        self.models[model_id] = held = HeldModel(state, workload, device)
        self._create_record(model_id, held)
        return model_id

    def _create_record(self, model_id: str, held: HeldModel) -> None:
        now = time.time()
        self.registry.create_handle(
            HandleRecord(
                model_id=model_id,
                owner=self.identity.name,
                queue=self.identity.queue,
                owner_pid=self.pid,
                workload=held.workload.spec,
                config=held.workload.config,
                device=held.device,
                generation=0,
                created_at=now,
                used_at=now,
            )
        )

    def replace_state(self, model_id: str, state: Any) -> None:
        """Swap the state behind a held handle and bump its generation."""
        self.held(model_id).state = state
        self.registry.touch(model_id, bump_generation=True)

    def release(self, model_id: str) -> None:
        """Drop a held model and its registry record.

        Raises:
            HandleNotFound: not held here.
        """
        self.held(model_id)
        del self.models[model_id]
        self.registry.release_handle(model_id)
