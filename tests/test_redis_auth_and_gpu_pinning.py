"""Redis with an ACL user and password, Redis over TLS, and GPU pinning: real servers,
real workers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.client import Fleet
from fleet.errors import BrokerUnavailableError
from tests.harness import REPO, RedisServer, running_workers, settings_for


def _hello_through_a_worker(settings, log_dir: Path, slot: int) -> None:
    with running_workers(settings, [slot], log_dir) as (worker,):
        fleet = Fleet(settings)
        assert fleet.hello(worker=worker.name).worker == worker.name
        handle = fleet.init_model("cpu", worker=worker.name)
        assert fleet.evaluate(handle, "Test")["examples"] > 0
        fleet.close()


def test_acl_user_and_password_url(tmp_path, artifacts_dir):
    server = RedisServer(
        tmp_path / "redis",
        extra_args=[
            "--requirepass",
            "default-pw",
            "--user",
            "alice",
            "on",
            ">alice-pw",
            "~*",
            "&*",
            "+@all",
        ],
        ping={"password": "default-pw"},
    )
    try:
        url = f"redis://alice:alice-pw@127.0.0.1:{server.port}/0"
        _hello_through_a_worker(settings_for(url, tmp_path / "shared"), artifacts_dir / "logs", 30)
        bad = settings_for(f"redis://alice:wrong@127.0.0.1:{server.port}/0", tmp_path / "shared")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as info:
            Fleet(bad).workers()
        cli = CliRunner(env={"FLEET_REDIS_URL": bad.redis_url}).invoke(
            main, ["jobs", "list"], terminal_width=300
        )
        assert cli.exit_code == 2 and "authentication failed" in cli.output
        # not retried: a tenth of the retry budget a transient outage would get
        assert time.monotonic() - started < bad.redis_retry_s / 10
        assert "authentication failed" in info.value.cause
        assert "wrong" not in info.value.url and "alice:***@" in info.value.url
    finally:
        server.stop()


def test_rediss_tls_url(tmp_path, artifacts_dir):
    certs = tmp_path / "tls"
    certs.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(certs / "key.pem"),
            "-out",
            str(certs / "cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    cert, key = str(certs / "cert.pem"), str(certs / "key.pem")
    server = RedisServer(
        tmp_path / "redis",
        port_flag="--tls-port",
        extra_args=[
            "--port",
            "0",
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            cert,
            "--tls-auth-clients",
            "no",
        ],
        ping={"ssl": True, "ssl_ca_certs": cert},
    )
    try:
        settings = settings_for(
            f"rediss://127.0.0.1:{server.port}/0",
            tmp_path / "shared",
            redis_tls_ca_certs=Path(cert),
        )
        _hello_through_a_worker(settings, artifacts_dir / "logs", 31)
        # without the CA the certificate is not trusted: one line, exit 2, no retries
        runner = CliRunner(env={"FLEET_REDIS_URL": settings.redis_url})
        started = time.monotonic()
        result = runner.invoke(main, ["workers"], terminal_width=300)
        assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
        assert "TLS handshake failed" in result.output and "CERTIFICATE_VERIFY" in result.output
        assert time.monotonic() - started < settings.redis_retry_s / 10, "not retried"
    finally:
        server.stop()


def test_gpu_worker_pins_cuda_visible_devices_before_torch(fleet_settings, artifacts_dir):
    with running_workers(fleet_settings, [3], artifacts_dir / "logs", gpu=True) as (worker,):
        fleet = Fleet(fleet_settings)
        info = fleet.registry.worker(worker.name)
        assert worker.name == "fleet-gpu3@testnode" and info.queue == "fleet.testnode.gpu3"
        assert info.gpu_index == 3
        assert info.cuda_visible_devices == "3"  # as seen by the process that runs torch
        assert fleet.hello(worker=worker.name).worker == worker.name
        fleet.close()


def test_cpu_workers_do_not_pin(fleet, two_workers):
    assert fleet.registry.worker(two_workers[0].name).cuda_visible_devices is None


def test_importing_fleet_loads_neither_torch_nor_celery():
    code = "import sys, fleet, fleet.cli; print('torch' in sys.modules, 'celery' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_all_gpus_without_gpus_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "fleet", "worker", "--all-gpus"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "no GPUs visible" in out.stderr
