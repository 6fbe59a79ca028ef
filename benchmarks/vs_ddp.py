"""DiLoCo on the fleet against synchronous data parallel training (torch DDP) and one
worker alone: on one box, then across two hosts over slow links, in one run.

    python benchmarks/vs_ddp.py [--rounds 16] [--inner-steps 100] [--repeats 3]
        [--inner-lr 0.004] [--warmup-steps 0] [--outer averaging|nesterov|nesterov:LR]
        [--ddp-lr LR] [--ddp-warmup-steps N] [--report-steps 400]
    sudo python benchmarks/vs_ddp.py --links 100,20 [--link-rounds 16] [--link-repeats 3]

The same workload (the charlm example: byte-level transformer on the stdlib sources),
model, initialisation and per-step batch for all three:

- **DiLoCo**: ``fleet`` with 2 replicas, one CPU worker each (one torch thread), a
  private redis-server; replica ``i`` at round ``r``, inner step ``s`` trains on the
  BatchRef ``{payload: {replica: i, num_replicas: 2}, ordinals: [r * H + s]}``.
- **DDP**: ``torch.nn.parallel.DistributedDataParallel`` over gloo, 2 processes on the
  same 2 cores (one torch thread each); rank ``i`` at step ``k`` trains on the same
  BatchRef with ``ordinals: [k]``: the same data order, gradients all-reduced every
  step. The same number of steps per process as DiLoCo's inner steps in all.
- **single**: one process, ``num_replicas: 1``, the same number of steps.

DiLoCo and the single worker train with ``--inner-lr`` and ``--warmup-steps`` (charlm's
linear learning-rate warm-up); DDP with ``--ddp-lr`` and ``--ddp-warmup-steps`` (by
default the same): DDP is tuned on the same grid as DiLoCo by benchmarks/sweep.py.

Every run evaluates its model on the same 8,192 held-out windows (a standard error
under 0.3 % of the loss) every H steps. One clock for all: wall clock from the start
of training, less the seconds of the evaluations themselves (charlm's ``eval_s``: the
forward passes over the windows, measured alike in every run; DiLoCo's load of the
new global model into its worker's model, which its next round would otherwise do, is
part of its exchange and stays on its clock). Every run is timed warm: each DiLoCo
worker has built the workload and taken a few steps (its capability probe) before the
clock starts, and each DDP or single process has taken as many untimed steps on a
throwaway copy of the model (the trained model sees the same tokens either way).

Prints, at ``--report-steps`` and at the end (16 rounds of H=100 by default: 400 and
1,600 steps per process), each run's eval loss with its standard error and the
equal-token gap to DDP in % of DDP's loss, ± its standard error propagated from both
losses' (independent errors over the eval windows: both are evaluated on the same
windows, so this over-states the error of the difference); and, for target losses (the
single worker's final loss first), the seconds each method took to reach it: the median
of ``--repeats`` runs and their range.

``--links``: the slow-link run, on hosts made of Linux namespaces (fleet/testing/hosts.py,
needs root): two worker hosts and a storage host (Redis and a SeaweedFS S3 server, the
shared root), every host's link limited to the rate with tbf (this kernel has no netem:
bandwidth only, no added delay). DDP runs one rank on each worker host, all-reducing
over the link; DiLoCo runs one worker on each, exchanging int8 pseudo-gradients (the
default) through the S3 root (each worker applies the outer step itself); both for
the same step budget, ``--link-rounds`` x H steps per process. Prints, per rate, the
seconds each took to reach a target both reach (the higher of DDP's and DiLoCo's
one-box final losses: per token, the runs over links are the one-box runs) and the MB
each worker host sent, in all and up to the target (pro rata by steps: both send the
same bytes every step, or every round).

Targets (issue 18): on one box, DiLoCo's time to the single worker's final loss
<= 1/1.6 of the single worker's, and within 1.15x of DDP's; at 20 Mbit/s, DiLoCo
reaches DDP's one-box final loss at least 3x sooner than DDP over that link (issue 25:
8x, with only the encoded pseudo-gradients on the wire). Issue 26: at 1,600 steps per
process, DiLoCo's equal-token gap to DDP within 0.7 %, DDP tuned as fairly as DiLoCo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.client import Fleet  # noqa: E402
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig  # noqa: E402
from fleet.examples.charlm import make  # noqa: E402
from fleet.local import RedisServer, WorkerProcess, running_workers  # noqa: E402
from fleet.registry import Registry  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402

WORKLOAD = "fleet.examples.charlm:make"
#: 8,192 windows of 64 bytes (the validation split holds ~11,000 apart): a standard
#: error of ~0.25 % of the loss at this model's ~2.1 nats/byte.
CHARLM = {"d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, "batch_size": 16,
          "eval_windows": 8192, "max_corpus_mb": 4}  # fmt: skip
#: Untimed steps each DDP or single process takes on a throwaway copy of its model
#: before its clock starts, as each fleet worker's capability probe takes 4 steps.
WARM_STEPS = 4
Curve = list[tuple[float, float, float]]
"""``[(training seconds, eval loss, its standard error)]``: before training, then every
H steps."""


def _batch(replica: int, num_replicas: int, step: int) -> dict[str, Any]:
    return {
        "kind": "micro_epoch",
        "microshard_ids": [f"shard-{replica}"],
        "ordinals": [step],
        "payload": {"replica": replica, "num_replicas": num_replicas, "step": step},
    }


def _eval(workload: Any, model: torch.nn.Module) -> tuple[float, float, float]:
    """The eval loss, its standard error, and the seconds the evaluation took."""
    started = time.perf_counter()
    metrics = workload.evaluate({"model": model}, "Validation")
    seconds = float(metrics.get("eval_s", time.perf_counter() - started))
    return float(metrics["loss"]), float(metrics["loss_stderr"]), seconds


def with_lr(config: dict[str, Any], lr: float, warmup_steps: int) -> dict[str, Any]:
    """charlm's ``config`` with this learning rate and warm-up (no key when none, so the
    config is the one of runs before warm-ups existed) and timed evaluations."""
    out = {**config, "lr": lr, "eval_timing": True}
    out.pop("warmup_steps", None)
    if warmup_steps:
        out["warmup_steps"] = warmup_steps
    return out


def _data_parallel(
    rank: int,
    world: int,
    master: str,
    steps: int,
    every: int,
    out: str,
    config: dict[str, Any],
) -> None:
    """One process of the DDP (``world`` 2) or single (``world`` 1) run; ``master`` is
    rank 0's ``address:port``."""
    torch.set_num_threads(1)
    if world > 1:
        addr, port = master.rsplit(":", 1)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    workload = make(config)
    # warm up on a throwaway copy (its own optimizer; data off the trained stream)
    warm = workload.init_model("cpu")
    if world > 1:
        warm["model"] = torch.nn.parallel.DistributedDataParallel(warm["model"])
    for k in range(WARM_STEPS):
        workload.train_window(warm, [_batch(rank, world, -1 - k)])
    del warm
    state = workload.init_model("cpu")
    model = state["model"]
    if world > 1:
        state["model"] = torch.nn.parallel.DistributedDataParallel(model)
    curve: Curve = []
    if rank == 0:
        loss, stderr, _ = _eval(workload, model)
        curve.append((0.0, loss, stderr))
    if world > 1:
        dist.barrier()  # both ranks start the clock together, warm
    started = time.perf_counter()
    evals_s = 0.0
    for step in range(steps):
        workload.train_window(state, [_batch(rank, world, step)])
        if rank == 0 and (step + 1) % every == 0:
            at = time.perf_counter() - started - evals_s
            loss, stderr, eval_s = _eval(workload, model)
            evals_s += eval_s  # rank 1 waits for it at its next all-reduce
            curve.append((at, loss, stderr))
    if rank == 0:
        Path(out).write_text(json.dumps(curve))
    if world > 1:
        # rank 1 waits for rank 0's last evaluation: gloo's teardown with a peer still
        # busy aborted a rank now and then (std::terminate)
        dist.barrier()
        dist.destroy_process_group()


