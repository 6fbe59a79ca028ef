"""The demo's DiLoCo phase with its evaluations on the critical path and beside
training, in one run.

    python benchmarks/eval_overlap.py [--rounds 8] [--inner-steps 100] [--repeats 2]

Three CPU workers (one core's worth of torch threads each, as ``fleet demo`` starts
them on this machine): two train the demo's replicas (charlm, 2 replicas, H=100, its
dataset leases, evaluation every second round and after the last, 5,632 held-out
windows). ``blocking`` evaluates each due round on the outer step's worker before the
next round starts, as fleet did before ``eval_overlap``; ``beside`` evaluates on the
third worker while the next round trains (the run's last round is evaluated before the
run ends in both). The modes alternate, and each phase is timed on this process's
clock from the job's start to ``run()`` returning, the final evaluation included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from fleet.client import Fleet
from fleet.demo import (
    DEMO_CONFIG,
    DEMO_EVAL_EVERY,
    DEMO_SHARDS_PER_BATCH,
    DEMO_SHARDS_PER_REPLICA,
    DEMO_WORKLOAD,
    prepare_dataset,
)
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.diloco.config import DatasetConfig
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings


def phase(fleet: Fleet, dataset: str, args: argparse.Namespace, eval_worker: str | None):
    config = DiLoCoConfig(
        workload=DEMO_WORKLOAD,
        config=DEMO_CONFIG,
        replicas=2,
        rounds=args.rounds,
        inner_steps=args.inner_steps,
        eval_every=DEMO_EVAL_EVERY,
        eval_overlap=eval_worker is not None,
        eval_worker=eval_worker,
        workers=args.train_workers,
        dataset=DatasetConfig(
            path=dataset,
            batch_kind="micro_epoch",
            microshards_per_round=2 * DEMO_SHARDS_PER_REPLICA,
            microshards_per_batch=DEMO_SHARDS_PER_BATCH,
        ),
    )
    started = time.monotonic()
    run = DiLoCoRun.start(fleet, config)
    run.run()
    wall_s = time.monotonic() - started
    rounds = run.rounds()
    final = rounds[-1].eval
    assert final is not None and final.loss is not None
    evaluated = sum(r.eval is not None for r in rounds)
    return wall_s, final.loss, final.loss_stderr or 0.0, evaluated


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-eval-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    rows: dict[str, list[tuple[float, float, float, int]]] = {"blocking": [], "beside": []}
    try:
        with running_workers(settings, [0, 1, 2], work / "logs", torch_threads=1) as workers:
            fleet = Fleet(settings)
            dataset = prepare_dataset(fleet, Console())
            probes = [
                fleet.capability_probe(
                    worker=w.name, workload=DEMO_WORKLOAD, config=DEMO_CONFIG, wait=False
                )
                for w in workers
            ]
            for probe in probes:  # the workload built on every worker, off the clock
                probe.result(timeout_s=600)
            args.train_workers = [workers[0].name, workers[1].name]
            for _ in range(args.repeats):
                for mode, evaluator in (("blocking", None), ("beside", workers[2].name)):
                    rows[mode].append(phase(fleet, dataset, args, evaluator))
                    wall, loss, se, n = rows[mode][-1]
                    print(f"  {mode}: {wall:.1f} s, final eval loss {loss:.4f} ± {se:.4f}")
            fleet.close()
    finally:
        server.stop()
    base = statistics.median(w for w, *_ in rows["blocking"])
    print(f"\nthe demo's DiLoCo phase: {args.rounds} rounds of H={args.inner_steps}, 2 replicas")
    print("| evaluation | wall s (median [min, max]) | vs blocking | final eval loss | evaluated |")
    print("|---|---|---|---|---|")
    for mode, runs in rows.items():
        walls = [w for w, *_ in runs]
        wall = statistics.median(walls)
        loss, se, n = runs[-1][1], runs[-1][2], runs[-1][3]
        print(
            f"| {mode} | {wall:.1f} [{min(walls):.1f}, {max(walls):.1f}] | "
            f"{wall / base:.2f}x | {loss:.4f} ± {se:.4f} | {n} of {args.rounds} |"
        )


if __name__ == "__main__":
    main()
