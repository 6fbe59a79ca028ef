"""DiLoCo across hosts: what a round exchanges and what the exchange costs, per link rate.

    sudo python benchmarks/multi_host.py [--models charlm,25M,100M] [--rates 1000,100,20]
                                         [--roots s3,local] [--rounds 3]
                                         [--rtt-ms 0,50,150] [--fragments 1,4]
                                         [--delay-steps 0,2] [--inner-steps H]

Hosts are Linux namespaces (fleet/testing/hosts.py): a storage host with Redis and a real S3
server (SeaweedFS), two worker hosts with private tmpfs caches, every host's link
limited to the rate with tbf (no netem on this kernel: bandwidth only). With
``--rtt-ms``, every host reaches Redis and S3 through the delay element on the storage
host (a TCP proxy adding that round-trip time, fleet/testing/delay_proxy.py), for each RTT in
turn; without it, directly (the ``rtt`` column shows ``-``). The orchestrator is this
process. For each model, shared root, rate and RTT, one DiLoCo job (2 replicas, the
charlm microshard dataset, no eval) and, per round:

- bytes sent and received on each worker host's link (its ``eth0`` counters: what the
  wire carried, TCP and HTTP headers included), and per parameter: the busiest host's
  (sent + received) / P, the figure DiLoCo's exchange is judged by;
- the same as the workers' stores counted it (the round record's ``bytes_per_parameter``);
- exchange time: the round's period (from the previous round's commit to its own; for
  round 0 its wall) minus the slowest replica's inner steps (its compute);
- overhead = (period - slowest inner steps) / period, and the H at which that
  exchange would be 10 % of the round (``9 * exchange / seconds per inner step``);
- the workers' peak resident memory (``getrusage`` in the process that trains).
- S3 requests: what the S3 server answered for the bucket during the round, from all
  hosts (its own counter; 0 on a local root); Redis commands: what Redis ran during the
  round (``INFO commandstats``), from all hosts: each a round trip at the RTT shown.

Roots: ``s3`` (``s3://bucket/...`` on the storage host: packs, momentum, optimizer
states and shards cross the links) against ``local`` (a directory both hosts see, as a
local disk or an NFS mount with no network cost: only Redis crosses the links). Models:
``charlm`` (fleet.examples.charlm's default size), ``25M`` (charlm at d_model 512, 8
layers: about 25M parameters, 100 MB packs) and ``100M`` (d_model 768, 14 layers: about
100M parameters, GPT-2-small's size without its vocabulary). Round 0 (the first fetch
of the dataset and of the initial model) is left out of the medians; each job starts
with empty worker caches. ``--fragments`` runs each row once per fragment count P
(Streaming DiLoCo, arXiv:2501.18512: round r sends fragment r mod P, 1/P of the model;
1: synchronous), shown in the ``P`` column, and with P > 1 once per ``--delay-steps``
tau (0: each round from the committed global model; > 0: rounds pipelined, the
previous round's fragment mixed in after tau inner steps), the ``tau`` column;
``--inner-steps`` overrides each model's H.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.client import Fleet  # noqa: E402
from fleet.diloco import DiLoCoConfig, DiLoCoRun  # noqa: E402
from fleet.diloco.config import DatasetConfig, StreamingConfig  # noqa: E402
from fleet.diloco.state import RoundRecord  # noqa: E402
from fleet.local import WorkerProcess  # noqa: E402
from fleet.registry import Registry  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402
from fleet.storage import open_store  # noqa: E402
from fleet.testing.hosts import Host, Network, StorageServices, skip_reason  # noqa: E402
from fleet.testing.seaweed import SeaweedS3  # noqa: E402

CHARLM = "fleet.examples.charlm:make"
MODELS: dict[str, tuple[dict[str, Any], int]] = {
    # (workload config, inner steps H): H sized so a round's compute is a few seconds
    "charlm": ({"max_corpus_mb": 4}, 50),
    "25M": (
        {"d_model": 512, "n_layers": 8, "n_heads": 8, "batch_size": 4, "max_corpus_mb": 4},
        6,
    ),
    "100M": (
        {
            "d_model": 768,
            "n_layers": 14,
            "n_heads": 12,
            "context": 64,
            "batch_size": 2,
            "max_corpus_mb": 4,
        },
        2,
    ),
}


def _settings(services: StorageServices, root: str, s3: SeaweedS3) -> FleetSettings:
    return FleetSettings(
        redis_url=services.redis_url,
        shared_root=root,
        storage_options=services.storage_options,  # s3's, or the delay proxy's
        workload_allowlist=["fleet.examples.*"],
        heartbeat_interval_s=1.0,
        heartbeat_ttl_s=30.0,
    )


def _run_job(
    settings: FleetSettings,
    hosts: list[Host],
    model: str,
    rounds: int,
    s3_requests: Callable[[], int] = lambda: 0,
    *,
    fragments: int = 1,
    inner_steps: int | None = None,
    delay_steps: int = 0,
) -> list[dict[str, Any]]:
    import redis

    config, steps = MODELS[model]
    steps = inner_steps or steps
    counters = {h.name: h.counters() for h in hosts}
    per_round: list[dict[str, Any]] = []
    requests = [s3_requests()]
    stats = redis.Redis.from_url(settings.redis_url)

    def commands() -> int:
        return sum(int(v["calls"]) for v in stats.info("commandstats").values())

    redis_commands = [commands()]
    ends: list[float] = []

    def on_round(record: RoundRecord) -> None:
        # a round's period: from the previous round's commit to its own (pipelined
        # rounds overlap: their own wall clocks would count the overlap twice)
        ends.append(record.started_at + record.wall_s)
        wall_s = ends[-1] - ends[-2] if len(ends) > 1 else record.wall_s
        now = {h.name: h.counters() for h in hosts}
        requests.append(s3_requests())
        redis_commands.append(commands())
        merged = record.merged
        slowest = max(r.compute_s for r in merged)
        per_step = max(r.compute_s / max(r.steps_completed or 1, 1) for r in merged)
        moved = {
            name: (now[name][0] - counters[name][0], now[name][1] - counters[name][1])
            for name in now
        }
        params = record.parameter_count
        per_round.append(
            {
                "round": record.round,
                "wall_s": wall_s,
                "slowest_inner_s": slowest,
                "exchange_s": wall_s - slowest,
                # the exchange's parts on the slowest replica (in --json only)
                "load_s": max(r.load_s for r in merged),
                "encode_s": max(r.encode_s for r in merged),
                "publish_s": max(r.publish_s for r in merged),
                "outer_step_s": record.outer_step_s,
                "overhead": (wall_s - slowest) / wall_s,
                "h_for_10pct": 9 * (wall_s - slowest) / per_step,
                "late_mix_s": max(r.late_mix_s for r in merged),
                "bytes": moved,
                "link_bytes_per_param": max(sum(v) for v in moved.values()) / params,
                "store_bytes_per_param": record.bytes_per_parameter or 0.0,
                "peak_rss_mb": max(r.peak_rss_bytes for r in merged) / 1e6,
                "parameters": params,
                "s3_requests": requests[-1] - requests[-2],
                "redis_commands": redis_commands[-1] - redis_commands[-2],
            }
        )
        counters.update(now)

    fleet = Fleet(settings)
    try:
        cfg = DiLoCoConfig(
            workload=CHARLM,
            config=config,
            replicas=2,
            rounds=rounds,
            inner_steps=steps,
            eval_every=0,
            dataset=DatasetConfig(path="data/charlm", microshards_per_lease=2),
            replica_call_timeout_s=1800,
            streaming=StreamingConfig(fragments=fragments, delay_steps=delay_steps)
            if fragments > 1
            else None,
        )
        job = DiLoCoRun.start(fleet, cfg, on_round=on_round).run()
        if job.status != "completed":
            raise RuntimeError(f"job {job.job_id} {job.status}: {job.error}")
    finally:
        fleet.close()
    return per_round


def _workers(settings: FleetSettings, hosts: list[Host], logs: Path) -> list[WorkerProcess]:
    procs = [
        WorkerProcess(
            settings.model_copy(update={"node": h.name, "cache_dir": h.local_dir / "cache"}),
            0,
            logs / h.name,
            workload=CHARLM,
            pythonpath=[str(REPO)],
            cwd=REPO,
            command_prefix=h.prefix,
        )
        for h in hosts
    ]
    registry = Registry.from_settings(settings)
    for proc in procs:
        proc.wait_alive(registry, timeout_s=120)
    return procs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="charlm,25M,100M")
    parser.add_argument("--rates", default="1000,100,20", help="link rates, Mbit/s")
    parser.add_argument("--roots", default="s3,local")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rtt-ms", default="", help="round-trip times to Redis and S3, ms (e.g. 0,50,150)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--fragments", default="1", help="Streaming DiLoCo P values, e.g. 1,4")
    parser.add_argument("--inner-steps", type=int, default=None, help="H (default: per model)")
    parser.add_argument(
        "--delay-steps",
        default="0",
        help="Streaming DiLoCo tau values (pipelined rounds when > 0), e.g. 0,2",
    )
    args = parser.parse_args()
    rtts: list[float | None] = [float(r) for r in args.rtt_ms.split(",") if r] or [None]
    reason = skip_reason()
    if reason:
        sys.exit(f"cannot make hosts here: {reason}")
    base = Path(tempfile.mkdtemp(prefix="fleet-bench-hosts-"))
    network = Network(base / "net")
    rows: list[dict[str, Any]] = []
    services = None
    try:
        storage = network.host("storage")
        workers = [network.host("w1"), network.host("w2")]
        # SeaweedFS's volumes on disk: the 25M runs write GBs (a host's tmpfs is RAM)
        services = StorageServices(storage, base, data_dir=base / "weed", rtt_ms=rtts[0])
        assert services.s3 is not None
        s3 = services.s3
        bucket = s3.new_bucket()
        print(
            "DiLoCo across 2 worker hosts, 2 replicas, every link tbf-limited, Redis and "
            f"S3 at the RTT shown; medians over rounds 1..{args.rounds - 1}",
            flush=True,
        )
        header = (
            f"{'model':>6} {'params':>7} {'root':>5} {'link':>9} {'rtt':>6} {'P':>2} {'tau':>3} "
            f"{'round s':>8} {'inner s':>8} {'exch s':>7} {'overhead':>8} {'H@10%':>6} "
            f"{'w1 tx/rx MB':>12} "
            f"{'w2 tx/rx MB':>12} {'B/param':>7} {'store B/p':>9} {'RSS MB':>7} {'S3 req':>6} "
            f"{'Redis cmd':>9}"
        )
        print(header, flush=True)
        for model in args.models.split(","):
            for root_kind in args.roots.split(","):
                if root_kind == "s3":
                    root = f"s3://{bucket}/{model}-{time.time_ns()}"
                else:  # a directory both hosts see (outside their private tmpfs)
                    root = str(base / f"shared-{model}")
                settings = _settings(services, root, s3)
                from fleet.examples.charlm import write_dataset

                with open_store(settings).output("data/charlm") as staged:
                    write_dataset(staged, 8, manifest=True)
                procs = _workers(settings, workers, base / "logs")
                try:
                    cases = [
                        (float(r), t, int(p), int(d))
                        for r in args.rates.split(",")
                        for t in rtts
                        for p in args.fragments.split(",")
                        for d in (args.delay_steps.split(",") if int(p) > 1 else ["0"])
                    ]
                    for rate, rtt, fragments, delay in cases:
                        for host in [storage, *workers]:
                            host.limit(rate)
                        if rtt is not None:
                            services.set_rtt(rtt)
                        for host in workers:  # every row starts cold: shards fetched again
                            host.run("rm", "-rf", str(host.local_dir / "cache"))
                        rounds = _run_job(
                            settings,
                            workers,
                            model,
                            args.rounds,
                            (lambda: s3.requests(bucket)) if root_kind == "s3" else lambda: 0,
                            fragments=fragments,
                            inner_steps=args.inner_steps,
                            delay_steps=delay,
                        )
                        later = rounds[1:] or rounds
                        keys = (
                            "wall_s", "slowest_inner_s", "exchange_s", "overhead",
                            "h_for_10pct", "link_bytes_per_param", "store_bytes_per_param",
                            "s3_requests", "redis_commands",
                        )  # fmt: skip
                        med = {k: statistics.median(r[k] for r in later) for k in keys}
                        mb = {
                            h.name: tuple(
                                statistics.median(r["bytes"][h.name][i] for r in later) / 1e6
                                for i in (0, 1)
                            )
                            for h in workers
                        }
                        row = {
                            "model": model,
                            "parameters": rounds[0]["parameters"],
                            "root": root_kind,
                            "link_mbit": rate,
                            "rtt_ms": rtt,
                            "fragments": fragments,
                            "delay_steps": delay,
                            **med,
                            "mb_per_round": mb,
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                            "rounds": rounds,
                        }
                        rows.append(row)
                        print(
                            f"{model:>6} {row['parameters'] / 1e6:>6.1f}M {root_kind:>5} "
                            f"{rate:>5.0f} Mb/s "
                            f"{'-' if rtt is None else f'{rtt:g}ms':>6} {fragments:>2} "
                            f"{delay:>3} "
                            f"{med['wall_s']:>8.2f} "
                            f"{med['slowest_inner_s']:>8.2f} {med['exchange_s']:>7.2f} "
                            f"{100 * med['overhead']:>7.1f}% {med['h_for_10pct']:>6.0f} "
                            f"{mb['w1'][0]:>5.1f}/{mb['w1'][1]:<6.1f} "
                            f"{mb['w2'][0]:>5.1f}/{mb['w2'][1]:<6.1f} "
                            f"{med['link_bytes_per_param']:>7.2f} "
                            f"{med['store_bytes_per_param']:>9.2f} {row['peak_rss_mb']:>7.0f} "
                            f"{med['s3_requests']:>6.0f} {med['redis_commands']:>9.0f}",
                            flush=True,
                        )
                finally:
                    for proc in procs:
                        proc.stop()
                    for host in [storage, *workers]:
                        host.limit(None)
    finally:
        if services is not None:
            services.close()
        network.close()
        shutil.rmtree(base / "weed", ignore_errors=True)  # GBs of volumes; logs stay
        print(f"logs: {base}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
