"""Pseudo-gradient codecs against the exact fp32 exchange, in one run.

    python benchmarks/compression.py [--rounds 20] [--inner-steps 20] [--replicas 2]

Starts a private redis-server and one CPU worker per replica (one torch thread each)
and runs DiLoCo on the charlm example (byte-level transformer on the stdlib sources)
once per codec of the pseudo-gradients: ``fp32`` (exact), ``fp16``, ``bf16`` and ``int8``,
the lossy ones with and without error feedback. Every run has the same seeds, data
order and placement (each replica keeps its worker), so the runs differ by the codec
alone. Prints, per run: the final eval loss with its standard error, its difference
from fp32's, and the bytes each replica uploaded per round (its worker's store counted
them: the pseudo-gradient, its manifest and its result record), with the ratio to
fp32's.

Target (issue 16): int8 with error feedback within 1 % of fp32's eval loss at 0.25-0.3x
the bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.diloco.config import PseudoGradientConfig
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

REPO = Path(__file__).resolve().parents[1]
#: A charlm small enough for 2 cores, with a held-out set large enough to compare runs.
CHARLM = {"d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, "batch_size": 16,
          "eval_windows": 512, "max_corpus_mb": 4}  # fmt: skip
RUNS = [("fp32", False), ("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True),
        ("int8", False), ("int8", True)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--config-json", default=json.dumps(CHARLM))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-compression-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    results = []
    try:
        with running_workers(
            settings, list(range(args.replicas)), work / "logs", pythonpath=[str(REPO)], cwd=REPO
        ):
            fleet = Fleet(settings)
            for codec, feedback in RUNS:
                config = DiLoCoConfig(
                    workload="fleet.examples.charlm:make",
                    config=json.loads(args.config_json),
                    replicas=args.replicas,
                    rounds=args.rounds,
                    inner_steps=args.inner_steps,
                    eval_every=args.rounds,
                    pseudo_gradient=PseudoGradientConfig(codec=codec, error_feedback=feedback),
                )
                run = DiLoCoRun.start(fleet, config)
                run.run()
                rounds = run.rounds()
                final = rounds[-1].eval
                assert final is not None and final.loss is not None
                stderr = float(final.metrics.get("loss_stderr", 0.0))
                nbytes = statistics.mean(o.sent_bytes for r in rounds for o in r.merged)
                results.append((codec, feedback, final.loss, stderr, nbytes))
                print(f"  {codec} ef={feedback}: loss {final.loss:.4f} ± {stderr:.4f}", flush=True)
            fleet.close()
    finally:
        server.stop()

    print(
        f"\nDiLoCo charlm {args.config_json}: N={args.replicas}, H={args.inner_steps}, "
        f"{args.rounds} rounds; one CPU worker per replica"
    )
    print(
        f"{'codec':>6}{'error fb':>10}{'eval loss':>11}{'± s.e.':>8}{'vs fp32':>9}"
        f"{'MB up':>10}{'bytes':>8}"
    )
    base_loss, base_bytes = results[0][2], results[0][4]
    for codec, feedback, loss, stderr, nbytes in results:
        print(
            f"{codec:>6}{('yes' if feedback else 'no') if codec != 'fp32' else '-':>10}"
            f"{loss:>11.4f}{stderr:>8.4f}{100 * (loss - base_loss) / base_loss:>+8.2f}%"
            f"{nbytes / 1e6:>10.3f}{nbytes / base_bytes:>7.3f}x"
        )
    int8 = next(r for r in results if r[0] == "int8" and r[1])
    within = abs(int8[2] - base_loss) / base_loss <= 0.01
    ratio = int8[4] / base_bytes
    verdict = "ok" if within and 0.25 <= ratio <= 0.3 else "MISSED"
    print(f"\nint8 + error feedback: {ratio:.3f}x the bytes, {within=}")
    print(f"(target: within 1 % of fp32's loss at 0.25-0.3x the bytes: {verdict})")


if __name__ == "__main__":
    main()