def _read_curve(out: Path) -> Curve:
    curve = json.loads(out.read_text())
    out.unlink()
    return [tuple(p) for p in curve]  # type: ignore[misc]


def data_parallel(world: int, steps: int, every: int, port: int, config: dict[str, Any]) -> Curve:
    """DDP (``world`` 2) or one process on this box."""
    out = Path(tempfile.mktemp(suffix=".json"))
    args = (world, f"127.0.0.1:{port}", steps, every, str(out), config)
    mp.spawn(_data_parallel, args=args, nprocs=world, join=True)
    return _read_curve(out)


#: ``--outer``: the published outer optimizer, or plain model averaging.
OUTER = {
    "nesterov": OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9),
    "averaging": OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
}


def outer_of(spec: str, momentum: float = 0.9) -> OuterOptimizerConfig:
    """An outer optimizer by name (:data:`OUTER`), or ``nesterov:LR`` (with
    ``momentum``)."""
    if spec in OUTER:
        return OUTER[spec]
    name, _, lr = spec.partition(":")
    if name != "nesterov" or not lr:
        raise SystemExit(f"--outer: {spec!r} is none of {sorted(OUTER)} nor nesterov:LR")
    return OuterOptimizerConfig(name="nesterov", lr=float(lr), momentum=momentum)


