"""ops/ under a real Prometheus (Debian's ``prometheus`` package, installed by
scripts/test): promtool checks the rules and a config derived from ops/prometheus.yml;
a Prometheus with that config scrapes a live ``fleet exporter`` (real Redis) and a live
Flower, loads the alerts, and serves a DiLoCo round's gauges back over its HTTP API;
every query of the Grafana dashboard (ops/grafana/fleet.json) is accepted by it, names
only metrics the exporter or Flower export, and the DiLoCo panels find the round; the
panels render to a PNG (scripts/render_dashboard.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fleet.diloco.state import (
    Evaluation,
    LandedEvaluation,
    ReplicaOutcome,
    RoundRecord,
    WireBytes,
)
from fleet.jobs import JobStore
from fleet.local import free_port, worker_env
from fleet.protocol import OuterStepSpec, WeightedPack
from fleet.storage import PackRef
from tests.harness import REPO, wait_until

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="prometheus/promtool not installed (scripts/test installs Debian's prometheus)",
)
DASHBOARD = REPO / "ops" / "grafana" / "fleet.json"
#: What Grafana puts in the dashboard's queries, as the test fills them in.
VARIABLES = {"$job_id": ".*", "$__rate_interval": "1m", "$__interval": "15s"}


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _up(url: str) -> bool:
    try:
        return _get(url, 1.0)[0] == 200
    except OSError:
        return False


class Served:
    """A process started for the test, with its log; stopped on :meth:`stop`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_file = log.open("wb")
        self.proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=self.log_file, stderr=subprocess.STDOUT
        )

    def wait(self, url: str, what: str) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"{what} exited: see {self.log_file.name}"
            return _up(url)

        wait_until(ready, 60, f"{what} answers on {url}", interval_s=0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


def derived_config(exporter: str, flower: str, scrape_interval_s: float = 2.0) -> dict:
    """ops/prometheus.yml with its targets pointed at the live processes, its rule file
    at ops/alerts.yml, and a short scrape interval, each scrape given all of it (the
    exporter reads every job of the session's Redis, hundreds by the time this runs: a
    scrape that times out marks every series stale); nothing else changed."""
    config = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())
    targets = {"fleet": exporter, "flower": flower}
    assert {c["job_name"] for c in config["scrape_configs"]} == set(targets)
    for scrape in config["scrape_configs"]:
        scrape["static_configs"] = [{"targets": [targets[scrape["job_name"]]]}]
    config["rule_files"] = [str(REPO / "ops" / name) for name in config["rule_files"]]
    config["global"]["scrape_interval"] = f"{int(scrape_interval_s * 1000)}ms"
    config["global"]["scrape_timeout"] = f"{int(scrape_interval_s * 1000)}ms"
    config["global"]["evaluation_interval"] = f"{int(scrape_interval_s * 1000)}ms"
    return config


