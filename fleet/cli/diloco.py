"""``fleet diloco``: run DiLoCo with any workload on the fleet, as a job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from fleet.cli.diloco_flags import config_options, given_flags
from fleet.cli.root import EXIT_FAILED, _on_root, _settings, console, main

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
    from fleet.cli.diloco_run import diloco_config, run_diloco

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
