"""Every Redis key fleet uses (besides Celery's own), in one place. Prefix ``fleet:``."""

from __future__ import annotations

PREFIX = "fleet:"

#: Set of worker names ever registered (live or lost).
WORKERS = PREFIX + "workers"
#: Set of every model_id in the registry.
HANDLES = PREFIX + "handles"


def worker(name: str) -> str:
    """Hash: a worker's record (queue, gpu_index, device_name, pid, started_at, ...)."""
    return f"{PREFIX}worker:{name}"


def worker_alive(name: str) -> str:
    """String with a TTL: present while the worker heartbeats."""
    return f"{PREFIX}worker:{name}:alive"


def worker_handles(name: str) -> str:
    """Set: model_ids owned by a worker."""
    return f"{PREFIX}worker:{name}:handles"


def worker_workloads(name: str) -> str:
    """Set: workload specs a worker has loaded."""
    return f"{PREFIX}worker:{name}:workloads"


def handle(model_id: str) -> str:
    """Hash: a model handle's record (owner, queue, workload, generation, last_pack, ...)."""
    return f"{PREFIX}handle:{model_id}"


def abort(task_id: str) -> str:
    """String with a TTL: set to ask a running task to stop between steps."""
    return f"{PREFIX}abort:{task_id}"
