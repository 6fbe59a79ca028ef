"""``fleet up`` (a local fleet until Ctrl-C) and ``fleet demo`` (DiLoCo vs one worker)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from fleet.cli.root import _fail, console, main
from fleet.errors import FleetError


def _raise_interrupt(signum: int, _frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so the local cluster is stopped in order."""
    raise KeyboardInterrupt


@main.command("up")
@click.option("--workers", type=int, default=None, help="Workers (default: one per GPU, else 2).")
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--flower-port", type=int, default=5555, show_default=True)
@click.option("--root", type=click.Path(path_type=Path), default=Path(".fleet"), show_default=True)
def up_cmd(workers: int | None, flower: bool, flower_port: int, root: Path) -> None:
    """Start a local fleet (Redis, workers, Flower) and show its status until Ctrl-C."""
    import signal
    import time

    from rich.live import Live

    from fleet.cluster import LocalCluster
    from fleet.registry import Registry

    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C stops it even when started from a shell that ignores SIGINT in background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cluster = LocalCluster(root, workers=workers, flower=flower, flower_port=flower_port)
    # Ctrl-C (or SIGTERM) at any moment, start-up included, is the normal way to stop:
    # leaving the ``with`` block stops every process, and the command exits 0.
    try:
        with cluster:
            info = cluster.describe()
            console.print(f"redis        {info['redis_url']} ({info['redis']})", highlight=False)
            console.print(f"flower       {info['flower_url'] or '-'}", highlight=False)
            console.print(f"shared root  {info['shared_root']}", highlight=False)
            console.print(f"logs         {info['logs']}", highlight=False)
            # an external Redis is the FLEET_REDIS_URL already set (never echo its password)
            url = "" if info["redis"] == "external" else f"FLEET_REDIS_URL={info['redis_url']} "
            console.print(
                f"export {url}FLEET_SHARED_ROOT={info['shared_root']}",
                highlight=False,
                soft_wrap=True,
            )
            registry = Registry.from_settings(cluster.settings)

            def table() -> Table:
                t = Table(
                    "worker", "status", "queue", "pid", "handles", title="fleet (Ctrl-C to stop)"
                )
                for w in registry.workers():
                    handles = len(registry.handles(owner=w.name))
                    t.add_row(w.name, w.status, w.queue, str(w.pid), str(handles))
                return t

            try:
                with Live(table(), console=console, refresh_per_second=1) as live:
                    while True:
                        time.sleep(1)
                        live.update(table())
            finally:
                console.print("stopping ...")
    except KeyboardInterrupt:
        pass
    console.print("stopped: no process left running")


@main.command("demo")
@click.option("--rounds", type=int, default=8, show_default=True)
@click.option("--inner-steps", type=int, default=100, show_default=True)
@click.option("--replicas", type=int, default=2, show_default=True)
@click.option("--config-json", default="{}", show_default=True, help="charlm config overrides.")
@click.option(
    "--cluster",
    type=click.Choice(["local", "external"]),
    default="local",
    show_default=True,
    help="local: start Redis, workers and Flower here; external: use FLEET_* settings.",
)
@click.option("--flower/--no-flower", default=True, show_default=True)
@click.option("--root", type=click.Path(path_type=Path), default=Path(".fleet"), show_default=True)
def demo_cmd(
    rounds: int,
    inner_steps: int,
    replicas: int,
    config_json: str,
    cluster: str,
    flower: bool,
    root: Path,
) -> None:
    """DiLoCo on the charlm example vs a single worker on the same wall clock, with a report."""
    import json
    import signal

    from fleet.client import Fleet
    from fleet.cluster import LocalCluster
    from fleet.demo import run_demo
    from fleet.tracking import with_stderr

    signal.signal(signal.SIGTERM, _raise_interrupt)
    config = json.loads(config_json)
    try:
        if cluster == "external":
            fleet = Fleet.from_env()
            json_path, png_path, comparison = run_demo(
                fleet,
                rounds=rounds,
                inner_steps=inner_steps,
                replicas=replicas,
                config=config,
                console=console,
            )
        else:
            console.print("starting a local fleet ...")
            # one worker per replica, and one that evaluates beside their training
            with LocalCluster(root, workers=replicas + 1, flower=flower) as local:
                fleet = Fleet(local.settings)
                json_path, png_path, comparison = run_demo(
                    fleet,
                    rounds=rounds,
                    inner_steps=inner_steps,
                    replicas=replicas,
                    config=config,
                    console=console,
                    flower_url=local.flower_url,
                )
                fleet.close()
    except FleetError as exc:
        _fail(exc)
    t = comparison["at_wall_s"]
    d = with_stderr(comparison["diloco_eval_loss"], comparison["diloco_eval_loss_stderr"])
    b = with_stderr(comparison["baseline_eval_loss"], comparison["baseline_eval_loss_stderr"])
    console.print(
        f"at {t:.0f} s wall clock: DiLoCo eval loss {d}, single worker {b} (± one standard "
        "error over the held-out windows)",
        highlight=False,
    )
    if comparison["time_to_loss"]:
        from fleet.report import time_to_loss_lines

        console.print("time to eval loss (wall-clock s; tokens trained on, millions):")
        for line in time_to_loss_lines(comparison["time_to_loss"]):
            console.print(f"  {line}", highlight=False)
    console.print(f"report: {json_path}\n        {png_path}", highlight=False, soft_wrap=True)
    console.print(
        f"TensorBoard: tensorboard --logdir {json_path.parent / 'tensorboard'}",
        highlight=False,
        soft_wrap=True,
    )
