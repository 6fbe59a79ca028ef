"""Worker bootstrap: one Celery worker per GPU (DESIGN.md decision 1).

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
import subprocess
import sys
from typing import Any

from fleet.settings import FleetSettings

log = logging.getLogger("fleet.worker")


def worker_names(settings: FleetSettings, gpu: int | None, slot: int) -> tuple[str, str]:
    """``(celery node name, own queue)`` for GPU ``gpu``, or CPU slot ``slot``."""
    kind = f"gpu{gpu}" if gpu is not None else f"cpu{slot}"
    return f"fleet-{kind}@{settings.node}", f"fleet.{settings.node}.{kind}"


def run_worker(
    settings: FleetSettings,
    *,
    gpu: int | None = None,
    visible_device: str | None = None,
    slot: int = 0,
    workload: str | None = None,
    config: dict[str, Any] | None = None,
    torch_threads: int | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run one fleet worker in this process until it is shut down.

    Args:
        gpu: GPU index to pin to (``CUDA_VISIBLE_DEVICES``), or None for a CPU worker.
        visible_device: ``CUDA_VISIBLE_DEVICES`` value when it differs from ``gpu`` (in a
            container given one GPU, that GPU is device 0 whatever its host index).
        slot: CPU worker index, to run several on one machine.
        workload / config: default workload for calls that name none.
        torch_threads: ``torch.set_num_threads`` in the child (CPU workers sharing cores).
    """
    if gpu is not None:
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported before the GPU could be pinned")
        os.environ["CUDA_VISIBLE_DEVICES"] = (
            visible_device if visible_device is not None else str(gpu)
        )
    from celery import signals

    from fleet.app import create_app
    from fleet.registry import Registry
    from fleet.runtime import WorkerIdentity, WorkerRuntime
    from fleet.tasks.base import set_runtime

    name, queue = worker_names(settings, gpu, slot)
    identity = WorkerIdentity(name, queue, gpu, workload, config)
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

    @signals.worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stop_runtime(**_: Any) -> None:
        from fleet.tasks.base import _runtime

        if _runtime is not None:
            _runtime.stop()

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _deregister(**_: Any) -> None:
        Registry.from_settings(settings).deregister_worker(name)

    app.worker_main(
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


def visible_gpus() -> list[int]:
    """Indices of the GPUs this machine shows (``nvidia-smi -L``), without touching CUDA."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [i for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def run_all_gpus(argv_tail: list[str]) -> int:
    """Start ``fleet worker --gpu i`` for every visible GPU and wait; SIGINT/SIGTERM are
    passed on. Returns the first non-zero exit code (0 if all stopped cleanly)."""
    gpus = visible_gpus()
    if not gpus:
        log.error("no GPUs visible (nvidia-smi -L); use --cpu")
        return 2
    children = [
        subprocess.Popen([sys.executable, "-m", "fleet", "worker", "--gpu", str(i), *argv_tail])
        for i in gpus
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
