"""The ``fleet`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from fleet.cli_options import config_options, given_flags
from fleet.errors import FleetError

if TYPE_CHECKING:
    from fleet.jobs import JobStore
    from fleet.settings import FleetSettings

# Piped output (no terminal) gets a wide console, so names and hashes are never cut.
console = Console() if sys.stdout.isatty() else Console(width=200)

#: Exit statuses: a command's own failure, and Redis that cannot be reached.
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 2


def _fail(exc: FleetError) -> NoReturn:
    """Print a typed error as one line and exit (2 if Redis is unavailable, else 1)."""
    from fleet.errors import BrokerUnavailableError

    console.print(f"[red]error[/red] {type(exc).__name__}: {exc}", soft_wrap=True, highlight=False)
    sys.exit(EXIT_UNAVAILABLE if isinstance(exc, BrokerUnavailableError) else EXIT_FAILED)


class FleetGroup(click.Group):
    """A command group whose commands report any :class:`FleetError` as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            _fail(exc)


#: ``--json``: one JSON document on stdout instead of the tables (for jq).
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")


def _print_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, default=str))


def _print_rows(rows: dict[str, Any], width: int = 24) -> None:
    """``key value`` lines, keys padded to ``width``; never cut (a hash, a path)."""
    for key, value in rows.items():
        console.print(f"{key:<{width}}{value}", soft_wrap=True, highlight=False)


def _settings() -> FleetSettings:
    """Settings from the environment, after one quick look at Redis: when it cannot be
    reached the command fails at once (one line, exit 2) instead of retrying."""
    from fleet.connection import check_redis
    from fleet.settings import FleetSettings

    settings = FleetSettings.from_env()
    check_redis(settings)
    return settings


@click.group(cls=FleetGroup)
@click.version_option(package_name="fleet-diloco")
def main() -> None:
    """fleet: a Celery + Redis worker fleet for distributed PyTorch training."""


@main.group(cls=FleetGroup)
def pack() -> None:
    """Inspect, verify and convert parameter packs (format v1)."""


def _local_path(path: Path) -> Path:
    """``path`` as given if it exists from here, else under the shared root
    (``FLEET_SHARED_ROOT``), so the shared-root-relative paths jobs print work as they are."""
    if path.exists() or path.is_absolute():
        return path
    from fleet.settings import FleetSettings

    settings = FleetSettings.from_env()
    if settings.shared_root_is_url:
        return path
    under_root = Path(settings.shared_root) / path
    return under_root if under_root.exists() else path


@pack.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--top", default=10, show_default=True, help="Largest tensors to list.")
@json_option
def pack_inspect(path: Path, top: int, as_json: bool) -> None:
    """Show a pack's format, counts, layout hash and largest tensors. PATH may be
    relative to the shared root, as jobs print it."""
    from fleet.codec import read_manifest

    path = _local_path(path)
    manifest = read_manifest(path)
    if as_json:
        _print_json({"pack": str(path), **manifest.model_dump(mode="json")})
        return
    rows = {
        "pack": str(path),
        "format": manifest.format,
        "model_schema_hash": manifest.model_schema_hash,
        "layout_hash": manifest.layout_hash,
        "parameter_count": f"{manifest.parameter_count:,} ({manifest.values_nbytes:,} bytes)",
        "values_digest": manifest.values_digest or "-",
    }
    for name in ("included_keys", "excluded_float_keys", "ignored_non_float_keys"):
        keys = getattr(manifest, name)
        rows[name] = "-" if keys is None else str(len(keys))
    _print_rows(rows)
    entries = manifest.layout_entries()
    table = Table("tensor", "shape", "dtype", "numel", title=f"top {top} tensors by size")
    if entries is not None:
        for e in sorted(entries, key=lambda e: -e.numel)[:top]:
            table.add_row(e.name, str(list(e.shape)), e.dtype, f"{e.numel:,}")
    else:
        for key in (manifest.included_keys or [])[:top]:
            table.add_row(key, "?", "?", "?")
    console.print(table)


