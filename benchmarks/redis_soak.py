"""Redis memory under a soak of calls: is it bounded? Measured in one run.

    python benchmarks/redis_soak.py [--calls 10000] [--unread 500] [--workers 2]

Starts a private redis-server and ``--workers`` fleet CPU workers, then:

1. sends ``--calls`` calls (``hello``, 200 in flight at a time) and reads every result;
2. sends ``--unread`` more whose results nobody reads (a caller that died);
3. runs a small DiLoCo job (the digits example, 2 replicas, 3 rounds) and ends it.

It prints Redis's ``used_memory`` and key count after start-up, after (1), after (2)
and after (3), the keys left by kind, the bytes one unread result costs, and the
bound that follows: read results are deleted at once, an unread call result lives
``FLEET_CALL_RESULT_EXPIRES_S`` (1 h), a long task's ``FLEET_RESULT_EXPIRES_S`` (1 day),
so at a steady call rate Redis holds at most rate x expiry x result size; a job keeps
its own records (rounds, metrics, logs) until ``fleet gc``/deleted, and its task set is
empty once it ends. Target (issue 12): (1) leaves no key and < 1 MiB behind.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.local import RedisServer, running_workers
from fleet.settings import FleetSettings

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def snapshot(client: Any) -> tuple[int, int]:
    """(used_memory bytes, number of keys)."""
    return int(client.info("memory")["used_memory"]), int(client.dbsize())


def kinds(client: Any) -> Counter[str]:
    """Keys by kind: the prefix up to the first id-like part."""
    out: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        if key.startswith("celery-task-meta-"):
            out["celery-task-meta-*"] += 1
        elif key.startswith("_kombu.binding."):
            out["_kombu.binding.*"] += 1
        else:
            parts = key.split(":")
            out[":".join(parts[:2]) + (":*" if len(parts) > 2 else "")] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--unread", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-soak-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    rows: list[tuple[str, int, int]] = []
    try:
        with running_workers(
            settings,
            list(range(args.workers)),
            work / "logs",
            workload="fleet.examples.digits:make",
            pythonpath=[str(REPO)],
            cwd=REPO,
        ):
            fleet = Fleet(settings)
            redis = fleet.registry.redis
            fleet.hello()
            rows.append(("after start-up", *snapshot(redis)))

            started = time.perf_counter()
            sent = 0
            while sent < args.calls:
                batch = min(args.in_flight, args.calls - sent)
                futures = [fleet.hello(wait=False) for _ in range(batch)]
                for future in futures:
                    future.result(timeout_s=300)
                sent += batch
            soak_s = time.perf_counter() - started
            rows.append((f"after {args.calls} calls, read", *snapshot(redis)))
            left_after_read = kinds(redis)

            before_unread = snapshot(redis)
            futures = [fleet.hello(wait=False) for _ in range(args.unread)]
            while any(not f.ready() for f in futures):
                time.sleep(0.05)
            after_unread = snapshot(redis)
            rows.append((f"after {args.unread} calls, unread", *after_unread))
            per_result = (after_unread[0] - before_unread[0]) / max(args.unread, 1)
            ttls = [redis.ttl(f"celery-task-meta-{f.task_id}") for f in futures[:20]]

            config = DiLoCoConfig(
                workload="fleet.examples.digits:make",
                replicas=2,
                rounds=3,
                inner_steps=20,
                eval_every=1,
            )
            run = DiLoCoRun.start(fleet, config)
            job = run.run()
            tracked = run.jobs.tracked_tasks(run.job_id)
            unread = {f"celery-task-meta-{f.task_id}" for f in futures}
            job_results = Counter(
                json.loads(redis.get(key) or "{}").get("name") or "?"
                for key in redis.scan_iter("celery-task-meta-*", count=1000)
                if key not in unread
            )
            rows.append((f"after a DiLoCo job ({job.status})", *snapshot(redis)))
            final_kinds = kinds(redis)
            fleet.close()
    finally:
        server.stop()

    rate = args.calls / soak_s
    print(
        f"Redis soak: {args.calls} hello calls over {args.workers} workers in {soak_s:.1f} s "
        f"({rate:.0f} calls/s), private redis-server"
    )
    print(f"{'':36}{'used_memory MiB':>17}{'keys':>8}")
    for label, used, n in rows:
        print(f"{label:36}{used / MIB:>17.2f}{n:>8}")
    start_used, start_keys = rows[0][1], rows[0][2]
    grown = rows[1][1] - start_used
    metas = left_after_read["celery-task-meta-*"]
    verdict = "ok" if metas == 0 and grown < MIB else "OVER"
    print(
        f"calls read: {rows[1][2] - start_keys:+d} keys ({metas} results), "
        f"{grown / 1024:+.1f} KiB ({verdict}: target no result left, < 1 MiB)"
    )
    print(f"keys left after the read calls: {dict(left_after_read)}")
    print(
        f"an unread call result: {per_result:.0f} B, expires in {max(ttls)} s "
        f"(FLEET_CALL_RESULT_EXPIRES_S={settings.call_result_expires_s:.0f})"
    )
    bound = rate * settings.call_result_expires_s * per_result
    print(
        f"bound for callers that never read, at {rate:.0f} calls/s: "
        f"{rate:.0f} x {settings.call_result_expires_s:.0f} s x {per_result:.0f} B = "
        f"{bound / MIB:.0f} MiB (all calls unread; read ones cost nothing)"
    )
    print(f"DiLoCo job task set after the job: {len(tracked)} ids")
    print(f"results the job left to expire: {dict(job_results)}")
    print(f"keys after the job: {dict(final_kinds)}")


if __name__ == "__main__":
    main()