def diloco(
    fleet: Fleet,
    rounds: int,
    inner_steps: int,
    config: dict[str, Any],
    outer: OuterOptimizerConfig,
    eval_every: int = 1,
) -> tuple[Curve, float]:
    """A DiLoCo run's curve (a point for each evaluated round), and the seconds of its
    rounds' slowest inner loops (its compute; the rest of its training seconds is the
    fleet's per-round cost). A round's point is at the seconds from round 0's launch to
    the end of its evaluation, less the seconds of the evaluations so far: each
    evaluation's own ``eval_s`` (``config`` needs charlm's ``eval_timing``), not the
    load of the new global model that precedes it (the round's record's ``eval_s``),
    which the next round's replica would otherwise do."""
    run = DiLoCoRun.start(
        fleet,
        DiLoCoConfig(
            workload=WORKLOAD,
            config=config,
            replicas=2,
            rounds=rounds,
            inner_steps=inner_steps,
            outer=outer,
            eval_every=eval_every,
        ),
    )
    job = run.run()
    if job.status != "completed":
        raise RuntimeError(f"DiLoCo job {job.job_id} {job.status}: {job.error}")
    state = run.state()
    assert state is not None and state.initial_eval is not None
    initial = state.initial_eval
    curve: Curve = [(0.0, initial.loss or 0.0, initial.loss_stderr or 0.0)]
    records = run.rounds()
    evals_s = inner_s = 0.0
    for r in records:
        inner_s += max(m.compute_s for m in r.merged)
        if r.eval is None:
            continue
        evals_s += float(r.eval.metrics.get("eval_s", r.eval_s))
        trained_s = r.eval.at - records[0].started_at - evals_s
        curve.append((trained_s, r.eval.loss or 0.0, r.eval.loss_stderr or 0.0))
    return curve, inner_s


def warm_up(fleet: Fleet, names: list[str], config: dict[str, Any]) -> None:
    """Have every worker build the workload (corpus, model) before any clock starts."""
    probes = [
        fleet.capability_probe(worker=n, workload=WORKLOAD, config=config, wait=False)
        for n in names
    ]
    for probe in probes:
        probe.result(timeout_s=600)


