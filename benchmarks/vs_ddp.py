"""DiLoCo on the fleet against synchronous data parallel training (torch DDP) and one
worker alone, on one box, in one run.

    python benchmarks/vs_ddp.py [--rounds 20] [--inner-steps 20] [--repeats 3]
        [--inner-lr 0.002] [--outer nesterov|averaging]

The same workload (the charlm example: byte-level transformer on the stdlib sources),
model, initialisation and per-step batch for all three:

- **DiLoCo**: ``fleet`` with 2 replicas, one CPU worker each (one torch thread), a
  private redis-server; replica ``i`` at round ``r``, inner step ``s`` trains on the
  BatchRef ``{payload: {replica: i, num_replicas: 2}, ordinals: [r * H + s]}``.
- **DDP**: ``torch.nn.parallel.DistributedDataParallel`` over gloo, 2 processes on the
  same 2 cores (one torch thread each); rank ``i`` at step ``k`` trains on the same
  BatchRef with ``ordinals: [k]``: the same data order, gradients all-reduced every
  step. The same number of steps per process as DiLoCo's inner steps in all.
- **single**: one process, ``num_replicas: 1``, the same number of steps.

Every run evaluates its model on the same held-out windows every H steps; the clock
counts training only (evaluation time is taken out of every run alike). Prints each
run's final eval loss with its standard error and, for target losses (the single
worker's final loss first), the seconds each method took to reach it: the median of
``--repeats`` runs and their range.

Targets (issue 18): DiLoCo's time to the single worker's final loss <= 1/1.6 of the
single worker's, and within 1.15x of DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.examples.charlm import make
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

REPO = Path(__file__).resolve().parents[1]
CHARLM = {"d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, "batch_size": 16,
          "eval_windows": 512, "max_corpus_mb": 4}  # fmt: skip
Curve = list[tuple[float, float, float]]
"""``[(training seconds, eval loss, its standard error)]``."""


def _batch(replica: int, num_replicas: int, step: int) -> dict[str, Any]:
    return {
        "kind": "micro_epoch",
        "microshard_ids": [f"shard-{replica}"],
        "ordinals": [step],
        "payload": {"replica": replica, "num_replicas": num_replicas, "step": step},
    }


def _eval(workload: Any, model: torch.nn.Module) -> tuple[float, float]:
    metrics = workload.evaluate({"model": model}, "Validation")
    return float(metrics["loss"]), float(metrics["loss_stderr"])


def _data_parallel(
    rank: int, world: int, port: int, steps: int, every: int, out: str, config: dict[str, Any]
) -> None:
    """One process of the DDP (``world`` 2) or single (``world`` 1) run."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    workload = make(config)
    state = workload.init_model("cpu")
    model = state["model"]
    if world > 1:
        state["model"] = torch.nn.parallel.DistributedDataParallel(model)
    curve: Curve = [(0.0, *_eval(workload, model))] if rank == 0 else []
    trained_s = 0.0
    for step in range(steps):
        started = time.perf_counter()
        workload.train_window(state, [_batch(rank, world, step)])
        trained_s += time.perf_counter() - started
        if rank == 0 and (step + 1) % every == 0:
            curve.append((trained_s, *_eval(workload, model)))
    if rank == 0:
        Path(out).write_text(json.dumps(curve))
    if world > 1:
        dist.destroy_process_group()


def data_parallel(world: int, steps: int, every: int, port: int, config: dict[str, Any]) -> Curve:
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_data_parallel, args=(world, port, steps, every, out, config), nprocs=world, join=True)
    curve = json.loads(Path(out).read_text())
    os.unlink(out)
    return [tuple(p) for p in curve]  # type: ignore[misc]


#: ``--outer``: the published outer optimizer, or plain model averaging.
OUTER = {
    "nesterov": OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9),
    "averaging": OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
}


