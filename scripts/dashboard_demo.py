#!/usr/bin/env python3
"""Make docs/dashboard.png from a real run: a private Redis, two CPU workers, Flower,
``fleet exporter`` and a Prometheus (Debian's ``prometheus``) with ops/prometheus.yml's
scrape jobs and ops/alerts.yml, a DiLoCo job of the burn_p2p-style test workload with a
4x straggler in some rounds under the tight adaptive deadline (so rounds cut it:
``aborted``), then scripts/render_dashboard.py over the run's minutes. Everything it
starts is stopped at the end.

    .venv/bin/python scripts/dashboard_demo.py [--rounds 30] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRAPE_INTERVAL = "1s"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args()
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        print("error: no prometheus on PATH (apt-get install prometheus)", file=sys.stderr)
        return 1

    from fleet.client import Fleet
    from fleet.diloco import DiLoCoConfig, DiLoCoRun, QuorumConfig
    from fleet.diloco.config import AdaptiveDeadlineConfig, DatasetConfig
    from fleet.local import RedisServer, free_port, running_workers, worker_env
    from fleet.settings import FleetSettings
    from fleet.testing.shard_workload import write_shards

    work = Path(tempfile.mkdtemp(prefix="fleet-dashboard-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        redis = RedisServer(work / "redis")
        stack.callback(redis.stop)
        settings = FleetSettings(
            redis_url=redis.url,
            shared_root=str(work / "shared"),
            workload_allowlist=["fleet.testing.*"],
            node="dashboard",
        )
        env = worker_env(settings, [str(REPO)])
        logs = work / "logs"
        logs.mkdir()
        procs: list[subprocess.Popen[bytes]] = []

        def start(cmd: list[str], name: str) -> subprocess.Popen[bytes]:
            log = stack.enter_context((logs / f"{name}.log").open("wb"))
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            return proc

        def stop_all() -> None:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(20)

        stack.callback(stop_all)
        exporter_port, flower_port, prom_port = free_port(), free_port(), free_port()
        exporter = start(
            [sys.executable, "-m", "fleet", "exporter", "--port", str(exporter_port),
             "--address", "127.0.0.1"], "exporter",
        )  # fmt: skip
        flower = start(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "flower",
             "--address=127.0.0.1", f"--port={flower_port}"], "flower",
        )  # fmt: skip
        config = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())
        targets = {"fleet": f"127.0.0.1:{exporter_port}", "flower": f"127.0.0.1:{flower_port}"}
        for scrape in config["scrape_configs"]:
            scrape["static_configs"] = [{"targets": [targets[scrape["job_name"]]]}]
        config["rule_files"] = [str(REPO / "ops" / f) for f in config["rule_files"]]
        config["global"] |= {"scrape_interval": SCRAPE_INTERVAL}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = start(
            [prometheus_bin, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            "prometheus",
        )  # fmt: skip
        prom_url = f"http://127.0.0.1:{prom_port}"
        _wait_http(f"http://127.0.0.1:{exporter_port}/metrics", exporter)
        _wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", flower)
        _wait_http(f"{prom_url}/-/ready", prometheus)

        workers = stack.enter_context(
            running_workers(
                settings, [0, 1], logs, workload="fleet.testing.shard_workload:make",
                pythonpath=[str(REPO)], cwd=REPO,
            )
        )  # fmt: skip
        print(f"workers {', '.join(w.name for w in workers)}; Prometheus {prom_url}")
        write_shards(work / "shared" / "datasets" / "digits", 16)
        began = time.time()
        fleet = Fleet(settings)
        stack.callback(fleet.close)
        cfg = DiLoCoConfig(
            workload="fleet.testing.shard_workload:make",
            config={
                "step_sleep_s": 0.04,
                "straggler": {"replica": 1, "factor": 4, "rounds": list(range(6, args.rounds, 7))},
            },
            replicas=2,
            rounds=args.rounds,
            inner_steps=20,
            eval_every=0,
            quorum=QuorumConfig(adaptive_deadline=AdaptiveDeadlineConfig(tight=True)),
            dataset=DatasetConfig(
                path="datasets/digits", microshards_per_lease=2, batch_kind="micro_epoch"
            ),
        )
        run = DiLoCoRun.start(fleet, cfg)
        job = run.run()
        print(f"job {job.job_id} {job.status} in {time.time() - began:.0f} s")
        time.sleep(3)  # the last scrape after the job: the panels end where it ended
        minutes = (time.time() - began) / 60 + 0.1
        rendered = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "render_dashboard.py"), "--prometheus",
             prom_url, "--minutes", f"{minutes:.2f}", "--rate-interval", "30s",
             "--out", str(args.out)],
            check=False,
        )  # fmt: skip
        return rendered.returncode


if __name__ == "__main__":
    sys.exit(main())
