"""``fleet demo``: a real DiLoCo run of the charlm example on a local cluster, against a
single-worker baseline on the same wall-clock budget, with a run report.

The baseline is one worker of the same cluster (same device, same threads as each
replica) training the same model alone: DiLoCo with one replica, outer lr 1 and no
momentum, which is exactly plain local training (a test proves it bit for bit), so
both runs share the code path, the evaluation schedule and its cost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from fleet.client import Fleet, FleetFuture
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.jobs import JobStore
from fleet.protocol import CapabilityProbeResult
from fleet.report import tokens_per_s, write_report

DEMO_WORKLOAD = "examples.charlm:make"


def _run_record(run: DiLoCoRun, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "job_id": run.job_id,
        "config": run.config.model_dump(mode="json"),
        "replicas": run.config.replicas,
        "eval_split": run.config.eval_split,
        "started_at": run.started_at(),
        "initial_eval": run.initial_eval(),
        "rounds": run.metrics(),
    }


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("eval loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        console=console,
    )


def run_diloco_and_baseline(
    fleet: Fleet,
    *,
    workload: str,
    config: dict[str, Any],
    replicas: int,
    rounds: int,
    inner_steps: int,
    baseline_worker: str,
    console: Console,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run DiLoCo, then the baseline for the same wall-clock time; return both records."""
    diloco_cfg = DiLoCoConfig(
        workload=workload, config=config, replicas=replicas, rounds=rounds, inner_steps=inner_steps
    )
    with _progress(console) as progress:
        task = progress.add_task(f"DiLoCo x{replicas}", total=rounds, loss="-", tps="-")

        def on_round(m: dict[str, Any]) -> None:
            loss = f"{m['eval']['loss']:.3f}" if m.get("eval") else "-"
            progress.update(task, advance=1, loss=loss, tps=f"{tokens_per_s(m):,.0f}")

        diloco = DiLoCoRun.start(fleet, diloco_cfg, on_round=on_round)
        diloco.run()
    d_record = _run_record(diloco, f"DiLoCo, {replicas} replicas (H={inner_steps})")
    last = d_record["rounds"][-1]
    budget_s = last["started_at"] + last["wall_s"] - d_record["started_at"]

    baseline_cfg = diloco_cfg.model_copy(
        update={
            "replicas": 1,
            "rounds": 1_000_000,
            "outer": OuterOptimizerConfig(lr=1.0, momentum=0.0),
            "workers": [baseline_worker],
            "max_wall_s": budget_s,
        }
    )
    with _progress(console) as progress:
        task = progress.add_task("baseline x1", total=budget_s, loss="-", tps="-")
        begun = time.time()

        def on_baseline_round(m: dict[str, Any]) -> None:
            loss = f"{m['eval']['loss']:.3f}" if m.get("eval") else "-"
            progress.update(
                task,
                completed=min(time.time() - begun, budget_s),
                loss=loss,
                tps=f"{tokens_per_s(m):,.0f}",
            )

        baseline = DiLoCoRun.start(fleet, baseline_cfg, on_round=on_baseline_round)
        baseline.run()
        progress.update(task, completed=budget_s)
    b_record = _run_record(baseline, "single worker (same wall clock)")
    return d_record, b_record


def run_demo(
    fleet: Fleet,
    *,
    rounds: int,
    inner_steps: int,
    replicas: int,
    config: dict[str, Any],
    console: Console,
    flower_url: str | None = None,
    workload: str = DEMO_WORKLOAD,
) -> tuple[Path, Path, dict[str, Any]]:
    """The demo on an already running fleet; returns the report paths and comparison."""
    workers = fleet.wait_for_workers(replicas, timeout_s=120)
    if flower_url:
        console.print(f"Flower: [link={flower_url}]{flower_url}[/link]", highlight=False)
    console.print(f"workers: {', '.join(w.name for w in workers)}", highlight=False)
    # Build the workload (corpus, model) on every worker first, so neither run's clock
    # includes it; the probe also records each worker's measured throughput.
    probes = [
        cast(
            FleetFuture[CapabilityProbeResult],
            fleet.capability_probe(worker=w.name, workload=workload, config=config, wait=False),
        )
        for w in workers
    ]
    for w, probe in zip(workers, probes, strict=True):
        estimate = probe.result(timeout_s=600).capability
        console.print(
            f"{w.name}: {estimate.work_units_per_second:,.0f} tokens/s measured", highlight=False
        )
    d_record, b_record = run_diloco_and_baseline(
        fleet,
        workload=workload,
        config=config,
        replicas=replicas,
        rounds=rounds,
        inner_steps=inner_steps,
        baseline_worker=workers[0].name,
        console=console,
    )
    out_dir = fleet.shared.resolve(f"reports/{d_record['job_id']}")
    extra = {
        "workload": workload,
        "resources": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "workers": [{"name": w.name, "device": w.device_name} for w in workers],
            "note": "DiLoCo uses one worker per replica; the baseline one of the same workers",
        },
    }
    json_path, png_path = write_report(out_dir, d_record, b_record, extra)
    jobs = JobStore(fleet.registry.redis)
    for record in (d_record, b_record):
        jobs.add_artifact(record["job_id"], "report", fleet.shared.relative(json_path))
        jobs.add_artifact(record["job_id"], "report_png", fleet.shared.relative(png_path))
    import json

    comparison = json.loads(json_path.read_text())["comparison"]
    return json_path, png_path, comparison
