"""Hosts for multi-host tests, made of Linux namespaces.

A :class:`Network` is a switch: a network namespace holding a bridge. Each
:class:`Host` is a network namespace joined to the bridge by a veth pair (its
``eth0``, an address in a private /24 picked at random) and a mount namespace with a
private tmpfs at :attr:`Host.local_dir` for its cache and local files: two hosts share
nothing but the network (the code they run is installed software, visible to all, as
on real machines). A long-lived ``sleep`` holds each host's namespaces; commands enter
them with ``nsenter``. The test process itself plays the operator's laptop: a veth in
its own namespace (``ctl``) joins the bridge too, so it can read Redis on the storage
host; it carries no workload traffic.

Links are rate-limited with ``tc qdisc ... tbf`` in both directions (the host's
``eth0`` and its switch port). This kernel has tbf and htb but no netem, so latency
comes from a delay element instead: :class:`StorageServices` with ``rtt_ms`` puts a
TCP proxy on the storage host (:mod:`fleet.testing.delay_proxy`) in front of Redis and S3, which
holds every chunk for half the round-trip time in each direction; every host reaches
both through it, over its own rate-limited link. Everything is torn down by
:meth:`Network.close` (and :meth:`StorageServices.close`).

Needs root (``ip netns``); :func:`skip_reason` says why it cannot run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

#: The delay element (a TCP proxy), run on the storage host as ``python -m``.
DELAY_PROXY = "fleet.testing.delay_proxy"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def skip_reason() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "multi-host tests need root (ip netns, unshare --mount)"
    for tool in ("ip", "nsenter", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"multi-host tests need {tool}"
    probe = f"flprobe{uuid.uuid4().hex[:6]}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _free_subnet() -> str:
    routes = _run("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f"{subnet}." not in routes:
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet")


class Host:
    """One host: network and mount namespaces, an address, a private tmpfs."""

    def __init__(self, network: Network, name: str, index: int) -> None:
        self.network = network
        self.name = name
        self.ns = f"{network.tag}-{name}"
        self.ip = f"{network.subnet}.{index}"
        self.port = f"{network.tag[-6:]}p{index}"  # its switch port (<= 15 chars)
        self.local_dir = Path(tempfile.mkdtemp(prefix=f"host-{name}-", dir=network.base))
        _run("ip", "netns", "add", self.ns)
        _run(
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            self.ns,
            "type",
            "veth",
            "peer",
            "name",
            self.port,
            "netns",
            network.switch,
        )
        _run("ip", "-n", network.switch, "link", "set", self.port, "master", "br0", "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _run("ip", "-n", self.ns, "link", "set", "eth0", "up")
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        # the holder of the mount namespace: a private tmpfs at local_dir, then sleep
        self._holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs -o size=10g tmpfs "$0" && echo ready && exec sleep infinity',
                str(self.local_dir),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "ready":
            raise RuntimeError(f"host {name}: could not mount its tmpfs")

    @property
    def prefix(self) -> list[str]:
        """Run a command on this host: ``[*host.prefix, cmd, ...]``."""
        return ["nsenter", "-t", str(self._holder.pid), "-m", "-n", f"--wd={os.getcwd()}", "--"]

    def run(self, *cmd: str, check: bool = True, timeout_s: float = 120.0) -> str:
        """Run a command on this host; its stdout."""
        out = subprocess.run(
            [*self.prefix, *cmd], capture_output=True, text=True, timeout=timeout_s
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{self.name}: {cmd} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def popen(
        self, *cmd: str, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            return subprocess.Popen(
                [*self.prefix, *cmd],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def limit(self, mbit: float | None) -> None:
        """Rate-limit this host's link both ways to ``mbit`` Mbit/s (tbf); None: unlimited."""
        for ns, dev in ((self.ns, "eth0"), (self.network.switch, self.port)):
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if mbit is not None:
                burst = max(32_000, int(mbit * 1e6 / 8 / 100))  # ~10 ms of traffic
                _run(
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{mbit}mbit",
                    "burst",
                    str(burst),
                    "latency",
                    "100ms",
                )

    def link(self, up: bool) -> None:
        """Bring this host's link up or down (a cable pulled)."""
        _run("ip", "-n", self.ns, "link", "set", "eth0", "up" if up else "down")

    def counters(self) -> tuple[int, int]:
        """Bytes (sent, received) on this host's link so far."""
        base = "/sys/class/net/eth0/statistics"
        out = self.run("sh", "-c", f"cat {base}/tx_bytes {base}/rx_bytes").split()
        return int(out[0]), int(out[1])

    def close(self) -> None:
        if self._holder.poll() is None:
            os.killpg(self._holder.pid, signal.SIGKILL)
            self._holder.wait()
        _run("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.local_dir, ignore_errors=True)


class Network:
    """A bridge in its own namespace, hosts on it, and the test process's ``ctl`` port."""

    def __init__(self, base: Path) -> None:
        self.tag = f"fl{uuid.uuid4().hex[:6]}"
        self.subnet = _free_subnet()
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self.ctl = f"{self.tag}c"
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        # the operator's port: this namespace, address .1
        _run(
            "ip",
            "link",
            "add",
            self.ctl,
            "type",
            "veth",
            "peer",
            "name",
            "ctl",
            "netns",
            self.switch,
        )
        _run("ip", "-n", self.switch, "link", "set", "ctl", "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.ctl)
        _run("ip", "link", "set", self.ctl, "up")

    def host(self, name: str) -> Host:
        host = Host(self, name, 10 + len(self.hosts))
        self.hosts.append(host)
        return host

    def wait_reachable(self, host: Host, port: int, timeout_s: float = 60.0) -> None:
        """Block until ``host:port`` accepts TCP connections from here."""
        import socket

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection((host.ip, port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        _run("ip", "link", "del", self.ctl, check=False)
        _run("ip", "netns", "del", self.switch, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


class StorageServices:
    """What a storage host runs: a Redis (no persistence) and SeaweedFS's S3 gateway
    (:mod:`fleet.testing.seaweed`), both reachable from every host and from ``ctl``; with
    ``rtt_ms``, behind the delay element (:mod:`fleet.testing.delay_proxy`), so that every request
    to either costs that round trip.

    Args:
        host: the storage host.
        log_dir: where their logs go (outside the host's tmpfs).
        data_dir: SeaweedFS's volumes (default: the host's tmpfs; a benchmark writing
            GBs puts them on disk).
        rtt_ms: None: Redis and S3 are reached directly. A number (0 included): through
            the proxy, which adds that round-trip time in milliseconds (:meth:`set_rtt`
            changes it); :attr:`redis_url` and :attr:`storage_options` name the proxy.
    """

    REDIS_PORT = 6379
    #: Where the proxy listens for Redis on the storage host.
    REDIS_PROXY_PORT = 7379

    def __init__(
        self,
        host: Host,
        log_dir: Path,
        data_dir: Path | None = None,
        rtt_ms: float | None = None,
    ) -> None:
        from fleet.testing.seaweed import SeaweedS3

        self.host = host
        self.s3: SeaweedS3 | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.s3_proxy_port: int | None = None
        self._delay_file = log_dir / f"delay-{host.ns}-rtt-ms"
        self.redis = host.popen(
            "redis-server", "--port", str(self.REDIS_PORT), "--bind", "0.0.0.0",
            "--protected-mode", "no", "--save", "", "--appendonly", "no",
            log=log_dir / "redis.log",
        )  # fmt: skip
        try:
            self.s3 = SeaweedS3(
                data_dir or host.local_dir / "weed",
                ip=host.ip,
                prefix=host.prefix,
                log_path=log_dir / "weed.log",
            )
            host.network.wait_reachable(host, self.REDIS_PORT)
            self.s3.wait_ready()
            if rtt_ms is not None:
                self._start_proxy(log_dir, rtt_ms)
        except BaseException:
            self.close()
            raise

    def _start_proxy(self, log_dir: Path, rtt_ms: float) -> None:
        from fleet.testing.seaweed import free_ports

        assert self.s3 is not None
        self.s3_proxy_port = free_ports(1)[0]
        self._delay_file.write_text(f"{rtt_ms:g}\n")
        self.proxy = self.host.popen(
            sys.executable, "-m", DELAY_PROXY, "--delay-file", str(self._delay_file),
            "--listen", f"0.0.0.0:{self.REDIS_PROXY_PORT}=127.0.0.1:{self.REDIS_PORT}",
            "--listen", f"0.0.0.0:{self.s3_proxy_port}=127.0.0.1:{self.s3.port}",
            log=log_dir / "delay-proxy.log",
        )  # fmt: skip
        for port in (self.REDIS_PROXY_PORT, self.s3_proxy_port):
            self.host.network.wait_reachable(self.host, port)

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the round-trip time the proxy adds (milliseconds); returns once it
        applies it to every chunk it reads from then on.

        Raises:
            RuntimeError: the services were made without ``rtt_ms`` (no proxy).
        """
        if self.proxy is None or self.proxy.poll() is not None:
            raise RuntimeError("no delay proxy: make the StorageServices with rtt_ms")
        applied = self._delay_file.with_name(self._delay_file.name + ".applied")
        self._delay_file.write_text(f"{rtt_ms:g}\n")
        self.proxy.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not (applied.exists() and float(applied.read_text()) == rtt_ms):
            if time.monotonic() > deadline or self.proxy.poll() is not None:
                raise RuntimeError(f"the delay proxy did not apply {rtt_ms} ms")
            time.sleep(0.02)

    @property
    def redis_url(self) -> str:
        """Redis, through the proxy when there is one."""
        port = self.REDIS_PORT if self.proxy is None else self.REDIS_PROXY_PORT
        return f"redis://{self.host.ip}:{port}/0"

    @property
    def storage_options(self) -> dict[str, Any]:
        """``FLEET_STORAGE_OPTIONS`` for the S3 gateway, through the proxy when there is
        one."""
        assert self.s3 is not None
        options: dict[str, Any] = dict(self.s3.storage_options)
        if self.s3_proxy_port is not None:
            options["endpoint_url"] = f"http://{self.host.ip}:{self.s3_proxy_port}"
        return options

    def close(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.kill()
            self.proxy.wait()
        if self.s3 is not None:
            self.s3.stop()
        if self.redis.poll() is None:
            self.redis.kill()
        self.redis.wait()
