"""Flower against a real Redis and real workers: fleet's tasks, workers and queues through
its authenticated HTTP API, Prometheus metrics, and its Tasks page in headless Chromium."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.local import free_port, worker_env
from tests.harness import DIGITS, REPO, wait_until

AUTH = ("fleet-admin", "s3cret-pw")


def _get(
    url: str, *, auth: tuple[str, str] | None = AUTH, timeout: float = 10.0
) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture(scope="module")
def flower(fleet_settings, two_workers, artifacts_dir):
    port = free_port()
    env = worker_env(fleet_settings, [str(REPO)])
    env["FLOWER_BASIC_AUTH"] = f"{AUTH[0]}:{AUTH[1]}"
    log = open(artifacts_dir / "logs" / "flower.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "fleet.app",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "Flower exited"
        try:
            return _get(f"{url}/healthcheck", auth=None, timeout=1)[0] == 200
        except OSError:
            return False

    wait_until(healthy, 60, "Flower started", interval_s=0.2)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def diloco_job(flower, fleet_settings, two_workers):
    """A short DiLoCo run while Flower watches."""
    from fleet.client import Fleet

    fleet = Fleet(fleet_settings)
    # Flower enables task events and starts reading them: probe with hello tasks until
    # it shows one (the events of a task sent before then are not seen)
    probes: list[str] = []

    def probe_seen() -> bool:
        probe = fleet.app.send_task("fleet.hello", kwargs={"params": {}})
        probe.get(timeout=30)
        probes.append(probe.id)
        return bool(set(probes) & set(_fleet_tasks(flower)))

    wait_until(probe_seen, 60, "Flower reading task events", interval_s=0.5)
    config = DiLoCoConfig(workload=DIGITS, replicas=2, rounds=1, inner_steps=5)
    job = DiLoCoRun.start(fleet, config).run()
    assert job.status == "completed"
    fleet.close()
    return job


def _fleet_tasks(flower: str) -> dict:
    status, body = _get(f"{flower}/api/tasks")
    assert status == 200, body
    # a task whose task-received event Flower has not seen (yet) is listed with name null
    tasks = json.loads(body).items()
    return {tid: t for tid, t in tasks if (t.get("name") or "").startswith("fleet.")}


def test_workers_tasks_and_metrics_through_the_api(flower, diloco_job, two_workers):
    wait_until(
        lambda: any(
            t["name"] == "fleet.replica_round" and t["state"] == "SUCCESS"
            for t in _fleet_tasks(flower).values()
        ),
        30,
        "Flower seeing fleet.replica_round succeed",
        interval_s=0.5,
    )
    tasks = _fleet_tasks(flower)
    names = {t["name"] for t in tasks.values()}
    assert {"fleet.init_model", "fleet.replica_round", "fleet.evaluate_global"} <= names, names
    inner = [t for t in tasks.values() if t["name"] == "fleet.replica_round"]
    assert {t["worker"] for t in inner} == {w.name for w in two_workers}
    for t in inner:  # readable arguments: PackRefs and paths, batches summarized
        assert "<5 items>" in t["kwargs"] and "output_path" in t["kwargs"], t["kwargs"]
        assert len(t["kwargs"]) < 1500

    workers: dict = {}

    def every_worker_answered() -> bool:  # Flower waits 1 s for inspect replies
        nonlocal workers
        status, body = _get(f"{flower}/api/workers?refresh=1")
        assert status == 200, body
        workers = json.loads(body)
        answered = [workers.get(w.name) or {} for w in two_workers]
        return all({"active_queues", "registered"} <= set(a) for a in answered)

    wait_until(every_worker_answered, 60, "both workers in Flower's inspect reply")
    for w in two_workers:
        queues = {q["name"] for q in workers[w.name]["active_queues"]}
        assert queues == {w.queue, "fleet.gpu"}
        assert "fleet.replica_round" in workers[w.name]["registered"]

    status, metrics = _get(f"{flower}/metrics", auth=None)
    assert status == 200
    assert (
        'flower_events_total{task="fleet.replica_round",type="task-succeeded"'
        in metrics.replace(", ", ",")
        or any(
            "flower_events_total" in line
            and 'task="fleet.replica_round"' in line
            and "task-succeeded" in line
            for line in metrics.splitlines()
        )
    )
    assert any(
        "flower_events_total" in line
        and 'task="fleet.replica_round"' in line
        and "task-progress" in line
        for line in metrics.splitlines()
    ), "long tasks send task-progress events"


def test_the_api_refuses_unauthenticated_calls(flower):
    for path in ("/api/workers", "/api/tasks", "/tasks"):
        status, _ = _get(f"{flower}{path}", auth=None)
        assert status == 401, path
    assert _get(f"{flower}/api/workers", auth=(AUTH[0], "wrong"))[0] == 401


@pytest.fixture
def chromium() -> str:
    """The chromium binary; skips without one (under CI the skip fails the run unless
    FLEET_ALLOW_SKIPS names it: tests/conftest.py; scripts/test installs Debian's)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (scripts/test installs Debian's chromium)")
    return found


def test_tasks_page_in_headless_chromium(chromium, flower, diloco_job, artifacts_dir, tmp_path):
    url = f"http://{AUTH[0]}:{AUTH[1]}@{flower.removeprefix('http://')}/tasks"
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,900",
        "--virtual-time-budget=15000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False
    )
    assert "fleet.replica_round" in dom.stdout, dom.stderr[-2000:]
    shot = artifacts_dir / "flower-tasks.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=False
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