def time_to(curve: Curve, target: float) -> float | None:
    """Training seconds at the first evaluation at or below ``target`` (None: never)."""
    return next((t for t, loss, _ in curve if loss <= target), None)


def _median_cell(times: list[float | None], width: int = 22) -> tuple[str, float | None]:
    reached = [t for t in times if t is not None]
    if len(reached) < len(times):
        return f"{'-':>{width}}", None
    median = statistics.median(reached)
    return f"{median:>10.1f} [{min(reached):.1f}, {max(reached):.1f}]".rjust(width), median


def gap(loss: float, stderr: float, ddp: float, ddp_stderr: float) -> tuple[float, float]:
    """``loss``'s gap to DDP's in % of DDP's loss, and its standard error propagated from
    both (as independent): ``100 * sqrt(se^2 + (loss / ddp)^2 * se_ddp^2) / ddp``."""
    pct = 100 * (loss - ddp) / ddp
    se = 100 * math.sqrt(stderr**2 + (loss / ddp) ** 2 * ddp_stderr**2) / ddp
    return pct, se


def configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """charlm's config for each run: DiLoCo and the single worker with ``--inner-lr``
    and ``--warmup-steps``, DDP with ``--ddp-lr`` and ``--ddp-warmup-steps``."""
    ddp_lr = args.inner_lr if args.ddp_lr is None else args.ddp_lr
    ddp_warm = args.warmup_steps if args.ddp_warmup_steps is None else args.ddp_warmup_steps
    ours = with_lr(CHARLM, args.inner_lr, args.warmup_steps)
    return {"single": ours, "DDP": with_lr(CHARLM, ddp_lr, ddp_warm), "DiLoCo": ours}


def one_box(
    args: argparse.Namespace, cfg: dict[str, dict[str, Any]], inner_s: list[float]
) -> dict[str, list[Curve]]:
    """The single worker, DDP over localhost gloo and DiLoCo, ``--repeats`` times."""
    steps = args.rounds * args.inner_steps
    h = args.inner_steps
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-ddp-"))
    server = RedisServer(work / "redis")
    settings = FleetSettings(redis_url=server.url, shared_root=work / "shared", node="bench")
    runs: dict[str, list[Curve]] = {"single": [], "DDP": [], "DiLoCo": []}
    try:
        with running_workers(
            settings, [0, 1], work / "logs", pythonpath=[str(REPO)], cwd=REPO
        ) as procs:
            fleet = Fleet(settings)
            warm_up(fleet, [p.name for p in procs], cfg["DiLoCo"])
            for repeat in range(args.repeats):
                if not args.no_single:
                    runs["single"].append(data_parallel(1, steps, h, 0, cfg["single"]))
                port = 29500 + repeat
                runs["DDP"].append(data_parallel(2, steps, h, port, cfg["DDP"]))
                outer = outer_of(args.outer)
                curve, inner = diloco(fleet, args.rounds, h, cfg["DiLoCo"], outer)
                runs["DiLoCo"].append(curve)
                inner_s.append(inner)
                print(f"  one box: repeat {repeat + 1}/{args.repeats} done", flush=True)
            fleet.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {name: curves for name, curves in runs.items() if curves}


def _at(curves: list[Curve], index: int) -> tuple[float, float, list[float]]:
    """The median eval loss at curve point ``index``, its standard error (of the run
    with that loss), and every run's training seconds there."""
    losses = [c[index][1] for c in curves]
    loss = statistics.median(losses)
    nearest = min(curves, key=lambda c: abs(c[index][1] - loss))
    return loss, nearest[index][2], [c[index][0] for c in curves]


