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


def worker_claim(name: str) -> str:
    """String with a TTL: the claim on a worker name (its GPU or CPU slot on a node),
    ``{pid, host, claimed_at}``, renewed by the worker's main process."""
    return f"{PREFIX}claim:{name}"


def handle(model_id: str) -> str:
    """Hash: a model handle's record (owner, queue, workload, generation, last_pack, ...)."""
    return f"{PREFIX}handle:{model_id}"


def abort(task_id: str) -> str:
    """String with a TTL: set to ask a running task to stop between steps."""
    return f"{PREFIX}abort:{task_id}"


#: Sorted set of job ids by creation time.
JOBS = PREFIX + "jobs"

#: List: messages workers refused (not JSON, refused content type, ...), newest first,
#: each ``{at, queue, reason, content_type, task_id, raw}`` (fleet.broker).
DEADLETTER = PREFIX + "deadletter"


def job(job_id: str) -> str:
    """Hash: a job's record (kind, spec, status, per-status timestamps, artifacts)."""
    return f"{PREFIX}job:{job_id}"


def job_artifacts(job_id: str) -> str:
    """Hash: a job's artifacts, name -> shared-root-relative path."""
    return f"{PREFIX}job:{job_id}:artifacts"


def job_logs(job_id: str) -> str:
    """Stream: log lines of a job's tasks (worker, task_id, level, logger, line), in order."""
    return f"{PREFIX}job:{job_id}:logs"


def job_metrics(job_id: str) -> str:
    """List: one JSON object of metrics per round (or step) of a job."""
    return f"{PREFIX}job:{job_id}:metrics"


def job_tasks(job_id: str) -> str:
    """Set: Celery task ids a job has running, aborted on cancel."""
    return f"{PREFIX}job:{job_id}:tasks"


def job_state(job_id: str) -> str:
    """Hash: a driver's resumable state (field ``state``, DiLoCo: the state after the
    last committed round) and the plan of the round in flight (field ``plan``)."""
    return f"{PREFIX}job:{job_id}:state"


def job_checkpoints(job_id: str) -> str:
    """Hash: checkpoints a DiLoCo job's workers published in the background, once each
    landed (docs/protocol.md section 5.7): field ``global/<round>`` -> a FullCheckpoint,
    ``replica/<replica>/<round>/<attempt>`` -> a ReplicaCheckpoint (JSON)."""
    return f"{PREFIX}job:{job_id}:checkpoints"


def job_evaluations(job_id: str) -> str:
    """Hash: evaluations of a DiLoCo job's committed global models that ran beside later
    rounds (:mod:`fleet.diloco.evaluation`): field ``<round>`` -> a LandedEvaluation
    (JSON)."""
    return f"{PREFIX}job:{job_id}:evaluations"


def job_owner(job_id: str) -> str:
    """String with a TTL: the job's owner lease ``{token, host, pid, started_at,
    heartbeat_at}``, renewed by the owning orchestrator's heartbeat."""
    return f"{PREFIX}job:{job_id}:owner"


def job_fence(job_id: str) -> str:
    """Counter: the job's fencing token, incremented by each new owner; every owner
    write is checked against it."""
    return f"{PREFIX}job:{job_id}:fence"


def replica_logs(task_id: str) -> str:
    """List: captured output lines of an executor replica."""
    return f"{PREFIX}replica:{task_id}:logs"
