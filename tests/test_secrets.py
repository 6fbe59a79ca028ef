"""Secrets stay secret: a DiLoCo job on an S3 shared root (the real SeaweedFS) whose key
and secret come through FLEET_STORAGE_OPTIONS and AWS_*, with a Redis that requires a
password (given in FLEET_REDIS_URL), on real workers, with Flower and the exporter up
and every tracker on. Then every artifact fleet wrote is searched for the three secret
strings (also inside base64, as kombu stores task bodies): every command Redis was sent
during the run (MONITOR) and every key's value after it, job records and logs through
the CLI, the report, the trackers' files (JSONL, TensorBoard, MLflow, W&B offline),
``--print-config``, Flower's task and worker API (arguments, the workers' Celery config),
the exporter's /metrics, the orchestrator's, workers', Flower's and the exporter's logs,
what ``fleet up`` prints and writes, and every object on the shared root."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from fleet.local import RedisServer, free_port, worker_env
from tests.harness import DIGITS, REPO, running_workers, settings_for, wait_until

pytest.importorskip("wandb", reason="the wandb extra is not installed")

#: Runs of base64 long enough to hide a secret (kombu's message bodies).
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{24,}={0,2}")


def leaks_in(data: bytes, needles: dict[str, bytes]) -> list[str]:
    """The names of the ``needles`` found in ``data`` or in any base64 run inside it."""
    found = [name for name, needle in needles.items() if needle in data]
    for run in BASE64_RUN.findall(data):
        try:
            decoded = base64.b64decode(run + b"=" * (-len(run) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        found += [f"{name} (base64)" for name, needle in needles.items() if needle in decoded]
    return found


class Monitor:
    """Every command Redis receives while it runs (``MONITOR``, its raw reply lines), read
    in a thread."""

    def __init__(self, client: redis.Redis) -> None:
        self.lines: list[bytes] = []
        self._client = client  # its pool owns the connection: keep it
        self._connection = client.connection_pool.get_connection()
        self._connection.send_command("MONITOR")
        assert self._connection.read_response() in (b"OK", "OK")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                line = self._connection.read_response()
            except redis.TimeoutError:
                continue
            except (redis.RedisError, OSError, ValueError, AttributeError):
                return
            self.lines.append(line if isinstance(line, bytes) else str(line).encode())

    def stop(self) -> None:
        self._connection.disconnect()
        self._thread.join(timeout=10)


def every_value(client: redis.Redis) -> Iterator[tuple[str, bytes]]:
    """``(key, value bytes)`` of every key in Redis, whatever its type."""
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [k + b"=" + v for k, v in client.hgetall(key).items()]
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [
                b" ".join(k + b"=" + v for k, v in fields.items())
                for _, fields in client.xrange(key)
            ]
        else:
            values = []
        yield key.decode(errors="replace"), key + b"\n" + b"\n".join(values)


#: Flower's basic auth, as compose runs it (its own secret, not one this test hunts).
FLOWER_AUTH = "fleet-admin:flower-pw"


def _http(url: str) -> bytes:
    request = urllib.request.Request(url)
    token = base64.b64encode(FLOWER_AUTH.encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as reply:
        return bytes(reply.read())


@pytest.fixture
def needles() -> dict[str, bytes]:
    """The secrets of one run, unique strings."""
    return {
        "redis password": f"redis-pw-{secrets.token_hex(8)}".encode(),
        "s3 key": f"AKIAFLEET{secrets.token_hex(6).upper()}".encode(),
        "s3 secret": f"s3-secret-{secrets.token_hex(12)}".encode(),
    }


@pytest.fixture
def password_redis(tmp_path, needles) -> Iterator[RedisServer]:
    """A private redis-server that requires the run's password (stopped however the
    test ends)."""
    password = needles["redis password"].decode()
    server = RedisServer(
        tmp_path / "redis", extra_args=["--requirepass", password], ping={"password": password}
    )
    yield server
    server.stop()


def test_no_secret_reaches_anything_fleet_writes(
    tmp_path, s3_server, s3_root, monkeypatch, needles, password_redis
):
    password = needles["redis password"].decode()
    key, secret = needles["s3 key"].decode(), needles["s3 secret"].decode()
    server = password_redis
    monitor = Monitor(
        redis.Redis(host="127.0.0.1", port=server.port, password=password, socket_timeout=None)
    )
    logs = tmp_path / "logs"
    outputs: dict[str, bytes] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        settings = settings_for(
            f"redis://:{password}@127.0.0.1:{server.port}/0",
            s3_root,  # type: ignore[arg-type]
            storage_options={"endpoint_url": s3_server.endpoint_url, "key": key, "secret": secret},
            cache_dir=tmp_path / "cache",
        )
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        env = worker_env(settings, [str(REPO)])
        for name in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        env["WANDB_DIR"] = str(tmp_path / "wandb")
        env["FLOWER_BASIC_AUTH"] = FLOWER_AUTH
        (tmp_path / "wandb").mkdir()

        def start(args: list[str], name: str) -> None:
            log = (logs / f"{name}.log").open("wb")
            processes.append(
                subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            )

        def cli(*args: str, name: str) -> bytes:
            out = subprocess.run(
                [sys.executable, "-m", "fleet", *args], env=env, cwd=tmp_path,
                capture_output=True, timeout=300, check=False,
            )  # fmt: skip
            assert out.returncode == 0, (args, out.stdout + out.stderr)
            outputs[name] = out.stdout + b"\n" + out.stderr
            return out.stdout

        with running_workers(settings, [50, 51], logs):
            flower_port, exporter_port = free_port(), free_port()
            start(
                [sys.executable, "-m", "celery", "-A", "fleet.app", "flower",
                 "--address=127.0.0.1", f"--port={flower_port}"], "flower",
            )  # fmt: skip
            start(
                [sys.executable, "-m", "fleet", "exporter", "--port", str(exporter_port),
                 "--address", "127.0.0.1"], "exporter",
            )  # fmt: skip
            trackers = [
                f"jsonl:{tmp_path / 'rounds.jsonl'}", f"tensorboard:{tmp_path / 'tb'}",
                f"mlflow:{tmp_path / 'mlruns'}", "wandb:fleet-secrets",
            ]  # fmt: skip
            run = ["diloco", "--workload", DIGITS, "--rounds", "2", "--inner-steps", "3"]
            for tracker in trackers:
                run += ["--tracker", tracker]
            cli(*run, "--print-config", name="--print-config")
            job_id = cli(*run, "--log-level", "DEBUG", name="fleet diloco").decode()
            job_id = job_id.split("job ", 1)[1].split()[0]
            cli("jobs", "show", job_id, "--json", name="jobs show --json")
            cli("jobs", "show", job_id, name="jobs show")
            cli("jobs", "logs", job_id, name="jobs logs")
            cli("jobs", "list", "--json", name="jobs list")
            cli("workers", "--json", name="workers")

            flower = f"http://127.0.0.1:{flower_port}"
            wait_until(
                lambda: b"fleet.replica_round" in _http(f"{flower}/api/tasks"),
                60, "Flower saw the job's tasks", interval_s=0.5,
            )  # fmt: skip
            outputs["Flower /api/tasks"] = _http(f"{flower}/api/tasks")
            workers = _http(f"{flower}/api/workers?refresh=1")
            assert b"broker_url" in workers, "the workers' Celery config is in the reply"
            outputs["Flower /api/workers"] = workers
            outputs["Flower /metrics"] = _http(f"{flower}/metrics")
            wait_until(
                lambda: b"fleet_workers" in _http(f"http://127.0.0.1:{exporter_port}/metrics"),
                60, "the exporter serves", interval_s=0.5,
            )  # fmt: skip
            outputs["exporter /metrics"] = _http(f"http://127.0.0.1:{exporter_port}/metrics")

            # `fleet up` on this Redis: what it prints, its cluster.json and logs
            up_root = tmp_path / "up"
            up_out = (logs / "fleet-up.out").open("wb")
            up = subprocess.Popen(
                [sys.executable, "-m", "fleet", "up", "--workers", "1", "--no-flower",
                 "--root", str(up_root)],
                env=env, cwd=tmp_path, stdout=up_out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            processes.append(up)
            wait_until(
                lambda: b"FLEET_SHARED_ROOT=" in (logs / "fleet-up.out").read_bytes(),
                120, "fleet up is up", interval_s=0.5,
            )  # fmt: skip
            outputs["fleet up cluster.json"] = (up_root / "cluster.json").read_bytes()
            up.send_signal(signal.SIGINT)
            assert up.wait(60) == 0
            up_out.close()

            from fleet.diloco.config import DiLoCoConfig
            from fleet.diloco.state import rounds_of, state_of
            from fleet.jobs import JobStore
            from fleet.report import RunSummary, write_report

            jobs = JobStore.from_settings(settings)
            job, state = jobs.get(job_id), state_of(jobs, job_id)
            assert job.status == "completed" and state is not None
            config = DiLoCoConfig.model_validate(job.spec)
            summary = RunSummary(
                label="DiLoCo", job_id=job_id, config=config.model_dump(mode="json"),
                replicas=config.replicas, eval_split=config.eval_split,
                started_at=state.started_at, initial_eval=state.initial_eval,
                rounds=rounds_of(jobs, job_id),
            )  # fmt: skip
            write_report(tmp_path / "report", summary, summary, {"workload": DIGITS})
            from fleet.storage import open_store

            store = open_store(settings)
            objects = store.walk()
            assert any(o.path.startswith(f"runs/{job_id}/") for o in objects)
            for entry in objects:
                outputs[f"shared root {entry.path}"] = store.read_bytes(entry.path)
    finally:
        for proc in processes:
            proc.terminate()
            proc.wait(20)
        monitor.stop()

    client = redis.Redis(host="127.0.0.1", port=server.port, password=password)
    try:
        assert client.exists(f"fleet:job:{job_id}:logs"), "the job's records are in Redis"
        for key, value in every_value(client):
            outputs[f"Redis key {key}"] = value
    finally:
        client.close()
        server.stop()
    assert any(b"replica_round" in line for line in monitor.lines), "MONITOR saw the run"
    outputs["Redis MONITOR"] = b"\n".join(monitor.lines)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "redis" not in p.parts]
    for kind in ("rounds.jsonl", "tb", "mlruns", "wandb", "report", "logs", "up", "cache"):
        assert any(kind in p.relative_to(tmp_path).parts[:1] for p in files), kind
    for path in files:
        outputs[f"file {path.relative_to(tmp_path)}"] = path.read_bytes()

    leaks = {where: found for where, data in outputs.items() if (found := leaks_in(data, needles))}
    assert not leaks, json.dumps(leaks, indent=1)
    assert len(outputs) > 50, sorted(outputs)
    assert leaks_in(b"x " + base64.b64encode(b"{" + needles["s3 secret"] + b"}"), needles)