def print_one_box(
    args: argparse.Namespace,
    cfg: dict[str, dict[str, Any]],
    runs: dict[str, list[Curve]],
    inner_s: list[float],
) -> None:
    steps, h = args.rounds * args.inner_steps, args.inner_steps
    print(
        f"\none box: charlm {json.dumps(cfg['DiLoCo'])}; DDP lr {cfg['DDP']['lr']}, warm-up "
        f"{cfg['DDP'].get('warmup_steps', 0)} steps; {steps} steps per process (DiLoCo: "
        f"{args.rounds} rounds x H={h}, 2 replicas, outer {args.outer}, int8 "
        f"pseudo-gradients); {os.cpu_count()} CPU cores, 1 torch thread per process; "
        f"median of {args.repeats} runs [min, max]; training s: wall clock less the "
        "evaluations"
    )
    marks = sorted({k for k in args.report_steps if 0 < k < steps and k % h == 0} | {steps})
    ddp = runs["DDP"]
    print(
        f"{'steps':>6}{'run':>8}{'eval loss':>11}{'± s.e.':>8}{'gap to DDP %':>20}"
        f"{'training s':>24}"
    )
    for k in marks:
        index = k // h
        p_loss, p_se, _ = _at(ddp, index)
        for name, curves in runs.items():
            loss, se, seconds = _at(curves, index)
            pct, pct_se = gap(loss, se, p_loss, p_se)
            cell = "-" if name == "DDP" else f"{pct:+.2f} ± {pct_se:.2f}"
            print(
                f"{k:>6}{name:>8}{loss:>11.4f}{se:>8.4f}{cell:>20}"
                f"{statistics.median(seconds):>12.1f} [{min(seconds):.1f}, {max(seconds):.1f}]"
            )
    print(
        f"DiLoCo's training s: {statistics.median(inner_s):.1f} in its replicas' inner loops "
        "(the slowest replica of each round), the rest the fleet's per-round cost"
    )
    if "single" not in runs:
        return
    single_final = statistics.median(c[-1][1] for c in runs["single"])
    targets = [single_final + d for d in (0.3, 0.15, 0.0)]
    print("\ntime to eval loss (training s, median [min, max]; '-': not reached in every run)")
    print(f"{'target':>8}" + "".join(f"{name:>22}" for name in runs))
    medians: dict[str, float | None] = {}
    for target in targets:
        cells = []
        for name, curves in runs.items():
            cell, medians[name] = _median_cell([time_to(c, target) for c in curves])
            cells.append(cell)
        print(f"{target:>8.4f}" + "".join(cells))
    d, s, p = medians["DiLoCo"], medians["single"], medians["DDP"]  # at single_final
    if d is not None and s is not None and p is not None:
        print(
            f"to the single worker's final loss: DiLoCo {s / d:.2f}x faster than one worker "
            f"(target >= 1.6), {d / p:.2f}x DDP's time (target <= 1.15)"
        )
    else:
        print("DiLoCo or DDP did not reach the single worker's final loss in every run")


Bytes = dict[str, int]
"""Bytes sent by each worker host during a run."""


