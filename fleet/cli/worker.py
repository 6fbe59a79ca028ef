"""``fleet worker`` (run one worker, or one per GPU) and ``fleet workers`` (list them)."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from fleet.cli.root import _print_json, _settings, console, json_option, main
from fleet.errors import FleetError


@main.command("worker")
@click.option(
    "--gpu",
    type=int,
    default=None,
    envvar="FLEET_GPU",
    help="Pin to this GPU (CUDA_VISIBLE_DEVICES); names the queue. Env: FLEET_GPU.",
)
@click.option(
    "--visible-device",
    default=None,
    envvar="FLEET_VISIBLE_DEVICE",
    help="CUDA_VISIBLE_DEVICES value if not --gpu (e.g. 0 in a container given one GPU).",
)
@click.option("--cpu", "cpu", is_flag=True, help="A CPU worker (no GPU).")
@click.option("--all-gpus", is_flag=True, help="One worker process per visible GPU.")
@click.option(
    "--slot",
    type=int,
    default=None,
    help="CPU worker index on this node (default: the lowest free one).",
)
@click.option("--workload", default=None, help="Default workload factory, module:attr.")
@click.option("--config-json", default=None, help="JSON config for the default workload.")
@click.option(
    "--torch-threads", type=int, default=None, help="torch.set_num_threads in the worker."
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker_cmd(
    gpu: int | None,
    visible_device: str | None,
    cpu: bool,
    all_gpus: bool,
    slot: int | None,
    workload: str | None,
    config_json: str | None,
    torch_threads: int | None,
    loglevel: str,
) -> None:
    """Run one fleet worker (a Celery worker, concurrency 1) on one GPU or the CPU.

    The worker's name (``fleet-gpuN@node`` / ``fleet-cpuN@node``) is claimed in Redis: a
    second worker for the same GPU or slot exits at once, naming the first one."""
    from fleet.settings import FleetSettings
    from fleet.worker import parse_config, run_all_gpus, run_worker

    if sum([gpu is not None, cpu, all_gpus]) != 1:
        raise click.UsageError("give exactly one of --gpu N, --cpu, --all-gpus")
    try:
        config = parse_config(config_json)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--config-json") from exc
    if workload is not None:
        from fleet.workload import parse_spec

        try:
            parse_spec(workload)
        except FleetError as exc:
            raise click.BadParameter(str(exc), param_hint="--workload") from exc
    if all_gpus:
        tail = ["--loglevel", loglevel]
        if workload:
            tail += ["--workload", workload]
        if config_json:
            tail += ["--config-json", config_json]
        if torch_threads:
            tail += ["--torch-threads", str(torch_threads)]
        sys.exit(run_all_gpus(tail))
    code = run_worker(
        FleetSettings.from_env(),
        gpu=gpu,
        visible_device=visible_device,
        slot=slot,
        workload=workload,
        config=config,
        torch_threads=torch_threads,
        loglevel=loglevel,
    )
    sys.exit(code)


@main.command("workers")
@click.option("--all", "include_lost", is_flag=True, help="Include lost workers.")
@json_option
def workers_cmd(include_lost: bool, as_json: bool) -> None:
    """List the fleet's workers from the registry."""
    import time

    from fleet.registry import Registry

    registry = Registry.from_settings(_settings())
    table = Table("worker", "status", "queue", "device", "pid", "handles", "heartbeat")
    now = time.time()
    counts = registry.handle_counts()
    infos = registry.workers(include_lost=include_lost)
    if as_json:
        _print_json(
            [{**i.model_dump(mode="json"), "handles": counts.get(i.name, 0)} for i in infos]
        )
        return
    for info in infos:
        beat = f"{now - info.heartbeat_at:.1f}s ago" if info.heartbeat_at else "-"
        handles = str(counts.get(info.name, 0))
        table.add_row(
            info.name, info.status, info.queue, info.device_name, str(info.pid), handles, beat
        )
    console.print(table)
