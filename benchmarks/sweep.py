"""A sweep of DiLoCo's hyperparameters, and DDP's learning rate on the same grid, at
the demo's scale, in one run.

    python benchmarks/sweep.py [--steps 1600] [--h 50,100] [--inner-lr 0.004,0.008]
        [--warmup 0,100] [--outer averaging,nesterov:0.4,nesterov:0.7,nesterov:1.0]
        [--momentum 0.9] [--ddp-lr LRS] [--ddp-warmup STEPS] [--only ddp|diloco]

The published settings (H=500, Nesterov outer lr 0.7, momentum 0.9) are for long runs
of large models; the Scaling Laws for DiLoCo paper (arXiv:2503.09799) reports how the
best outer learning rate and H move with scale and replica count. This runs fleet's
DiLoCo (2 replicas, one CPU worker each, the charlm example of benchmarks/vs_ddp.py)
for the same inner steps per replica at every point of a grid of H, outer optimizer
(``averaging``: SGD lr 1, no momentum; ``nesterov:LR``: Nesterov with ``--momentum``),
inner learning rate and linear learning-rate warm-up (charlm's ``warmup_steps``); and,
so DDP is tuned as fairly as DiLoCo, DDP (benchmarks/vs_ddp.py's: 2 processes over
gloo, the same data order) for the same steps at every point of the same learning-rate
and warm-up grid (``--ddp-lr``, ``--ddp-warmup``: by default ``--inner-lr`` and
``--warmup``). Every point is evaluated once, at the end, on vs_ddp.py's 8,192 held-out
windows. Prints each point's eval loss with its standard error and its training
seconds (vs_ddp.py's clock: wall clock less the evaluations, timed warm), best first,
and the best DiLoCo point's gap to the best DDP point (in % of DDP's loss, ± the
standard error propagated from both losses').
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from fleet.client import Fleet
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_ddp import CHARLM, REPO, data_parallel, diloco, gap, outer_of, warm_up, with_lr

Row = tuple[float, float, float, str]
"""``(eval loss, its standard error, training seconds, the point)``."""


def _floats(value: str) -> list[float]:
    return [float(x) for x in value.split(",") if x]


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x]


def _cell(seconds: float, loss: float, stderr: float) -> str:
    return f"{loss:.4f} ± {stderr:.4f}, {seconds:.1f} s"


def sweep_ddp(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for lr in args.ddp_lr or args.inner_lr:
        for warmup in args.ddp_warmup if args.ddp_warmup is not None else args.warmup:
            port = 29700 + len(rows)
            config = with_lr(CHARLM, lr, warmup)
            curve = data_parallel(2, args.steps, args.steps, port, config)
            seconds, loss, stderr = curve[-1]
            point = f"DDP lr {lr:g} warm-up {warmup}"
            rows.append((loss, stderr, seconds, point))
            print(f"  {point}: {_cell(*curve[-1])}", flush=True)
    return rows


def sweep_diloco(args: argparse.Namespace) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-sweep-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    rows: list[Row] = []
    try:
        with running_workers(
            settings, [0, 1], work / "logs", pythonpath=[str(REPO)], cwd=REPO
        ) as procs:
            fleet = Fleet(settings)
            warm_up(fleet, [p.name for p in procs], with_lr(CHARLM, args.inner_lr[0], 0))
            for h in args.h:
                rounds = max(1, args.steps // h)
                for spec in args.outer:
                    outer = outer_of(spec, args.momentum)
                    for lr in args.inner_lr:
                        for warmup in args.warmup:
                            config = with_lr(CHARLM, lr, warmup)
                            curve, _ = diloco(fleet, rounds, h, config, outer, eval_every=rounds)
                            seconds, loss, stderr = curve[-1]
                            point = f"DiLoCo H={h} {spec} lr {lr:g} warm-up {warmup}"
                            rows.append((loss, stderr, seconds, point))
                            print(f"  {point}: {_cell(*curve[-1])}", flush=True)
            fleet.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1600, help="steps per process")
    parser.add_argument("--h", type=_ints, default=[50, 100])
    parser.add_argument("--inner-lr", type=_floats, default=[0.004, 0.008])
    parser.add_argument("--warmup", type=_ints, default=[0, 100], help="lr warm-up steps")
    parser.add_argument(
        "--outer",
        type=lambda v: [x for x in v.split(",") if x],
        default=["averaging", "nesterov:0.4", "nesterov:0.7", "nesterov:1.0"],
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="Nesterov's")
    parser.add_argument("--ddp-lr", type=_floats, default=None, help="default: --inner-lr")
    parser.add_argument("--ddp-warmup", type=_ints, default=None, help="default: --warmup")
    parser.add_argument("--only", choices=["ddp", "diloco"], default=None)
    args = parser.parse_args()

    ddp = sweep_ddp(args) if args.only != "diloco" else []
    ours = sweep_diloco(args) if args.only != "ddp" else []

    print(
        f"\ncharlm, {args.steps} steps per process (DiLoCo: 2 replicas, int8 "
        "pseudo-gradients; DDP: 2 processes); best first; training s: wall clock less the "
        "evaluations"
    )
    print(f"{'point':>46}{'eval loss':>11}{'± s.e.':>8}{'train s':>9}")
    for loss, stderr, seconds, point in sorted(ddp) + sorted(ours):
        print(f"{point:>46}{loss:>11.4f}{stderr:>8.4f}{seconds:>9.1f}")
    if ddp and ours:
        best_ddp, best = min(ddp), min(ours)
        pct, se = gap(best[0], best[1], best_ddp[0], best_ddp[1])
        print(
            f"best DiLoCo ({best[3]}) vs best DDP ({best_ddp[3]}): "
            f"{pct:+.2f} ± {se:.2f} % (target: within 0.7 %)"
        )


if __name__ == "__main__":
    main()
