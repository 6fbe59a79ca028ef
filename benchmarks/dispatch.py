"""Dispatch overhead of fleet's client and task layer over bare Celery, in one run.

    python benchmarks/dispatch.py [--calls 300] [--queued 2000]

Starts a private redis-server and one fleet CPU worker, then measures, interleaved:

- round trip of ``Fleet.hello()`` against a bare Celery task on the same broker and
  worker (``celery.accumulate``, Celery's built-in identity task): p50 and p99;
- throughput of ``--queued`` calls sent at once and then collected (tasks/s).

Targets (issue 3): fleet/bare round-trip ratio <= 1.2, throughput >= 0.8 x bare.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fleet.client import Fleet
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=300, help="round trips per method")
    parser.add_argument("--queued", type=int, default=2000, help="calls in the throughput test")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-dispatch-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    try:
        with running_workers(settings, [0], work / "logs"):
            fleet = Fleet(settings)
            queue = settings.pool_queue

            def fleet_call() -> object:
                return fleet.hello()

            def bare_call() -> object:
                return fleet.app.send_task("celery.accumulate", args=(1,), queue=queue).get(
                    timeout=60
                )

            def fleet_batch(n: int) -> None:
                futures = [fleet.hello(wait=False) for _ in range(n)]
                for f in futures:
                    f.result(timeout_s=300)

            def bare_batch(n: int) -> None:
                results = [
                    fleet.app.send_task("celery.accumulate", args=(1,), queue=queue)
                    for _ in range(n)
                ]
                for r in results:
                    r.get(timeout=300)

            for _ in range(30):  # warm up connections, the worker's caches and the pool
                fleet_call()
                bare_call()
            latencies: dict[str, list[float]] = {"fleet": [], "bare": []}
            calls: dict[str, Callable[[], object]] = {"fleet": fleet_call, "bare": bare_call}
            for _ in range(args.calls):
                for name, fn in calls.items():
                    start = time.perf_counter()
                    fn()
                    latencies[name].append(time.perf_counter() - start)
            throughput: dict[str, list[float]] = {"fleet": [], "bare": []}
            batches = {"fleet": fleet_batch, "bare": bare_batch}
            for _ in range(2):
                for name, batch in batches.items():
                    start = time.perf_counter()
                    batch(args.queued)
                    throughput[name].append(args.queued / (time.perf_counter() - start))
            fleet.close()
    finally:
        server.stop()

    print(
        f"one CPU worker (prefork, concurrency 1), private redis-server; {args.calls} round trips "
        f"each, interleaved; throughput over {args.queued} queued calls, best of 2"
    )
    print(f"{'':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'tasks/s':>10}")
    for name in ("fleet", "bare"):
        lat = latencies[name]
        print(
            f"{name:<10}{1e3 * percentile(lat, 0.5):>10.2f}{1e3 * percentile(lat, 0.99):>10.2f}"
            f"{1e3 * statistics.mean(lat):>10.2f}{max(throughput[name]):>10.1f}"
        )
    p50 = percentile(latencies["fleet"], 0.5) / percentile(latencies["bare"], 0.5)
    p99 = percentile(latencies["fleet"], 0.99) / percentile(latencies["bare"], 0.99)
    tput = max(throughput["fleet"]) / max(throughput["bare"])
    print(f"\n{'ratio':<36}{'value':>8}  target")
    for label, value in (
        ("round trip p50, fleet / bare", p50),
        ("round trip p99, fleet / bare", p99),
    ):
        print(f"{label:<36}{value:>8.2f}  <= 1.2 {'ok' if value <= 1.2 else 'MISSED'}")
    print(
        f"{'throughput, fleet / bare':<36}{tput:>8.2f}  >= 0.8 {'ok' if tput >= 0.8 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