@pack.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def pack_verify(path: Path) -> None:
    """Check a pack: manifest, byte length, content digest, finite values. Exit 1 if bad.
    PATH may be relative to the shared root."""
    from fleet.codec import read_pack

    path = _local_path(path)
    manifest, _ = read_pack(path, verify=True, check_finite=True)
    digest = "digest ok" if manifest.values_digest else "no digest recorded"
    console.print(
        f"[green]ok[/green] {path}: {manifest.parameter_count:,} values, {digest}, all finite",
        soft_wrap=True,
    )


@pack.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--model-schema-hash", default=None, help="Schema id for a new pack.")
def pack_convert(src: Path, dst: Path, model_schema_hash: str | None) -> None:
    """Convert a pack to a .safetensors file, or a .safetensors file to a pack. SRC may
    be relative to the shared root."""
    from fleet.codec import from_safetensors, to_safetensors

    src = _local_path(src)
    if src.is_dir():
        manifest = to_safetensors(src, dst)
    else:
        manifest = from_safetensors(src, dst, model_schema_hash)
    console.print(
        f"[green]wrote[/green] {dst} ({manifest.parameter_count:,} values)", soft_wrap=True
    )


# --------------------------------------------------------------------------- workers


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


# --------------------------------------------------------------------------- DiLoCo and jobs


#: Exit status of ``fleet diloco`` for a job that ended cancelled (failed: EXIT_FAILED).
EXIT_CANCELLED = 3


@main.command("diloco")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="A run config file (.toml, .yaml, .json) with any DiLoCoConfig field; flags override it.",
)
@click.option(
    "--config-json",
    default=None,
    help="JSON object merged into the workload factory's config (config key 'config').",
)
@config_options
@click.option("--job-id", default=None, help="Id for the new job.")
@click.option(
    "--resume",
    "resume_id",
    default=None,
    help="Continue this job from its last committed round (with its own config; only "
    "--rounds may change, to extend the run).",
)
@click.option(
    "--wait-for-workers-s",
    type=float,
    default=0.0,
    show_default=True,
    help="Wait up to this long for a live worker (0: fail at once if there is none).",
)
@click.option(
    "--tracker",
    "trackers",
    multiple=True,
    help="Log each round's metrics: tensorboard:DIR, mlflow[:URI], wandb[:PROJECT], "
    "jsonl:PATH (repeatable).",
)
@click.option("--print-config", is_flag=True, help="Print the effective config as JSON and exit.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="A progress bar over the rounds [default: on a terminal].",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Log lines shown on stderr (the run's INFO lines: one per round, resumes, drops).",
)
@click.option("-v", "--verbose", is_flag=True, help="Same as --log-level DEBUG.")
def diloco_cmd(
    config_file: Path | None,
    config_json: str | None,
    job_id: str | None,
    resume_id: str | None,
    wait_for_workers_s: float,
    trackers: tuple[str, ...],
    print_config: bool,
    progress: bool | None,
    log_level: str,
    verbose: bool,
    **flags: Any,
) -> None:
    """Run DiLoCo with any workload on the fleet (FLEET_* settings), as a job.

    The config comes from --config, then the flags; --print-config shows the result.
    Exits 0 when the job completed, 1 when it failed, 3 when it was cancelled."""
    from fleet.cli_run import diloco_config, run_diloco

    given = given_flags(flags)
    if resume_id is not None:
        ignored = [flag for path, (flag, _) in given.items() if path != "rounds"]
        ignored += ["--config"] * (config_file is not None) + ["--config-json"] * bool(config_json)
        ignored += ["--job-id"] * bool(job_id)
        if ignored:
            raise click.UsageError(
                "--resume continues the job with its own config; these would be ignored: "
                f"{', '.join(ignored)} (only --rounds may change)"
            )
    config = None if resume_id else diloco_config(config_file, config_json, given)
    rounds = given["rounds"][1] if "rounds" in given else None
    if print_config:
        if config is None:  # the resumed job's own config, with --rounds applied
            from fleet.client import Fleet
            from fleet.diloco import DiLoCoRun

            config = DiLoCoRun.resume(Fleet(_settings()), str(resume_id), rounds=rounds).config
        click.echo(config.model_dump_json(indent=2))
        return
    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)
    settings = _settings()
    job = run_diloco(
        settings,
        config,
        resume_id=resume_id,
        rounds=rounds,
        job_id=job_id,
        wait_for_workers_s=wait_for_workers_s,
        trackers=list(trackers),
        progress=err.is_terminal if progress is None else progress,
        log_level="DEBUG" if verbose else log_level.upper(),
        out=console,
        err=err,
    )
    final = job.artifacts.get("final_pack")
    where = f"; final pack {_on_root(settings, final)}" if final else ""
    console.print(f"job {job.job_id} {job.status}{where}", highlight=False, soft_wrap=True)
    if job.status != "completed":
        if job.error:
            console.print(f"[red]{job.error}[/red]", highlight=False, soft_wrap=True)
        sys.exit(EXIT_CANCELLED if job.status == "cancelled" else EXIT_FAILED)


