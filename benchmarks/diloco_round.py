"""Overhead of a DiLoCo round on the fleet, measured in one run.

    python benchmarks/diloco_round.py [--rounds 4] [--inner-steps 50] [--workload SPEC]

Starts a private redis-server and one CPU worker per replica (one torch thread each),
runs DiLoCo with N=2 replicas and H inner steps on the charlm example (byte-level
transformer on the stdlib sources), and prints per round:

- wall: from launching the replicas to the committed new global model;
- max compute: the slowest merged replica's time in its inner steps (on the worker);
- exchange: what is on the critical path besides the inner steps: the slowest
  replica's load (its global model stepped to, its state) plus its pseudo-gradient
  encode and upload, plus the outer step (a task on a worker, as the orchestrator waited
  for it, dispatch included);
- overhead = (wall - max compute) / wall.

Round 0 also builds the workload on each worker (corpus load, model init); the target
(issue 4: overhead <= 10% of the round) is checked on the median of rounds 1..R-1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.diloco.state import RoundRecord
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

REPO = Path(__file__).resolve().parents[1]


def _table(rounds: list[RoundRecord]) -> list[float]:
    """Print the per-round table; the overheads of rounds 1.."""
    print(
        f"{'round':>5}{'wall s':>9}{'max compute s':>15}{'exchange s':>12}"
        f"{'outer s':>9}{'overhead':>10}"
    )
    overheads = []
    for m in rounds:
        compute = max(r.compute_s for r in m.merged)
        exchange = max(r.load_s + r.encode_s + r.publish_s for r in m.merged) + m.outer_step_s
        overhead = (m.wall_s - compute) / m.wall_s
        if m.round > 0:
            overheads.append(overhead)
        print(
            f"{m.round:>5}{m.wall_s:>9.3f}{compute:>15.3f}{exchange:>12.4f}"
            f"{m.outer_step_s:>9.4f}{100 * overhead:>9.1f}%"
        )
    return overheads


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workload", default="fleet.examples.charlm:make")
    parser.add_argument("--config-json", default="{}")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-diloco-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    try:
        with running_workers(
            settings, list(range(args.replicas)), work / "logs", pythonpath=[str(REPO)], cwd=REPO
        ):
            fleet = Fleet(settings)
            config = DiLoCoConfig(
                workload=args.workload,
                config=json.loads(args.config_json),
                replicas=args.replicas,
                rounds=args.rounds,
                inner_steps=args.inner_steps,
                eval_every=0,
            )
            run = DiLoCoRun.start(fleet, config)
            run.run()
            rounds = run.rounds()
            fleet.close()
    finally:
        server.stop()

    print(
        f"DiLoCo {args.workload}: N={args.replicas}, H={args.inner_steps}, {args.rounds} rounds, "
        f"one CPU worker per replica (1 torch thread), private redis-server"
    )
    overheads = _table(rounds)
    if overheads:
        median = statistics.median(overheads)
        walls = [m.wall_s for m in rounds[1:]]
        print(
            f"median overhead, rounds 1..: {100 * median:.2f}%; "
            f"mean round wall {statistics.mean(walls):.3f}s"
        )
        print(f"(target <= 10%: {'ok' if median <= 0.10 else 'MISSED'})")


if __name__ == "__main__":
    main()
