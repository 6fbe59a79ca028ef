"""What ``fleet diloco`` does once its flags are read: the effective config (file, then
flags), the run with its log lines, progress bar and trackers."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.config_file import build_config, read_config_file
from fleet.errors import RunConfigError

log = logging.getLogger("fleet.diloco")

if TYPE_CHECKING:
    from rich.console import Console

    from fleet.diloco.state import RoundRecord
    from fleet.jobs import Job
    from fleet.settings import FleetSettings
    from fleet.tracking import Tracker


def diloco_config(
    config_file: Path | None, config_json: str | None, given: dict[str, tuple[str, Any]]
) -> DiLoCoConfig:
    """The config of ``config_file`` (if any) with the given flags on top.

    Raises:
        RunConfigError: a bad file, bad ``--config-json``, no workload, dataset flags
            without a dataset, an unknown key or a value the config refuses.
    """
    data = read_config_file(config_file) if config_file is not None else {}
    overrides = {path: value for path, (_, value) in given.items()}
    if config_json:
        try:
            extra = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise RunConfigError("--config-json", f"not JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise RunConfigError("--config-json", "must be a JSON object")
        overrides["config"] = {**(data.get("config") or {}), **extra}
    if "workload" not in data and "workload" not in overrides:
        raise RunConfigError("flags", "give --workload (or workload in --config, or --resume JOB)")
    dataset_flags = [flag for path, (flag, _) in given.items() if path.startswith("dataset.")]
    has_path = "dataset.path" in overrides or isinstance(data.get("dataset"), dict)
    if dataset_flags and not has_path:
        raise RunConfigError("flags", f"{', '.join(dataset_flags)} need a dataset: give --dataset")
    source = str(config_file) if config_file is not None else "flags"
    if config_file is not None and overrides:
        source += " with flags"
    return build_config(data, overrides, source=source)


def _log_to(err: Console, level: str) -> logging.Handler:
    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("fleet")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def run_diloco(
    settings: FleetSettings,
    config: DiLoCoConfig | None,
    *,
    resume_id: str | None,
    rounds: int | None,
    job_id: str | None,
    wait_for_workers_s: float,
    trackers: list[str],
    progress: bool,
    log_level: str,
    out: Console,
    err: Console,
) -> Job:
    """Start (``config``) or resume (``resume_id``, optionally with more ``rounds``) a
    DiLoCo job and run it to its end, logging to ``err``; returns its final record.

    Raises:
        TrackerError: a tracker spec that cannot be used (before anything runs).
        FleetError: as :meth:`DiLoCoRun.run` (the job is recorded as failed).
    """
    from fleet.client import Fleet
    from fleet.diloco import DiLoCoRun
    from fleet.tracking import RoundProgress, parse_tracker, round_scalars

    sinks: list[Tracker] = [parse_tracker(spec) for spec in trackers]
    fleet = Fleet(settings)
    bar: RoundProgress | None = None

    def on_round(record: RoundRecord) -> None:
        scalars = round_scalars(record, run.config.replicas)
        for sink in list(sinks):
            try:
                sink.log_round(record.round + 1, scalars)
            except Exception as exc:  # a tracker never stops the training it reports on
                _drop(sinks, sink, exc)
        if bar is not None:
            bar.update(scalars, advance=1)

    if resume_id is not None:
        run = DiLoCoRun.resume(fleet, resume_id, on_round=on_round, rounds=rounds)
    else:
        assert config is not None
        run = DiLoCoRun.start(fleet, config, job_id=job_id, on_round=on_round)
    handler = _log_to(err, log_level)
    with contextlib.ExitStack() as stack:
        stack.callback(logging.getLogger("fleet").removeHandler, handler)
        if wait_for_workers_s:
            with err.status(f"waiting up to {wait_for_workers_s:g} s for a live worker ..."):
                fleet.wait_for_workers(1, timeout_s=wait_for_workers_s)
        else:
            fleet.wait_for_workers(1, timeout_s=0)
        out.print(f"job {run.job_id}", highlight=False)
        for sink in list(sinks):
            try:
                sink.start(run.job_id, run.config.model_dump(mode="json"))
            except Exception as exc:  # e.g. an unwritable directory: train, say so once
                _drop(sinks, sink, exc)
                continue
            stack.callback(sink.close)
        if progress:
            done = len(run.rounds())
            bar = stack.enter_context(
                RoundProgress(err, f"DiLoCo x{run.config.replicas}", run.config.rounds)
            )
            bar.update({}, advance=done)
        return run.run()


def _drop(sinks: list[Tracker], sink: Tracker, exc: Exception) -> None:
    """Stop logging to a tracker that failed, with one warning line."""
    log.warning("%s failed (%s: %s); the run goes on without it", type(sink).__name__,
                type(exc).__name__, exc)  # fmt: skip
    sinks.remove(sink)