@main.group(cls=FleetGroup)
def jobs() -> None:
    """List, inspect, follow and cancel jobs."""


def _job_store() -> JobStore:
    from fleet.jobs import JobStore

    return JobStore.from_settings(_settings())


@jobs.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@json_option
def jobs_list(limit: int, as_json: bool) -> None:
    """The newest jobs."""
    import time

    store = _job_store()
    listed = store.list_jobs(limit=limit)
    if as_json:
        _print_json(
            [
                {
                    **job.model_dump(mode="json", exclude={"spec"}),
                    "status": job.shown_status,
                    "rounds": len(store.metrics(job.job_id)),
                }
                for job in listed
            ]
        )
        return
    table = Table("job", "kind", "status", "created", "rounds")
    for job in listed:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        table.add_row(
            job.job_id, job.kind, job.shown_status, created, str(len(store.metrics(job.job_id)))
        )
    console.print(table)


@jobs.command("show")
@click.argument("job_id")
@json_option
def jobs_show(job_id: str, as_json: bool) -> None:
    """A job's record, status history, artifacts and per-round metrics (DiLoCo: a table
    of rounds and one of leases). --json: the record and every metrics record."""
    import time

    store = _job_store()
    job = store.get(job_id)
    metrics = store.metrics(job_id)
    if as_json:
        _print_json({**job.model_dump(mode="json"), "status": job.shown_status, "metrics": metrics})
        return
    when = {
        k: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        for k, v in job.status_times.items()
    }
    rows = {
        "job": job.job_id,
        "kind": job.kind,
        "status": job.shown_status,
        "history": ", ".join(f"{k} {v}" for k, v in when.items()),
        "owner": "-" if not job.owner else f"pid {job.owner.get('pid')} on {job.owner.get('host')}",
        "error": job.error or "-",
    }
    rows |= {f"artifact {name}": path for name, path in sorted(job.artifacts.items())}
    _print_rows(rows)
    if job.kind != "diloco" or not metrics:
        if metrics:
            console.print(f"{len(metrics)} metrics records (--json shows them)", highlight=False)
        return
    from fleet.diloco.state import rounds_of
    from fleet.tracking import round_scalars, with_stderr

    records = rounds_of(store, job_id)
    replicas = int(job.spec.get("replicas", 1))
    table = Table(
        "round", "merged", "wall s", "inner s", "exchange s", "exchange MB", "B/param",
        "deadline s", "outer step s", "eval loss", title="rounds",
    )  # fmt: skip
    for record in records:
        x = round_scalars(record, replicas)
        loss = x.get("eval/loss")
        table.add_row(
            str(record.round),
            f"{len(record.merged)}/{replicas}",
            f"{x['round/wall_s']:.2f}",
            f"{x['round/inner_loop_s']:.2f}",
            f"{x['round/exchange_s']:.3f}",
            f"{record.exchange_bytes / 1e6:.2f}",
            "-" if record.bytes_per_parameter is None else f"{record.bytes_per_parameter:.2f}",
            "-" if record.deadline_s is None else f"{record.deadline_s:.2f}",
            f"{x['round/outer_step_s']:.3f}",
            with_stderr(loss, record.eval.loss_stderr if record.eval else None),
        )
    console.print(table)
    leases = Table(
        "round", "replica", "attempt", "worker", "status", "global", "state", "sent MB",
        "received MB", "microshards", title="attempts: leases, sources, bytes",
    )  # fmt: skip
    for record in records:
        for r in record.replicas:
            ids = ", ".join(s.microshard_id for s in r.lease.shards) if r.lease else "-"
            leases.add_row(
                str(record.round),
                str(r.replica),
                str(r.attempt),
                r.worker,
                r.status,
                r.global_source or "-",
                r.state_source or "-",
                f"{r.sent_bytes / 1e6:.2f}",
                f"{r.received_bytes / 1e6:.2f}",
                ids,
            )
    console.print(leases)


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def jobs_logs(job_id: str, follow: bool) -> None:
    """The log lines of a job's tasks, in order, with worker and task id."""
    import time

    store = _job_store()
    store.get(job_id)
    lines = store.follow(job_id) if follow else iter(store.logs(job_id))
    for line in lines:
        stamp = time.strftime("%H:%M:%S", time.localtime(line.ts))
        click.echo(f"{stamp} {line.worker} {line.task_id[:8]} {line.level:<7} {line.line}")


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job: its running tasks stop at their next step boundary."""
    store = _job_store()
    job = store.cancel(job_id)
    console.print(f"job {job.job_id} {job.status}", highlight=False)


@main.group(cls=FleetGroup)
def dataset() -> None:
    """Inspect, verify and write microshard datasets."""


def _on_root(settings: Any, rel: str) -> str:
    """Where a shared-root path is, for a message: a local path or a URL."""
    if settings.shared_root_is_url:
        return f"{settings.shared_root.rstrip('/')}/{rel}"
    return str(Path(settings.shared_root).resolve() / rel)


def _dataset_root(path: Path) -> tuple[Any, str]:
    """The shared root's store and ``path`` relative to it: ``path`` as given if it
    exists from here (it must lie under a local FLEET_SHARED_ROOT), else as a
    shared-root-relative path (local or on an object store)."""
    from fleet.settings import FleetSettings
    from fleet.storage import LocalStore, open_store

    store = open_store(FleetSettings.from_env())
    if isinstance(store, LocalStore) and path.exists():
        return store, store.relative(path.resolve())
    return store, path.as_posix()


@dataset.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--glob", default=None, help="Only shard files matching this (plain directories).")
@click.option("--top", default=10, show_default=True, help="Microshards to list.")
@json_option
def dataset_inspect(path: Path, glob: str | None, top: int, as_json: bool) -> None:
    """A dataset's view id, layout, microshards and bytes (sizes checked). PATH is under
    the shared root (FLEET_SHARED_ROOT), given from here or relative to it."""
    from fleet.data.dataset import read_dataset

    shared, rel = _dataset_root(path)
    index = read_dataset(shared, rel, glob=glob)
    if as_json:
        _print_json(index.model_dump(mode="json"))
        return
    rows = {
        "dataset": index.path,
        "view_id": index.view_id,
        "layout": index.layout,
        "microshards": f"{len(index.microshards):,}",
        "bytes": f"{index.total_bytes:,}",
        "content hashes": "recorded" if index.microshards[0].content_hash else "none",
    }
    _print_rows(rows, width=16)
    table = Table("ordinal", "microshard", "bytes", "file", title=f"first {top} microshards")
    for m in index.microshards[:top]:
        table.add_row(str(m.ordinal), m.microshard_id, f"{m.bytes_len:,}", m.path)
    console.print(table)


@dataset.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--glob", default=None, help="Only shard files matching this (plain directories).")
def dataset_verify(path: Path, glob: str | None) -> None:
    """Check every microshard's size and content hash; exit 1 on the first bad one."""
    from fleet.data.dataset import read_dataset, verify_dataset

    shared, rel = _dataset_root(path)
    index = read_dataset(shared, rel, glob=glob)
    hashed = verify_dataset(shared, index)
    console.print(
        f"[green]ok[/green] {index.path}: {len(index.microshards):,} microshards, "
        f"{index.total_bytes:,} bytes, {hashed:,} content hashes checked",
        soft_wrap=True,
    )