def diloco(
    fleet: Fleet, rounds: int, inner_steps: int, config: dict[str, Any], outer: str
) -> Curve:
    run = DiLoCoRun.start(
        fleet,
        DiLoCoConfig(
            workload="fleet.examples.charlm:make",
            config=config,
            replicas=2,
            rounds=rounds,
            inner_steps=inner_steps,
            outer=OUTER[outer],
        ),
    )
    run.run()
    state = run.state()
    assert state is not None and state.initial_eval is not None
    initial = state.initial_eval
    curve: Curve = [(0.0, initial.loss or 0.0, initial.loss_stderr or 0.0)]
    trained_s = 0.0
    for r in run.rounds():
        trained_s += r.wall_s - r.eval_s
        assert r.eval is not None
        curve.append((trained_s, r.eval.loss or 0.0, r.eval.loss_stderr or 0.0))
    return curve


def time_to(curve: Curve, target: float) -> float | None:
    """Training seconds at the first evaluation at or below ``target`` (None: never)."""
    return next((t for t, loss, _ in curve if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=0.002, help="for all three runs")
    parser.add_argument("--outer", choices=sorted(OUTER), default="nesterov")
    args = parser.parse_args()
    steps = args.rounds * args.inner_steps
    config = {**CHARLM, "lr": args.inner_lr}

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-ddp-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    runs: dict[str, list[Curve]] = {"single": [], "DDP": [], "DiLoCo": []}
    try:
        with running_workers(settings, [0, 1], work / "logs", pythonpath=[str(REPO)], cwd=REPO):
            fleet = Fleet(settings)
            for repeat in range(args.repeats):
                runs["single"].append(data_parallel(1, steps, args.inner_steps, 0, config))
                port = 29500 + repeat
                runs["DDP"].append(data_parallel(2, steps, args.inner_steps, port, config))
                runs["DiLoCo"].append(
                    diloco(fleet, args.rounds, args.inner_steps, config, args.outer)
                )
                print(f"  repeat {repeat + 1}/{args.repeats} done", flush=True)
            fleet.close()
    finally:
        server.stop()

    print(
        f"\ncharlm {json.dumps(config)}; {steps} steps per process (DiLoCo: {args.rounds} "
        f"rounds x H={args.inner_steps}, 2 replicas, outer {args.outer}); 2 CPU cores, "
        f"1 torch thread per "
        f"process; median of {args.repeats} runs [min, max]"
    )
    print(f"{'run':>8}{'final eval loss':>18}{'± s.e.':>8}{'training s':>16}")
    for name, curves in runs.items():
        finals = [c[-1][1] for c in curves]
        seconds = [c[-1][0] for c in curves]
        print(
            f"{name:>8}{statistics.median(finals):>18.4f}{curves[0][-1][2]:>8.4f}"
            f"{statistics.median(seconds):>10.1f} [{min(seconds):.1f}, {max(seconds):.1f}]"
        )
    single_final = statistics.median(c[-1][1] for c in runs["single"])
    targets = [single_final + d for d in (0.3, 0.15, 0.0)]
    print("\ntime to eval loss (training s, median [min, max]; '-': not reached)")
    print(f"{'target':>8}" + "".join(f"{name:>22}" for name in runs))
    medians: dict[str, dict[float, float | None]] = {name: {} for name in runs}
    for target in targets:
        cells = []
        for name, curves in runs.items():
            times = [time_to(c, target) for c in curves]
            reached = [t for t in times if t is not None]
            if len(reached) < len(times):
                cells.append(f"{'-':>22}")
                medians[name][target] = None
                continue
            median = statistics.median(reached)
            medians[name][target] = median
            cells.append(f"{median:>10.1f} [{min(reached):.1f}, {max(reached):.1f}]".rjust(22))
        print(f"{target:>8.4f}" + "".join(cells))
    d, s, p = (medians[n][single_final] for n in ("DiLoCo", "single", "DDP"))
    if d is not None and s is not None and p is not None:
        print(
            f"\nto the single worker's final loss: DiLoCo {s / d:.2f}x faster than one worker "
            f"(target >= 1.6), {d / p:.2f}x DDP's time (target <= 1.15)"
        )
    else:
        print("\nDiLoCo or DDP did not reach the single worker's final loss in every run")


if __name__ == "__main__":
    main()
