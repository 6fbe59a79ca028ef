"""Worker bootstrap: one Celery worker per GPU (docs/design.md decision 1).

``fleet worker --gpu N`` sets ``CUDA_VISIBLE_DEVICES=N`` before torch is imported, then
runs a Celery worker named ``fleet-gpuN@<node>`` consuming its own queue
``fleet.<node>.gpuN`` and the pool queue, concurrency 1.

Pool: prefork with one child. The parent process (Celery's consumer) never runs torch
or initialises CUDA; it keeps sending Celery heartbeats and answering ``inspect ping``
while the child trains, so Flower never shows a busy worker as offline, and a hard
time limit or ``revoke(terminate=True)`` can kill a stuck child. The child holds the
models, registers itself in fleet's registry and heartbeats from a thread. Trade-off:
if the child dies, Celery starts a new one and the old handles are reported lost
(their owner pid no longer matches); the orchestrator restores them from their last
packs. The ``solo`` pool would block pings during training; ``threads`` would put the
training and the consumer under one GIL and make hard limits impossible.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet.runtime import SHUTDOWN_REDIS_RETRY_S
from fleet.settings import FleetSettings

if TYPE_CHECKING:
    from fleet.registry import Registry
    from fleet.runtime import WorkerIdentity

log = logging.getLogger("fleet.worker")


def worker_names(settings: FleetSettings, gpu: int | None, slot: int) -> tuple[str, str]:
    """``(celery node name, own queue)`` for GPU ``gpu``, or CPU slot ``slot``."""
    kind = f"gpu{gpu}" if gpu is not None else f"cpu{slot}"
    return f"fleet-{kind}@{settings.node}", f"fleet.{settings.node}.{kind}"


@contextmanager
def claimed_name(
    settings: FleetSettings, registry: Registry, gpu: int | None, slot: int | None
) -> Iterator[tuple[str, str, int]]:
    """Claim this worker's name in Redis for as long as the block runs: ``fleet-gpuN`` for
    ``gpu``, ``fleet-cpuN`` for ``slot``, or the lowest free CPU slot when both are None.
    A thread renews the claim every heartbeat; it is released on exit. Yields ``(name,
    queue, slot)``.

    Raises:
        WorkerSlotTakenError: the GPU or slot is held by a live worker.
    """
    pid, host, ttl_s = os.getpid(), socket.gethostname(), settings.heartbeat_ttl_s
    if gpu is None and slot is None:
        slot = registry.claim_free_cpu_slot(settings.node, pid=pid, host=host, ttl_s=ttl_s)
        name, queue = worker_names(settings, None, slot)
    else:
        name, queue = worker_names(settings, gpu, slot or 0)
        registry.claim_worker_name(name, pid=pid, host=host, ttl_s=ttl_s)
    stop = threading.Event()

    def renew() -> None:
        from fleet.errors import FleetError

        while not stop.wait(settings.heartbeat_interval_s):
            try:
                if not registry.renew_worker_name(name, pid=pid, host=host, ttl_s=ttl_s):
                    log.warning("the claim on %s was lost; claiming it again", name)
                    registry.claim_worker_name(name, pid=pid, host=host, ttl_s=ttl_s)
            except FleetError as exc:  # Redis away (logged once by the client), or taken
                log.debug("claim renewal of %s failed: %s", name, exc)

    thread = threading.Thread(target=renew, name="fleet-name-claim", daemon=True)
    thread.start()
    try:
        yield name, queue, slot or 0
    finally:
        stop.set()
        from fleet.registry import Registry

        quick = Registry.from_settings(settings, retry_s=SHUTDOWN_REDIS_RETRY_S)
        try:
            quick.release_worker_name(name, pid=pid)
        except Exception as exc:  # Redis gone with the fleet: the claim expires by itself
            log.warning("could not release the claim on %s: %s", name, exc)
        finally:
            quick.redis.close()


def run_worker(
    settings: FleetSettings,
    *,
    gpu: int | None = None,
    visible_device: str | None = None,
    slot: int | None = None,
    workload: str | None = None,
    config: dict[str, Any] | None = None,
    torch_threads: int | None = None,
    loglevel: str = "INFO",
) -> int:
    """Run one fleet worker in this process until it is shut down; its exit status (0
    after a warm shutdown, non-zero when Celery stopped on an unrecoverable error).

    Args:
        gpu: GPU index to pin to (``CUDA_VISIBLE_DEVICES``), or None for a CPU worker.
        visible_device: ``CUDA_VISIBLE_DEVICES`` value when it differs from ``gpu`` (in a
            container given one GPU, that GPU is device 0 whatever its host index).
        slot: CPU worker index; None takes the lowest free slot on this node.
        workload / config: default workload for calls that name none.
        torch_threads: ``torch.set_num_threads`` in the child (CPU workers sharing cores).

    Raises:
        WorkerSlotTakenError: the GPU or slot is already held by a live worker.
        BrokerUnavailableError: Redis cannot be reached.
    """
    if gpu is not None:
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported before the GPU could be pinned")
        os.environ["CUDA_VISIBLE_DEVICES"] = (
            visible_device if visible_device is not None else str(gpu)
        )

    from fleet.registry import Registry
    from fleet.runtime import WorkerIdentity

    with claimed_name(settings, Registry.from_settings(settings), gpu, slot) as (name, queue, _):
        identity = WorkerIdentity(name, queue, gpu, workload, config)
        return _run_celery(settings, identity, torch_threads, loglevel)


def _run_celery(
    settings: FleetSettings, identity: WorkerIdentity, torch_threads: int | None, loglevel: str
) -> int:
    from celery import signals

    from fleet.app import create_app
    from fleet.registry import Registry
    from fleet.runtime import WorkerRuntime
    from fleet.tasks.base import set_runtime

    name, queue = identity.name, identity.queue
    app = create_app(settings)
    import fleet.tasks  # noqa: F401  registers the tasks with the app

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _start_runtime(**_: Any) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        runtime = WorkerRuntime(settings, identity, Registry.from_settings(settings))
        runtime.start(device_name)
        set_runtime(runtime)
        from fleet.stacks import upload_leftovers

        upload_leftovers(runtime)  # stacks the previous child wrote as it was killed

    @signals.worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stop_runtime(**_: Any) -> None:
        from fleet.tasks.base import _runtime

        if _runtime is not None:
            _runtime.stop()

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _deregister(**_: Any) -> None:
        try:
            registry = Registry.from_settings(settings, retry_s=SHUTDOWN_REDIS_RETRY_S)
            registry.deregister_worker(name)
        except Exception as exc:  # Redis gone too: the record turns "lost" by itself
            log.warning("could not deregister %s: %s", name, exc)

    # Celery's worker_main drops the exit status (click runs without standalone mode),
    # so an unrecoverable error would exit 0 and escape Restart=on-failure.
    code = app.start(
        [
            "worker",
            "--hostname",
            name,
            "--queues",
            f"{queue},{settings.pool_queue}",
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--task-events",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            loglevel,
        ]
    )
    return int(code or 0)


@dataclass(frozen=True)
class VisibleGpu:
    """A GPU a worker may be pinned to: ``index`` names the worker and its queue
    (``fleet-gpu<index>``), ``device`` is its ``CUDA_VISIBLE_DEVICES`` value."""

    index: int
    device: str


def visible_gpus() -> list[VisibleGpu]:
    """The GPUs this process may use, without touching CUDA: the ones an existing
    ``CUDA_VISIBLE_DEVICES`` names (a scheduler's choice is kept: ``"2,3"`` gives GPUs 2
    and 3; UUIDs and MIG ids are numbered in order; CUDA's rule that the list ends at the
    first negative index holds), else every GPU ``nvidia-smi -L`` lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        out = []
        for i, entry in enumerate(e.strip() for e in env.split(",") if e.strip()):
            if entry.lstrip("-").isdigit():
                if int(entry) < 0:
                    break
                out.append(VisibleGpu(int(entry), entry))
            else:
                out.append(VisibleGpu(i, entry))
        return out
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    lines = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return [VisibleGpu(i, str(i)) for i in range(len(lines))]


def run_all_gpus(argv_tail: list[str]) -> int:
    """Start ``fleet worker --gpu i`` for every GPU of :func:`visible_gpus` and wait;
    SIGINT/SIGTERM are passed on. Returns the first non-zero exit code (0 if all stopped
    cleanly)."""
    gpus = visible_gpus()
    if not gpus:
        log.error("no GPUs visible (CUDA_VISIBLE_DEVICES, nvidia-smi -L); use --cpu")
        return 2
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet",
                "worker",
                "--gpu",
                str(g.index),
                "--visible-device",
                g.device,
                *argv_tail,
            ]
        )
        for g in gpus
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [child.wait() for child in children]
    return next((c for c in codes if c), 0)


def parse_config(config_json: str | None) -> dict[str, Any] | None:
    """The ``--config-json`` object, or None.

    Raises:
        ValueError: not a JSON object.
    """
    if config_json is None:
        return None
    value = json.loads(config_json)
    if not isinstance(value, dict):
        raise ValueError("--config-json must be a JSON object")
    return value