def over_links(
    args: argparse.Namespace,
    cfg: dict[str, dict[str, Any]],
    inner_s: dict[tuple[float, str], list[float]],
) -> dict[float, dict[str, list[tuple[Curve, Bytes]]]]:
    """DDP and DiLoCo across two worker hosts, for each rate in ``--links``: the same
    steps per process, ``--link-rounds`` x H."""
    from fleet.testing.hosts import Network, StorageServices, skip_reason

    reason = skip_reason()
    if reason:
        sys.exit(f"--links: cannot make hosts here: {reason}")
    steps = args.link_rounds * args.inner_steps
    base = Path(tempfile.mkdtemp(prefix="fleet-bench-ddp-hosts-"))
    network = Network(base / "net")
    services = None
    procs: list[WorkerProcess] = []
    results: dict[float, dict[str, list[tuple[Curve, Bytes]]]] = {}
    try:
        storage = network.host("storage")
        hosts = [network.host("w1"), network.host("w2")]
        services = StorageServices(storage, base)
        assert services.s3 is not None
        bucket = services.s3.new_bucket()
        settings = FleetSettings(
            redis_url=services.redis_url,
            shared_root=f"s3://{bucket}/vs-ddp",
            storage_options=services.s3.storage_options,
            workload_allowlist=["fleet.examples.*"],
        )
        registry = Registry.from_settings(settings)
        for h in hosts:
            update = {"node": h.name, "cache_dir": h.local_dir / "cache"}
            procs.append(
                WorkerProcess(
                    settings.model_copy(update=update),
                    0,
                    base / "logs" / h.name,
                    workload=WORKLOAD,
                    pythonpath=[str(REPO)],
                    cwd=REPO,
                    command_prefix=h.prefix,
                )
            )
        for proc in procs:
            proc.wait_alive(registry, timeout_s=120)
        fleet = Fleet(settings)
        warm_up(fleet, [p.name for p in procs], cfg["DiLoCo"])

        def diloco_over_link(rate: float, name: str) -> Curve:
            h, outer = args.inner_steps, outer_of(args.outer)
            curve, inner = diloco(fleet, args.link_rounds, h, cfg["DiLoCo"], outer)
            inner_s.setdefault((rate, name), []).append(inner)
            return curve

        def measured(run: Callable[[], Curve]) -> tuple[Curve, Bytes]:
            before = {h.name: h.counters()[0] for h in hosts}
            curve = run()
            return curve, {h.name: h.counters()[0] - before[h.name] for h in hosts}

        def ddp_over_link(port: int) -> Curve:
            out = base / f"ddp-{port}.json"  # outside the hosts' private tmpfs
            env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "eth0"}
            ranks = [
                h.popen(
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--rank",
                    str(rank),
                    "--master",
                    f"{hosts[0].ip}:{port}",
                    "--steps",
                    str(steps),
                    "--every",
                    str(args.inner_steps),
                    "--out",
                    str(out),
                    "--config",
                    json.dumps(cfg["DDP"]),
                    log=base / "logs" / f"ddp-{h.name}.log",
                    env=env,
                )
                for rank, h in enumerate(hosts)
            ]
            for rank in ranks:
                if rank.wait(timeout=3600) != 0:
                    raise RuntimeError(f"a DDP rank failed: see {base / 'logs'}")
            return _read_curve(out)

        for rate in args.links:
            for h in [storage, *hosts]:
                h.limit(rate)
            names = ["DiLoCo"]
            runs: dict[str, list[tuple[Curve, Bytes]]] = {"DDP": [], **{n: [] for n in names}}
            for repeat in range(args.link_repeats):
                port = 29600 + len(results) * 10 + repeat
                runs["DDP"].append(measured(partial(ddp_over_link, port)))
                for name in names:
                    runs[name].append(measured(partial(diloco_over_link, rate, name)))
                print(
                    f"  {rate:g} Mbit/s: repeat {repeat + 1}/{args.link_repeats} done", flush=True
                )
            results[rate] = runs
        fleet.close()
    finally:
        for proc in procs:
            proc.stop()
        if services is not None:
            services.close()
        network.close()
        shutil.rmtree(base, ignore_errors=True)
    return results


