"""Overhead of a DiLoCo round on the fleet, measured in one run.

    python benchmarks/diloco_round.py [--rounds 4] [--inner-steps 50] [--workload SPEC]
    python benchmarks/diloco_round.py --overlap --rounds 10      # and overlapped

Starts a private redis-server and one CPU worker per replica (one torch thread each),
runs DiLoCo with N=2 replicas and H inner steps on the charlm example (byte-level
transformer on the stdlib sources), and prints per round:

- wall: from launching the replicas to the committed new global model;
- max compute: the slowest merged replica's time in its inner steps (on the worker);
- exchange: pack traffic on the critical path: the slowest replica's input-pack load
  plus output-pack write, plus the outer step (a task on a worker: read N+2 packs,
  write 2, streamed), as the orchestrator waited for it (dispatch included);
- overhead = (wall - max compute) / wall.

Round 0 also builds the workload on each worker (corpus load, model init); the target
(issue 4: overhead <= 10% of the round) is checked on the median of rounds 1..R-1.

With ``--overlap`` the same rounds run again overlapped (``DiLoCoConfig.overlap``: each
outer step beside the next round's inner steps, eager updates), the wall of a round
then being from its launch to the next round's, and both runs evaluate the last
round's global model. Target (issue 16): overlapped overhead <= 0.3 %, final eval loss
within 1 % of the synchronous run's.
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
from fleet.tracking import with_stderr

REPO = Path(__file__).resolve().parents[1]


def _table(label: str, rounds: list[RoundRecord], skip_last: bool) -> list[float]:
    """Print the per-round table; the overheads of rounds 1.. (without the last one, whose
    outer step an overlapped run runs on its own)."""
    print(f"\n{label}")
    print(
        f"{'round':>5}{'wall s':>9}{'max compute s':>15}{'exchange s':>12}"
        f"{'merge s':>9}{'overhead':>10}"
    )
    overheads = []
    for m in rounds:
        compute = max(r.compute_s for r in m.merged)
        exchange = max(r.load_s + r.publish_s for r in m.merged) + m.merge_s
        overhead = (m.wall_s - compute) / m.wall_s
        if m.round > 0 and not (skip_last and m.round == len(rounds) - 1):
            overheads.append(overhead)
        print(
            f"{m.round:>5}{m.wall_s:>9.3f}{compute:>15.3f}{exchange:>12.4f}{m.merge_s:>9.4f}"
            f"{100 * overhead:>9.1f}%"
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
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="also run the same rounds overlapped (eager updates) and compare",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-diloco-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    runs: dict[bool, list[RoundRecord]] = {}
    try:
        with running_workers(
            settings, list(range(args.replicas)), work / "logs", pythonpath=[str(REPO)], cwd=REPO
        ):
            fleet = Fleet(settings)
            for overlap in (False, True) if args.overlap else (False,):
                config = DiLoCoConfig(
                    workload=args.workload,
                    config=json.loads(args.config_json),
                    replicas=args.replicas,
                    rounds=args.rounds,
                    inner_steps=args.inner_steps,
                    eval_every=args.rounds if args.overlap else 0,  # the last round only
                    overlap=overlap,
                )
                run = DiLoCoRun.start(fleet, config)
                run.run()
                runs[overlap] = run.rounds()
            fleet.close()
    finally:
        server.stop()

    print(
        f"DiLoCo {args.workload}: N={args.replicas}, H={args.inner_steps}, {args.rounds} rounds, "
        f"one CPU worker per replica (1 torch thread), private redis-server"
    )
    medians = {}
    for overlap, rounds in runs.items():
        label = "overlapped (eager updates)" if overlap else "synchronous"
        overheads = _table(label, rounds, skip_last=overlap)
        if overheads:
            medians[overlap] = statistics.median(overheads)
            walls = [m.wall_s for m in rounds[1 : len(rounds) - overlap]]
            print(
                f"median overhead, rounds 1..: {100 * medians[overlap]:.2f}%; "
                f"mean round wall {statistics.mean(walls):.3f}s"
            )
    if False in medians and not args.overlap:
        verdict = "ok" if medians[False] <= 0.10 else "MISSED"
        print(f"(target <= 10%: {verdict})")
    if args.overlap and True in medians:
        evals = {o: r[-1].eval for o, r in runs.items()}
        losses = {o: e.loss if e else None for o, e in evals.items()}
        sync, over = losses[False], losses[True]
        shown = {o: with_stderr(e.loss, e.loss_stderr) if e else "-" for o, e in evals.items()}
        print(f"\nfinal eval loss: synchronous {shown[False]}, overlapped {shown[True]}")
        if sync is not None and over is not None:
            rel = (over - sync) / sync
            verdict = "ok" if medians[True] <= 0.003 and abs(rel) <= 0.01 else "MISSED"
            print(
                f"overlapped: overhead {100 * medians[True]:.2f}% "
                f"(sync {100 * medians[False]:.2f}%), loss {100 * rel:+.2f}% "
                f"(target: <= 0.3% and within 1%: {verdict})"
            )


if __name__ == "__main__":
    main()