@dataset.command("write")
@click.argument("example", type=click.Choice(["charlm", "digits"]))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--microshards", type=int, default=64, show_default=True)
@click.option(
    "--layout",
    type=click.Choice(["fetch-manifest", "directory"]),
    default="fetch-manifest",
    show_default=True,
    help="burn_p2p's fetch-manifest.json with content hashes, or plain shard files.",
)
def dataset_write(example: str, path: Path, microshards: int, layout: str) -> None:
    """Write an example's training corpus as a microshard dataset at PATH (relative to
    the shared root, FLEET_SHARED_ROOT, unless absolute): then `fleet diloco --dataset
    PATH` trains on it."""
    import importlib

    from fleet.settings import FleetSettings
    from fleet.storage import LocalStore, open_store

    module = importlib.import_module(f"fleet.examples.{example}")
    manifest = layout == "fetch-manifest"
    settings = FleetSettings.from_env()
    store = open_store(settings)
    if path.is_absolute() or isinstance(store, LocalStore):
        target = str(path if path.is_absolute() else Path(settings.shared_root) / path)
        index = module.write_dataset(Path(target), microshards, manifest=manifest)
    else:  # written locally, then uploaded shard by shard, its fetch manifest last
        rel = store.relative(path.as_posix())
        with store.output(rel) as staged:
            index = module.write_dataset(staged, microshards, manifest=manifest)
        target = _on_root(settings, rel)
    console.print(
        f"[green]wrote[/green] {target}: {index['microshards']:,} microshards, "
        f"{index['bytes']:,} bytes ({layout})",
        soft_wrap=True,
    )


