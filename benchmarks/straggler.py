"""Round deadlines with a straggler, in one run: waiting for all, fixed deadlines, and
the adaptive deadline (fleet.diloco.deadline), at equal wall-clock time.

    python benchmarks/straggler.py [--budget-s 25] [--inner-steps 20]

Starts a private redis-server and two CPU workers and runs DiLoCo (2 replicas) on the
burn_p2p-style test workload (fleet/testing/shard_workload.py: a digits MLP reading its
microshards from shard_paths), whose ``straggler`` knob makes replica 1's steps 3x
slower in a random 40 % of rounds (the same rounds for every run). Each run stops at
the round that reaches ``--budget-s`` seconds; prints its rounds, mean round seconds,
replicas cut by the deadline, and the eval loss of the last round within the budget.

Target (issue 16): the adaptive deadline within 10 % of the best fixed deadline
(chosen after the fact), with no hand-set number.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun, QuorumConfig
from fleet.diloco.config import AdaptiveDeadlineConfig, DatasetConfig
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings
from fleet.testing.shard_workload import write_shards

REPO = Path(__file__).resolve().parents[1]

STEP_SLEEP_S = 0.02


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-s", type=float, default=25.0)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    slow_rounds = [r for r in range(1000) if rng.random() < 0.4]
    normal_s = args.inner_steps * STEP_SLEEP_S
    modes: list[tuple[str, QuorumConfig]] = [
        ("wait for all", QuorumConfig(adaptive_deadline=AdaptiveDeadlineConfig(enabled=False)))
    ]
    for factor in (1.2, 1.5, 2.0, 2.5):
        deadline = round(factor * normal_s, 3)
        modes.append(
            (
                f"fixed {deadline:.2f} s",
                QuorumConfig(
                    round_deadline_s=deadline,
                    adaptive_deadline=AdaptiveDeadlineConfig(enabled=False),
                ),
            )
        )
    modes.append(("adaptive (default)", QuorumConfig()))
    modes.append(
        (
            "adaptive --adaptive-deadline",
            QuorumConfig(adaptive_deadline=AdaptiveDeadlineConfig(tight=True)),
        )
    )

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-straggler-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(
        redis_url=server.url,
        shared_root=work / "shared",
        node="bench",
        workload_allowlist=["fleet.testing.*"],
    )
    write_shards(work / "shared" / "datasets" / "digits", 24)
    rows = []
    try:
        with running_workers(settings, [0, 1], work / "logs", pythonpath=[str(REPO)], cwd=REPO):
            fleet = Fleet(settings)
            # a short run first, not measured: the workers build the workload and load
            # its data once, so the first mode measured pays no start-up cost
            DiLoCoRun.start(
                fleet,
                DiLoCoConfig(
                    workload="fleet.testing.shard_workload:make",
                    config={"step_sleep_s": STEP_SLEEP_S},
                    replicas=2,
                    rounds=2,
                    inner_steps=args.inner_steps,
                    dataset=DatasetConfig(path="datasets/digits", microshards_per_lease=2),
                ),
            ).run()
            for name, quorum in modes:
                config = DiLoCoConfig(
                    workload="fleet.testing.shard_workload:make",
                    config={
                        "step_sleep_s": STEP_SLEEP_S,
                        "straggler": {"replica": 1, "factor": 3, "rounds": slow_rounds},
                    },
                    replicas=2,
                    rounds=10_000,
                    inner_steps=args.inner_steps,
                    max_wall_s=args.budget_s,
                    quorum=quorum,
                    dataset=DatasetConfig(
                        path="datasets/digits", microshards_per_lease=2, batch_kind="micro_epoch"
                    ),
                )
                run = DiLoCoRun.start(fleet, config)
                run.run()
                state = run.state()
                assert state is not None
                rounds = [
                    r
                    for r in run.rounds()
                    if r.started_at + r.wall_s - state.started_at <= args.budget_s
                ]
                loss = next(r.eval.loss for r in reversed(rounds) if r.eval and r.eval.loss)
                cut = sum(1 for r in rounds for o in r.replicas if o.status == "aborted")
                rows.append(
                    (name, len(rounds), statistics.mean(r.wall_s for r in rounds), cut, loss)
                )
                print(f"  {name}: {len(rounds)} rounds, loss {loss:.4f}", flush=True)
            fleet.close()
    finally:
        server.stop()

    print(
        f"\nDiLoCo, 2 replicas, H={args.inner_steps}, {STEP_SLEEP_S * 1000:.0f} ms steps; "
        "replica 1 "
        f"3x slower in 40 % of rounds; {args.budget_s:.0f} s of wall-clock per run"
    )
    print(f"{'mode':>30}{'rounds':>8}{'mean round s':>14}{'cut':>5}{'eval loss':>11}")
    for name, n, mean_s, cut, loss in rows:
        print(f"{name:>30}{n:>8}{mean_s:>14.3f}{cut:>5}{loss:>11.4f}")
    fixed = [r for r in rows if r[0].startswith("fixed")]
    best = min(fixed, key=lambda r: r[4])
    for row in rows:
        if row[0].startswith("adaptive"):
            gap = (row[4] - best[4]) / best[4]
            print(f"{row[0]}: {100 * gap:+.1f}% loss vs the best fixed deadline ({best[0]})")


if __name__ == "__main__":
    main()