def test_promtool_checks_the_rules_and_the_derived_config(tmp_path):
    rules = subprocess.run(
        [PROMTOOL, "check", "rules", str(REPO / "ops" / "alerts.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout, rules.stdout
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(derived_config("127.0.0.1:9808", "127.0.0.1:5555")))
    config = subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS" in config.stdout and "alerts.yml" in config.stdout


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of the dashboard, variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


#: PromQL words that are not metric names.
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "le", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers (``{...}``), range and offset durations (``[...]``) and grouping label
    lists, that are not functions (followed by ``(``) or keywords."""
    bare = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        rest = bare[match.end() :].lstrip()
        word = match.group()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if bare[max(0, match.start() - 1)].isdigit():  # 0.9, 1e3, 5m
            continue
        names.add(word)
    return names


def test_metric_names_finds_selectors_and_skips_the_rest():
    expr = (
        "histogram_quantile(0.9, sum by (le, task) (rate(flower_task_runtime_seconds_bucket"
        '{task=~"fleet\\\\..*"}[5m]))) + on (x) fleet_queue_length * 60 > bool up'
    )
    assert metric_names(expr) == {"flower_task_runtime_seconds_bucket", "fleet_queue_length", "up"}


def exported_names(metrics_text: str) -> set[str]:
    """Metric names a /metrics page declares (its ``# TYPE`` lines), with the series
    names Prometheus derives from counters and histograms."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names |= {name.removesuffix("_total") + "_total", name + "_created"}
            if kind in ("histogram", "summary"):
                names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
    return names


@pytest.fixture
def running_round(fleet_settings) -> Iterator[tuple[str, RoundRecord]]:
    """A running DiLoCo job in Redis with one committed round: replica 0 merged, replica
    1 aborted at the round's deadline; the merged replica's record carries sent and
    received bytes, as newer round records do."""
    jobs = JobStore.from_settings(fleet_settings)
    job = jobs.create("diloco", {"replicas": 2, "rounds": 4})
    jobs.set_status(job.job_id, "running")
    step = OuterStepSpec(round=0, replicas=[WeightedPack(pack=PackRef(path="p"), weight=1.0)])
    record = RoundRecord(
        round=0, started_at=100.0, closed_at=112.5, wall_s=12.5, outer_step_s=0.25,
        step=step, parameter_count=1000, exchange_bytes=6200, deadline_s=12.0,
        wire={"w0": WireBytes(sent=1200, received=4000), "w1": WireBytes(sent=1000)},
        replicas=[
            ReplicaOutcome(replica=0, attempt=0, worker="w0", status="merged", started_at=100,
                           finished_at=110, compute_s=9.0, load_s=0.5, publish_s=0.75),
            ReplicaOutcome(replica=1, attempt=0, worker="w1", status="aborted", started_at=100,
                           finished_at=112),
        ],
    )  # fmt: skip
    data = record.model_dump(mode="json")
    jobs.add_metrics(job.job_id, data)
    # its evaluation ran beside the next round and landed apart from the record
    landed = LandedEvaluation(
        evaluation=Evaluation(at=118.0, worker="w2", metrics={"loss": 2.5}), eval_s=4.0
    )
    jobs.record_evaluation(job.job_id, 0, landed.model_dump_json())
    yield job.job_id, record
    jobs.set_status(job.job_id, "cancelled")


@pytest.fixture
def live_prometheus(fleet_settings, running_round, tmp_path, artifacts_dir) -> Iterator[dict]:
    """``fleet exporter``, Flower and a Prometheus with the derived config scraping both."""
    env = worker_env(fleet_settings, [str(REPO)])
    logs = artifacts_dir / "logs"
    logs.mkdir(exist_ok=True)
    started: list[Served] = []
    try:
        exporter_port, flower_port, prom_port = free_port(), free_port(), free_port()
        exporter = Served(
            [sys.executable, "-m", "fleet", "exporter", "--port", str(exporter_port),
             "--address", "127.0.0.1"],
            logs / "exporter.log", env,
        )  # fmt: skip
        started.append(exporter)
        flower = Served(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "flower",
             "--address=127.0.0.1", f"--port={flower_port}"],
            logs / "flower-prometheus.log", env,
        )  # fmt: skip
        started.append(flower)
        exporter_url = f"http://127.0.0.1:{exporter_port}"
        flower_url = f"http://127.0.0.1:{flower_port}"
        exporter.wait(f"{exporter_url}/metrics", "fleet exporter")
        flower.wait(f"{flower_url}/healthcheck", "Flower")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(derived_config(f"127.0.0.1:{exporter_port}", f"127.0.0.1:{flower_port}"))
        )
        prometheus = Served(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            logs / "prometheus.log",
        )  # fmt: skip
        started.append(prometheus)
        url = f"http://127.0.0.1:{prom_port}"
        prometheus.wait(f"{url}/-/ready", "Prometheus")
        yield {"url": url, "exporter": exporter_url, "flower": flower_url}
    finally:
        for served in reversed(started):
            served.stop()


def query(url: str, expr: str) -> tuple[int, dict]:
    """``/api/v1/query`` of ``expr``: the HTTP status and the JSON reply."""
    status, body = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return status, json.loads(body)


def test_prometheus_scrapes_the_exporter_and_flower_and_serves_the_dashboard(
    live_prometheus, running_round, tmp_path
):
    url = live_prometheus["url"]
    job_id, record = running_round

    def value(expr: str) -> float | None:
        status, reply = query(url, expr)
        assert status == 200 and reply["status"] == "success", reply
        results = reply["data"]["result"]
        return float(results[0]["value"][1]) if results else None

    selector = f'{{job_id="{job_id}"}}'
    wait_until(
        lambda: value(f"fleet_diloco_round_wall_seconds{selector}") is not None,
        60, "the round's wall time, scraped from the exporter", interval_s=0.25,
    )  # fmt: skip
    assert value(f"fleet_diloco_round_wall_seconds{selector}") == record.wall_s
    assert value(f"fleet_diloco_round_exchange_seconds{selector}") == 0.5 + 0.75
    assert value(f"fleet_diloco_round_deadline_seconds{selector}") == 12.0
    assert value(f"fleet_diloco_eval_loss{selector}") == 2.5
    per_parameter = f"fleet_diloco_round_bytes_per_parameter{selector[:-1]}"
    assert value(f'{per_parameter}, direction="sent"}}') == 1.2  # the busiest: 1200 B / 1000
    assert value(f'{per_parameter}, direction="received"}}') == 4.0
    assert value(f'{per_parameter}, direction="total"}}') == 5.2
    replicas = f"fleet_diloco_round_replicas{selector[:-1]}"
    assert value(f'{replicas}, status="merged"}}') == 1
    assert value(f'{replicas}, status="aborted"}}') == 1
    assert value(f'{replicas}, status="lost"}}') == 0
    wait_until(lambda: value('up{job="flower"}') == 1.0, 30, "Flower scraped", interval_s=0.25)
    assert value('up{job="fleet"}') == 1.0

    status, body = _get(f"{url}/api/v1/rules")
    rules = json.loads(body)["data"]["groups"]
    alerts = yaml.safe_load((REPO / "ops" / "alerts.yml").read_text())
    assert {r["name"] for g in rules for r in g["rules"]} == {
        r["alert"] for g in alerts["groups"] for r in g["rules"]
    }, "Prometheus loaded every alert of ops/alerts.yml"
    assert all(r["health"] != "err" for g in rules for r in g["rules"])

    exported = exported_names(_get(f"{live_prometheus['exporter']}/metrics")[1])
    exported |= exported_names(_get(f"{live_prometheus['flower']}/metrics")[1])
    assert "fleet_diloco_round_replicas" in exported and "flower_events_total" in exported
    diloco_panels = 0
    for title, expr in dashboard_queries():
        status, reply = query(url, expr)
        assert status == 200 and reply["status"] == "success", (title, expr, reply)
        names = metric_names(expr)
        assert names and names <= exported, (title, names - exported)
        if any(name.startswith("fleet_diloco_") for name in names):
            diloco_panels += 1
            assert reply["data"]["result"], f"{title}: no series for the running round ({expr})"
    assert diloco_panels >= 8

    png = tmp_path / "dashboard.png"
    rendered = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_dashboard.py"), "--prometheus", url,
         "--minutes", "2", "--out", str(png)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = len(json.loads(DASHBOARD.read_text())["panels"])
    assert f"{panels} panels" in rendered.stdout, rendered.stdout
