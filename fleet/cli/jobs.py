"""``fleet jobs``: list, inspect, follow and cancel jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table

from fleet.cli.root import (
    FleetGroup,
    _print_json,
    _print_rows,
    _settings,
    console,
    json_option,
    main,
)

if TYPE_CHECKING:
    from fleet.jobs import JobStore


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
    if job.kind == "diloco":  # with the evaluations that landed beside later rounds
        from fleet.metrics import with_landed_json

        landed = store.evaluations(job_id)
        metrics = [with_landed_json(m, landed) for m in metrics]
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
        "deadline s", "outer step s", "step req", "eval loss", title="rounds",
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
            str(record.outer_step_requests),
            with_stderr(loss, record.eval.loss_stderr if record.eval else None),
        )
    console.print(table)
    leases = Table(
        "round", "replica", "attempt", "worker", "status", "global", "state", "sent MB",
        "received MB", "requests", "microshards",
        title="attempts: leases, sources, bytes, store requests",
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
                str(r.store_requests),
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