@main.command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option(
    "--min-age-s",
    type=float,
    default=3600.0,
    show_default=True,
    help="Only touch entries older than this (in-flight work is younger).",
)
def gc_cmd(dry_run: bool, min_age_s: float) -> None:
    """Delete what nothing needs on the shared root: stray packs of runs, unreferenced
    tmp/exchange packs, stale temp files (runs of jobs Redis does not know are kept)."""
    from fleet.gc import collect
    from fleet.jobs import JobStore
    from fleet.storage import open_store

    settings = _settings()
    store = open_store(settings)
    found = collect(store, JobStore.from_settings(settings), min_age_s=min_age_s, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for rel, size in found.delete:
        console.print(f"{verb} {rel} ({size:,} bytes)", highlight=False, soft_wrap=True)
    for run_dir in found.unknown_runs:
        console.print(f"kept {run_dir.rsplit('/', 1)[-1]}: no such job in Redis", highlight=False)
    if found.aborted_uploads:
        aborted = "would abort" if dry_run else "aborted"
        console.print(f"{aborted} {found.aborted_uploads} unfinished uploads", highlight=False)
    total = sum(size for _, size in found.delete)
    console.print(f"{len(found.delete)} entries, {total:,} bytes {verb}", highlight=False)


# --------------------------------------------------------------------------- local cluster


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
            with LocalCluster(root, workers=replicas, flower=flower) as local:
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


@main.command("exporter")
@click.option("--port", type=int, default=9808, show_default=True)
@click.option("--address", default="0.0.0.0", show_default=True)
def exporter_cmd(port: int, address: str) -> None:
    """Serve fleet's Prometheus gauges (queue lengths, workers, handles, jobs) on /metrics."""
    import time

    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from fleet.metrics import FleetCollector

    REGISTRY.register(FleetCollector(_settings()))
    start_http_server(port, addr=address)
    console.print(f"serving fleet metrics on http://{address}:{port}/metrics", highlight=False)
    while True:
        time.sleep(3600)
