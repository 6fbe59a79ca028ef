"""``fleet demo``: a real DiLoCo run of the charlm example on a local cluster, against a
single-worker baseline on the same wall-clock budget, with a run report. Both runs
train on leases of the same microshard dataset (the charlm corpus, written once under
the shared root), so the main job exercises datasets and leases end to end.

The baseline is one worker of the same cluster (same device, same threads as each
replica) training the same model alone: DiLoCo with one replica, outer lr 1 and no
momentum, which is exactly plain local training (a test proves it bit for bit), so
both runs share the code path, the evaluation schedule and its cost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.diloco.config import DatasetConfig, PseudoGradientConfig
from fleet.diloco.state import RoundRecord
from fleet.errors import RunConfigError
from fleet.jobs import JobStore
from fleet.report import RunSummary, loss_at, loss_curve, write_report
from fleet.storage import LocalStore
from fleet.tracking import RoundProgress, TensorBoardTracker, round_scalars

DEMO_WORKLOAD = "fleet.examples.charlm:make"
#: The demo's dataset: charlm's training corpus as this many microshards (~120 KB each).
DEMO_MICROSHARDS = 256
#: Microshards leased per replica per round (DiLoCo splits replicas x this by speed).
DEMO_SHARDS_PER_REPLICA = 8
#: charlm settings of the demo (``--config-json`` overrides them), from
#: ``benchmarks/sweep.py`` (docs/benchmarks.md, "Why the demo's defaults"): inner AdamW
#: lr 0.004, the best of the sweep at every H and outer optimizer; and 5,632 held-out windows of 128
#: bytes, as many as the validation split holds without overlap: a standard error of
#: ~0.29 % of the loss (charlm's default of 64 windows gives ~2.7 %).
DEMO_CONFIG: dict[str, Any] = {"lr": 0.004, "eval_windows": 5632}
#: Evaluate the global model every this many rounds (and after the last): each
#: evaluation of the 5,632 windows costs ~8-14 s of a worker on one core.
DEMO_EVAL_EVERY = 2
#: Microshards per BatchRef: each inner step samples its windows from this many files
#: (one ~120 KB shard per step made the minibatches narrow: DiLoCo's eval loss at 157 s
#: of the full demo was 1.604 with 1, 1.570 with 4).
DEMO_SHARDS_PER_BATCH = 4


def _local_root(fleet: Fleet) -> LocalStore:
    """The demo's shared root: a local directory of its embedded cluster.

    Raises:
        RunConfigError: FLEET_SHARED_ROOT is a URL (the demo writes its report locally).
    """
    store = fleet.shared
    if not isinstance(store, LocalStore):
        raise RunConfigError("FLEET_SHARED_ROOT", f"the demo needs a local path, not {store.url}")
    return store


def prepare_dataset(fleet: Fleet, console: Console) -> str:
    """The charlm corpus as a microshard dataset on the shared root (with burn_p2p's
    fetch-manifest and content hashes), written once; its shared-root-relative path."""
    from fleet.data.dataset import MANIFEST
    from fleet.examples.charlm import write_dataset

    rel = f"datasets/charlm-stdlib-{DEMO_MICROSHARDS}"
    path = _local_root(fleet).resolve(rel)
    if not (path / MANIFEST).is_file():
        written = write_dataset(path, DEMO_MICROSHARDS, manifest=True)
        console.print(f"wrote the dataset {rel}: {written['bytes']:,} bytes", highlight=False)
    return rel


def _summary(run: DiLoCoRun, label: str) -> RunSummary:
    state = run.state()
    assert state is not None
    return RunSummary(
        label=label,
        job_id=run.job_id,
        config=run.config.model_dump(mode="json"),
        replicas=run.config.replicas,
        eval_split=run.config.eval_split,
        started_at=state.started_at,
        initial_eval=state.initial_eval,
        rounds=run.rounds(),
    )


def tensorboard_dir(fleet: Fleet, diloco_job_id: str) -> Path:
    """Where the demo's TensorBoard event files go: under the report's directory, one
    subdirectory per run (``tensorboard --logdir`` this directory shows both)."""
    return _local_root(fleet).resolve(f"reports/{diloco_job_id}/tensorboard")


def _tracked(
    run: DiLoCoRun, tracker: TensorBoardTracker, bar: RoundProgress, *, by_time: float = 0.0
) -> None:
    """Run ``run`` with each round's scalars sent to ``tracker`` and ``bar`` (advanced
    by one round, or set to the seconds elapsed when ``by_time`` is the budget)."""
    begun = time.time()

    def on_round(m: RoundRecord) -> None:
        scalars = round_scalars(m, run.config.replicas)
        tracker.log_round(m.round + 1, scalars)
        if by_time:
            bar.update(scalars, completed=min(time.time() - begun, by_time))
        else:
            bar.update(scalars, advance=1)

    run.on_round = on_round
    tracker.start(run.job_id, run.config.model_dump(mode="json"))
    try:
        run.run()
    finally:
        tracker.close()


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
    dataset: str | None = None,
    eval_worker: str | None = None,
) -> tuple[RunSummary, RunSummary]:
    """Run DiLoCo, then the baseline for the same wall-clock time; return both runs
    (each evaluating on ``eval_worker`` beside its training, if given).
    With ``dataset`` both lease its microshards: DiLoCo ``replicas x`` 8 per round split
    by the workers' measured speed, the baseline 8 per round, 4 microshards per BatchRef."""

    def leases(n: int) -> DatasetConfig | None:
        if dataset is None:
            return None
        per_round = n * DEMO_SHARDS_PER_REPLICA
        return DatasetConfig(
            path=dataset,
            batch_kind="micro_epoch",
            microshards_per_round=per_round,
            microshards_per_batch=DEMO_SHARDS_PER_BATCH,
        )

    diloco_cfg = DiLoCoConfig(
        workload=workload,
        config=config,
        replicas=replicas,
        rounds=rounds,
        inner_steps=inner_steps,
        eval_every=DEMO_EVAL_EVERY,
        eval_worker=eval_worker,
        dataset=leases(replicas),
    )
    diloco = DiLoCoRun.start(fleet, diloco_cfg)
    tracker = TensorBoardTracker(str(tensorboard_dir(fleet, diloco.job_id)))
    with RoundProgress(console, f"DiLoCo x{replicas}", rounds) as bar:
        _tracked(diloco, tracker, bar)
    d_run = _summary(diloco, f"DiLoCo, {replicas} replicas (H={inner_steps})")
    last = d_run.rounds[-1]
    budget_s = last.started_at + last.wall_s - d_run.started_at

    baseline_cfg = diloco_cfg.model_copy(
        update={
            "replicas": 1,
            "rounds": 1_000_000,
            "outer": OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),  # plain training
            "pseudo_gradient": PseudoGradientConfig(codec="fp32"),
            "workers": [baseline_worker],
            "max_wall_s": budget_s,
            "dataset": leases(1),
        }
    )
    baseline = DiLoCoRun.start(fleet, baseline_cfg)
    with RoundProgress(console, "baseline x1", budget_s) as bar:
        _tracked(baseline, tracker, bar, by_time=budget_s)
        b_run = _summary(baseline, "single worker (same wall clock)")
        # the bar ends on the loss at the budget, the point the summary compares
        at_budget = loss_at(loss_curve(b_run), budget_s)
        shown = "-" if at_budget is None else f"{at_budget:.3f} at {budget_s:.0f} s"
        bar.update({}, completed=budget_s, loss=shown)
    return d_run, b_run


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
    """The demo on an already running fleet; returns the report paths and comparison.
    ``config`` overrides :data:`DEMO_CONFIG`."""
    config = {**DEMO_CONFIG, **config}
    workers = fleet.wait_for_workers(replicas, timeout_s=120)
    # a worker beyond the replicas' evaluates the global models beside their training
    eval_worker = workers[replicas].name if len(workers) > replicas else None
    if flower_url:
        console.print(f"Flower: [link={flower_url}]{flower_url}[/link]", highlight=False)
    console.print(f"workers: {', '.join(w.name for w in workers)}", highlight=False)
    dataset = prepare_dataset(fleet, console)
    # Build the workload (corpus, model) on every worker first, so neither run's clock
    # includes it; the probe also records each worker's measured throughput.
    probes = [
        fleet.capability_probe(worker=w.name, workload=workload, config=config, wait=False)
        for w in workers
    ]
    for w, probe in zip(workers, probes, strict=True):
        estimate = probe.result(timeout_s=600).capability
        console.print(
            f"{w.name}: {estimate.work_units_per_second:,.0f} tokens/s measured", highlight=False
        )
    d_run, b_run = run_diloco_and_baseline(
        fleet,
        workload=workload,
        config=config,
        replicas=replicas,
        rounds=rounds,
        inner_steps=inner_steps,
        baseline_worker=workers[0].name,
        eval_worker=eval_worker,
        console=console,
        dataset=dataset,
    )
    out_dir = _local_root(fleet).resolve(f"reports/{d_run.job_id}")
    extra = {
        "workload": workload,
        "resources": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "workers": [{"name": w.name, "device": w.device_name} for w in workers],
            "note": "DiLoCo uses one worker per replica; the baseline one of the same "
            "workers; both evaluate on the eval worker beside training, if there is one",
            "eval_worker": eval_worker,
        },
    }
    json_path, png_path, comparison = write_report(out_dir, d_run, b_run, extra)
    jobs = JobStore(fleet.registry)
    for run in (d_run, b_run):
        jobs.add_artifact(run.job_id, "report", _local_root(fleet).relative(json_path))
        jobs.add_artifact(run.job_id, "report_png", _local_root(fleet).relative(png_path))
    return json_path, png_path, comparison
