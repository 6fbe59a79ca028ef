"""A small sweep of DiLoCo's hyperparameters at the demo's scale, in one run.

    python benchmarks/sweep.py [--steps 400] [--h 20,50,100] [--inner-lr 0.002,0.004]

The published settings (H=500, Nesterov outer lr 0.7, momentum 0.9) are for long runs
of large models; the Scaling Laws for DiLoCo paper (arXiv:2503.09799) reports how the
best outer learning rate and H move with scale and replica count. This runs fleet's
DiLoCo (2 replicas, one CPU worker each, the charlm example of benchmarks/vs_ddp.py)
for the same inner steps per replica at every point of a grid of H, outer optimizer
and inner learning rate, and prints each point's final eval loss with its standard
error and its training seconds (evaluation time taken out), best first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_ddp import CHARLM, REPO

OUTER = {
    "nesterov 0.7/0.9": OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9),
    "nesterov 0.4/0.9": OuterOptimizerConfig(name="nesterov", lr=0.4, momentum=0.9),
    "averaging (sgd 1/0)": OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
}


def run_point(fleet: Fleet, h: int, steps: int, outer: OuterOptimizerConfig, lr: float) -> Any:
    run = DiLoCoRun.start(
        fleet,
        DiLoCoConfig(
            workload="fleet.examples.charlm:make",
            config={**CHARLM, "lr": lr},
            replicas=2,
            rounds=max(1, steps // h),
            inner_steps=h,
            outer=outer,
            eval_every=max(1, steps // h),  # the last round only
        ),
    )
    run.run()
    rounds = run.rounds()
    final = rounds[-1].eval
    assert final is not None and final.loss is not None
    trained_s = sum(r.wall_s - r.eval_s for r in rounds)
    return final.loss, final.loss_stderr or 0.0, trained_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400, help="inner steps per replica")
    parser.add_argument("--h", default="20,50,100")
    parser.add_argument("--inner-lr", default="0.002,0.004")
    args = parser.parse_args()
    hs = [int(x) for x in args.h.split(",")]
    lrs = [float(x) for x in args.inner_lr.split(",")]

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-sweep-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    rows = []
    try:
        with running_workers(settings, [0, 1], work / "logs", pythonpath=[str(REPO)], cwd=REPO):
            fleet = Fleet(settings)
            for h in hs:
                for name, outer in OUTER.items():
                    for lr in lrs:
                        loss, stderr, seconds = run_point(fleet, h, args.steps, outer, lr)
                        rows.append((loss, stderr, seconds, h, name, lr))
                        print(f"  H={h} {name} inner lr {lr}: {loss:.4f}", flush=True)
            fleet.close()
    finally:
        server.stop()

    print(f"\nDiLoCo charlm, 2 replicas, {args.steps} inner steps per replica; best first")
    print(f"{'H':>5}{'outer':>22}{'inner lr':>10}{'eval loss':>11}{'± s.e.':>8}{'train s':>9}")
    for loss, stderr, seconds, h, name, lr in sorted(rows):
        print(f"{h:>5}{name:>22}{lr:>10.4f}{loss:>11.4f}{stderr:>8.4f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
