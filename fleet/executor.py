"""CeleryExecutor: launch N replicas of an entrypoint on the fleet and manage them.

Each replica is one ``fleet.run_entrypoint`` task (see :mod:`fleet.tasks.replica`) on a
worker: the entrypoint (``module:attr`` or a dotted path, on the worker's allowlist) is
called with the given arguments and its rank in ``REPLICA_RANK`` (or ``rank_env``) and
``WORLD_SIZE``; its output is captured line by line for :meth:`stream_logs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from celery.result import AsyncResult

from fleet.client import Fleet
from fleet.errors import FleetTimeout, WorkerNotFound
from fleet.workload import parse_spec

ReplicaStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class ReplicaHandle:
    """One launched replica: its ``rank``, Celery ``task_id``, the ``queue`` it was sent
    to, and the ``entrypoint``."""

    rank: int
    task_id: str
    queue: str
    entrypoint: str


class CeleryExecutor:
    """Runs entrypoint replicas on fleet workers.

    Args:
        fleet: the client (default: ``Fleet.from_env()``).
        rank_env: environment variable that carries each replica's rank.
    """

    def __init__(self, fleet: Fleet | None = None, *, rank_env: str = "REPLICA_RANK") -> None:
        self.fleet = fleet or Fleet.from_env()
        self.rank_env = rank_env
        self._cancelled: set[str] = set()

    def _queues(self, n_replicas: int, gpu: bool | int | list[int] | None) -> list[str]:
        if gpu is None or gpu is False:
            return [self.fleet.settings.pool_queue] * n_replicas
        wanted = None if gpu is True else {gpu} if isinstance(gpu, int) else set(gpu)
        queues = [
            w.queue
            for w in self.fleet.workers()
            if w.gpu_index is not None and (wanted is None or w.gpu_index in wanted)
        ]
        if not queues:
            raise WorkerNotFound(f"gpu={gpu}")
        return [queues[rank % len(queues)] for rank in range(n_replicas)]

    def launch_replicas(
        self,
        n_replicas: int,
        entrypoint: str,
        entrypoint_args: Any = None,
        *,
        gpu: bool | int | list[int] | None = None,
        timeout: float = 3600,
        rank_env: str | None = None,
    ) -> list[ReplicaHandle]:
        """Start ``n_replicas`` replicas; return their handles in rank order.

        Args:
            entrypoint: ``module:attr`` or ``package.module.attr``.
            entrypoint_args: a list (positional), a dict (keyword) or one value, the
                same for every rank (ranks differ by the rank variable).
            gpu: None for any worker of the pool; True for every GPU worker; an index or
                a list of indices for the workers pinned to those GPUs. Replicas are
                spread over the matching workers' own queues, in rank order.
            timeout: seconds each replica may run (soft limit; the hard one is 60 s more).
            rank_env: variable for the rank (default: the executor's ``rank_env``).

        Raises:
            BadFactorySpecError: malformed entrypoint.
            WorkerNotFound: ``gpu`` given and no alive worker matches.
        """
        spec = entrypoint if ":" in entrypoint else ":".join(entrypoint.rsplit(".", 1))
        parse_spec(spec)
        handles = []
        for rank, queue in enumerate(self._queues(n_replicas, gpu)):
            kwargs = {
                "entrypoint": entrypoint,
                "args": entrypoint_args,
                "rank": rank,
                "world_size": n_replicas,
                "rank_env": rank_env or self.rank_env,
            }
            result = self.fleet.app.send_task(
                "fleet.run_entrypoint",
                kwargs=kwargs,
                queue=queue,
                soft_time_limit=timeout,
                time_limit=timeout + 60,
            )
            handles.append(ReplicaHandle(rank, str(result.id), queue, entrypoint))
        return handles

    def _result(self, handle: ReplicaHandle) -> AsyncResult:
        return self.fleet.app.AsyncResult(handle.task_id)

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        """``pending``, ``running``, ``succeeded``, ``failed`` or ``cancelled``."""
        result = self._result(handle)
        state = result.state
        if state == "SUCCESS":
            return "succeeded" if (result.result or {}).get("exit_code") == 0 else "failed"
        if state == "FAILURE":
            error = self.fleet.remote_error_of("run_entrypoint", result)
            return (
                "cancelled"
                if error.error_type in ("TaskAborted", "SoftTimeLimitExceeded")
                and (handle.task_id in self._cancelled)
                else "failed"
            )
        if state == "REVOKED" or handle.task_id in self._cancelled:
            return "cancelled"
        if state in ("STARTED", "PROGRESS", "RETRY"):
            return "running"
        return "pending"

    def stream_logs(self, handle: ReplicaHandle, n_lines: int = 200) -> str:
        """The last ``n_lines`` lines the replica printed or logged (stderr lines are
        prefixed ``[stderr]``)."""
        from fleet.jobs import JobStore

        return "\n".join(JobStore(self.fleet.registry).replica_lines(handle.task_id, n_lines))

    def cancel(self, handle: ReplicaHandle) -> None:
        """Stop a replica: a pending one never starts; a running one gets
        :class:`~fleet.errors.TaskAborted` raised inside it (its worker lives on)."""
        self._cancelled.add(handle.task_id)
        self.fleet.registry.request_abort(handle.task_id)
        self.fleet.app.control.revoke(handle.task_id, terminate=True, signal="SIGUSR1")

    def collect(
        self, handles: list[ReplicaHandle], timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Wait for every replica; ``[{rank, status, exit_code, error, result}]`` in rank order.

        Raises:
            FleetTimeout: not all finished within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for handle in sorted(handles, key=lambda h: h.rank):
            while (status := self.poll(handle)) in ("pending", "running"):
                if handle.task_id in self._cancelled and self._result(handle).state == "PENDING":
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise FleetTimeout("collect", handle.task_id, timeout or 0.0)
                time.sleep(0.05)
            result = self._result(handle)
            record: dict[str, Any] = {
                "rank": handle.rank,
                "status": status,
                "exit_code": None,
                "error": None,
                "result": None,
            }
            if result.state == "SUCCESS" and isinstance(result.result, dict):
                record.update(
                    exit_code=result.result.get("exit_code"),
                    error=result.result.get("error"),
                    result=result.result.get("result"),
                )
            elif result.state == "FAILURE":
                error = self.fleet.remote_error_of("run_entrypoint", result)
                record.update(exit_code=1, error=f"{error.error_type}: {error.error}")
            out.append(record)
        return out
