"""Which outer optimizer is safe for a model fleet has never seen, in one run.

    python benchmarks/outer_defaults.py [--h 20,100] [--rounds 7] [--replicas 2]

Runs fleet's DiLoCo (CPU workers, one per replica) on a user's model that is not ours
(benchmarks/user_mlp.py: an MLP with AdamW at lr 1e-3 and a DataLoader, 4.5M
parameters) for each outer optimizer and H, every other setting at its default, and
prints the eval loss after every round with its standard error. A safe default is one
whose loss falls round after round on every row. The published Nesterov setting (lr
0.7, momentum 0.9; Douillard et al. 2023, arXiv:2311.08105) is for H=500 on large
language models.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from pathlib import Path

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

REPO = Path(__file__).resolve().parents[1]

OUTER = {
    "nesterov 0.7/0.9": OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9),
    "nesterov 0.4/0.9": OuterOptimizerConfig(name="nesterov", lr=0.4, momentum=0.9),
    "sgd 0.7/0.5": OuterOptimizerConfig(name="sgd", lr=0.7, momentum=0.5),
    "averaging (sgd 1/0)": OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
}


def curve(fleet: Fleet, outer: OuterOptimizerConfig, h: int, rounds: int, replicas: int):
    run = DiLoCoRun.start(
        fleet,
        DiLoCoConfig(
            workload="benchmarks.user_mlp:make",
            config={},
            replicas=replicas,
            rounds=rounds,
            inner_steps=h,
            outer=outer,
            eval_every=1,
        ),
    )
    run.run()
    state = run.state()
    assert state is not None and state.initial_eval is not None
    points = [(state.initial_eval.loss, state.initial_eval.loss_stderr)]
    for record in run.rounds():
        assert record.eval is not None
        points.append((record.eval.loss, record.eval.loss_stderr))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--h", default="20,100")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--outer", default=",".join(OUTER), help="names of OUTER")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-outer-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(
        redis_url=server.url,
        shared_root=work / "shared",
        node="bench",
        workload_allowlist=["benchmarks.*"],
    )
    rows = []
    try:
        slots = list(range(args.replicas))
        with running_workers(settings, slots, work / "logs", pythonpath=[str(REPO)], cwd=REPO):
            fleet = Fleet(settings)
            for h in [int(x) for x in args.h.split(",")]:
                for name in args.outer.split(","):
                    points = curve(fleet, OUTER[name], h, args.rounds, args.replicas)
                    rows.append((h, name, points))
                    print(f"  H={h} {name}: " + " ".join(f"{p[0]:.3f}" for p in points), flush=True)
            fleet.close()
    finally:
        server.stop()
    print(f"\nuser MLP (4.5M params, AdamW 1e-3), {args.replicas} replicas; eval loss by round")
    print(
        "| H | outer optimizer | initial | "
        + " | ".join(f"r{i}" for i in range(args.rounds))
        + " | rounds the loss rose |"
    )
    print("|---" * (args.rounds + 4) + "|")
    for h, name, points in rows:
        rises = sum(b[0] > a[0] for a, b in itertools.pairwise(points))
        cells = " | ".join(
            f"{loss:.3f}" + ("" if se is None or math.isnan(se) else f" ± {se:.3f}")
            for loss, se in points
        )
        print(f"| {h} | {name} | {cells} | {rises} |")


if __name__ == "__main__":
    main()