def print_links(
    args: argparse.Namespace,
    results: dict[float, dict[str, list[tuple[Curve, Bytes]]]],
    target: float,
    inner_s: dict[tuple[float, str], list[float]],
) -> None:
    steps = args.link_rounds * args.inner_steps
    print(
        f"\ntwo worker hosts (network namespaces), every link tbf-limited, no added delay; "
        f"{steps} steps per process: DDP all-reducing over the link every step, DiLoCo "
        f"{args.link_rounds} rounds x H={args.inner_steps}, int8 pseudo-gradients through an "
        f"S3 root (SeaweedFS on a third host); target: {target:.4f}, the higher of DDP's "
        f"and DiLoCo's one-box final losses; median of {args.link_repeats} runs [min, max]; "
        "MB to target: pro rata by the steps to the target"
    )
    print(
        f"{'link':>10}{'run':>16}{'final loss':>12}{'training s':>18}{'to target s':>22}"
        f"{'MB sent/host':>14}{'MB to target':>14}"
    )
    for rate, runs in results.items():
        medians: dict[str, float | None] = {}
        for name, measured in runs.items():
            curves = [c for c, _ in measured]
            seconds = [c[-1][0] for c in curves]
            cell, medians[name] = _median_cell([time_to(c, target) for c in curves])
            sent = statistics.median(b for _, by in measured for b in by.values()) / 1e6
            points = [next((i for i, p in enumerate(c) if p[1] <= target), None) for c in curves]
            reached = [i for i in points if i is not None]
            to_target = "-"
            if len(reached) == len(points):
                share = statistics.median(reached) / (len(curves[0]) - 1)
                to_target = f"{sent * share:.1f}"
            print(
                f"{rate:>5g} Mb/s{name:>16}{statistics.median(c[-1][1] for c in curves):>12.4f}"
                f"{statistics.median(seconds):>10.1f} [{min(seconds):.0f}, {max(seconds):.0f}]"
                f"{cell}{sent:>14.1f}{to_target:>14}"
            )
        for name in runs:
            if name == "DDP":
                continue
            inner = statistics.median(inner_s[(rate, name)])
            d, p = medians[name], medians["DDP"]
            faster = f"{p / d:.1f}x sooner" if d is not None and p is not None else "-"
            print(
                f"{rate:>5g} Mb/s: {name} (inner loops {inner:.1f} s of its training s) reaches "
                f"the target {faster} than DDP over the link (target at 20 Mbit/s: >= 8)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=0.004, help="DiLoCo's and single's")
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="DiLoCo's and single's linear lr warm-up"
    )
    parser.add_argument("--ddp-lr", type=float, default=None, help="default: --inner-lr")
    parser.add_argument(
        "--ddp-warmup-steps", type=int, default=None, help="default: --warmup-steps"
    )
    parser.add_argument(
        "--report-steps",
        type=lambda v: [int(k) for k in v.split(",") if k],
        default=[400],
        help="steps per process to report losses and gaps at, besides the end",
    )
    parser.add_argument("--no-single", action="store_true", help="skip the single worker")
    parser.add_argument(
        "--outer",
        default="averaging",
        help="averaging, nesterov (lr 0.7, momentum 0.9), or nesterov:LR (momentum 0.9)",
    )
    parser.add_argument(
        "--links",
        type=lambda v: [float(r) for r in v.split(",")],
        default=[],
        help="link rates (Mbit/s) for the slow-link run, e.g. 100,20 (needs root)",
    )
    parser.add_argument("--link-rounds", type=int, default=16, help="DiLoCo's rounds over links")
    parser.add_argument("--link-repeats", type=int, default=3)
    # one DDP rank on a host of the slow-link run (this script runs itself there)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--master", default="", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--every", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        config = json.loads(args.config)
        _data_parallel(args.rank, 2, args.master, args.steps, args.every, args.out, config)
        return

    cfg = configs(args)
    inner_s: list[float] = []
    runs = one_box(args, cfg, inner_s)
    print_one_box(args, cfg, runs, inner_s)
    if args.links:
        if args.link_rounds != args.rounds:
            print(f"--links: DDP and DiLoCo both run {args.link_rounds} rounds' steps")
        # a target both reach: per token the runs over links are the one-box runs (the
        # one-box runs' steps must cover the links' for this to hold)
        finals = [statistics.median(c[min(args.link_rounds, len(c) - 1)][1] for c in runs[n])
                  for n in ("DDP", "DiLoCo")]  # fmt: skip
        target = max(finals)
        link_inner_s: dict[tuple[float, str], list[float]] = {}
        results = over_links(args, cfg, link_inner_s)
        print_links(args, results, target, link_inner_s)


if __name__ == "__main__":
    main()
