"""Per-round metrics of a DiLoCo run, sent to experiment trackers and a progress bar.

Every tracker is fed from :class:`~fleet.diloco.DiLoCoRun`'s ``on_round`` hook with the
scalars of :func:`round_scalars`, at step ``round + 1`` (the rounds completed):

| scalar | what |
|---|---|
| ``eval/loss``, ``eval/<metric>`` | the new global model's evaluation (numeric metrics) |
| ``train/loss`` | mean over the merged replicas of their inner loops' mean loss |
| ``train/tokens_per_s``, or ``train/examples_per_s`` | merged replicas, over the round's wall |
| ``round/wall_s`` | the round, launch to commit |
| ``round/inner_loop_s`` | the slowest merged replica's inner steps |
| ``round/exchange_s`` | the slowest merged replica's global model and state load and upload |
| ``round/outer_step_s``, ``round/eval_s`` | the outer step, the evaluation |
| ``round/exchange_bytes`` | bytes every worker moved to and from the shared root |
| ``round/bytes_per_parameter`` | the busiest worker's bytes (sent + received) per parameter |
| ``round/store_requests`` | the most store requests a merged replica's worker sent |
| ``round/outer_step_requests`` | store requests of the outer step's worker |
| ``round/deadline_s`` | the round's deadline (fixed or adaptive), when it had one |
| ``replicas/merged``, ``replicas/dropped`` | replicas in the outer step, and the others |

Trackers, named on the command line as ``KIND:WHERE`` (:func:`parse_tracker`):
``tensorboard:DIR`` (event files under ``DIR/<job id>``, tensorboardX),
``mlflow[:URI]`` (one MLflow run per job, tagged ``fleet.job_id``; default URI
``sqlite:///mlruns/mlflow.db``, a plain path becomes a SQLite file in it),
``wandb[:PROJECT]`` (one Weights & Biases run per job, offline unless ``WANDB_API_KEY``
or ``WANDB_MODE`` says otherwise, files under ``$WANDB_DIR/wandb``), and
``jsonl:PATH`` (one JSON object per round appended to PATH).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fleet.errors import TrackerError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from fleet.diloco.state import RoundRecord

#: MLflow's tracking URI when ``--tracker mlflow`` names none (and MLFLOW_TRACKING_URI is unset).
DEFAULT_MLFLOW_URI = "sqlite:///mlruns/mlflow.db"
#: The MLflow experiment fleet's runs are logged under.
MLFLOW_EXPERIMENT = "fleet"
#: The W&B project of ``--tracker wandb`` when it names none (and WANDB_PROJECT is unset).
DEFAULT_WANDB_PROJECT = "fleet"
#: Eval metrics that are counts, not measurements: not sent as ``eval/<name>``.
COUNT_METRICS = ("examples", "batches", "tokens")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def trained(record: RoundRecord, unit: str = "tokens") -> float | None:
    """How many ``unit`` (``tokens`` or ``examples``) the round's merged replicas trained
    on: each one's per-step metric times its steps completed; None when a merged replica
    does not report it (a workload may return fewer metrics than charlm)."""
    merged = record.merged
    per_step = [_number(r.metrics.get(unit)) for r in merged]
    if not merged or any(x is None for x in per_step):
        return None
    return sum((x or 0.0) * (r.steps_completed or 0) for x, r in zip(per_step, merged, strict=True))


def round_scalars(record: RoundRecord, replicas: int) -> dict[str, float]:
    """The scalars of one committed round (module docstring), for a run of ``replicas``."""
    merged = record.merged
    out: dict[str, float] = {}
    if record.eval is not None:
        for name, value in record.eval.metrics.items():
            number = _number(value)
            if number is not None and name not in COUNT_METRICS:
                out[f"eval/{name}"] = number
    losses = [
        x for x in (_number(r.metrics.get("mean_loss", r.loss)) for r in merged) if x is not None
    ]
    if losses:
        out["train/loss"] = sum(losses) / len(losses)
    for unit in ("tokens", "examples"):
        done = trained(record, unit)
        if done is not None and record.wall_s > 0:
            out[f"train/{unit}_per_s"] = done / record.wall_s
            break
    out["round/wall_s"] = record.wall_s
    out["round/inner_loop_s"] = max((r.compute_s for r in merged), default=0.0)
    out["round/exchange_s"] = max((r.load_s + r.publish_s for r in merged), default=0.0)
    out["round/outer_step_s"] = record.outer_step_s
    out["round/eval_s"] = record.eval_s
    out["round/exchange_bytes"] = float(record.exchange_bytes)
    if record.bytes_per_parameter is not None:
        out["round/bytes_per_parameter"] = record.bytes_per_parameter
    out["round/store_requests"] = float(max((r.store_requests for r in merged), default=0))
    out["round/outer_step_requests"] = float(record.outer_step_requests)
    if record.deadline_s is not None:
        out["round/deadline_s"] = record.deadline_s
    out["replicas/merged"] = float(len(merged))
    out["replicas/dropped"] = float(replicas - len(merged))
    return out


class Tracker(Protocol):
    """Where a run's per-round scalars go."""

    def start(self, job_id: str, config: dict[str, Any]) -> None:
        """Called once before the first round this process runs (also on a resume)."""

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        """One committed round's scalars at ``step`` (the rounds completed)."""

    def close(self) -> None:
        """Flush and close; called once, also when the run failed."""


class TensorBoardTracker:
    """Event files under ``<log_dir>/<job id>`` (tensorboardX's SummaryWriter): open them
    with ``tensorboard --logdir <log_dir>``."""

    def __init__(self, log_dir: str) -> None:
        _require("tensorboard", "tensorboardX")
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def start(self, job_id: str, config: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(self.log_dir / job_id))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", 0)

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowTracker:
    """One MLflow run per job (run name: the job id; tag ``fleet.job_id``), its config as
    flattened params; a resumed job logs on into the same run."""

    def __init__(self, uri: str | None) -> None:
        import os

        _require("mlflow", "mlflow")
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
        if "://" not in self.uri and not self.uri.startswith(("sqlite:", "file:", "databricks")):
            path = Path(self.uri)
            db = path if path.suffix == ".db" else path / "mlflow.db"
            self.uri = f"sqlite:///{db}"
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, job_id: str, config: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        exp_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(MLFLOW_EXPERIMENT)
        )
        found = self.client.search_runs([exp_id], filter_string=f"tags.`fleet.job_id` = '{job_id}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(exp_id, run_name=job_id, tags={"fleet.job_id": job_id})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)


class WandbTracker:
    """One Weights & Biases run per job: run id and name from the job id (a resumed job
    logs on into the same run), its config flattened as :class:`MLflowTracker`'s params
    are, each round's scalars at step ``round + 1``.

    Without ``WANDB_API_KEY`` (and no ``WANDB_MODE``) the run is offline: its files go
    under ``$WANDB_DIR/wandb/offline-run-*`` (``WANDB_DIR`` default: the working
    directory), for ``wandb sync`` later. ``project``: the W&B project, else
    ``WANDB_PROJECT``, else ``fleet``. W&B does not capture the console (``fleet
    diloco``'s progress bar stays as it is).
    """

    def __init__(self, project: str | None) -> None:
        import os

        _require("wandb", "wandb")
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT
        online = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
        self.mode: Literal["offline"] | None = None if online else "offline"
        self.run: Any = None

    def start(self, job_id: str, config: dict[str, Any]) -> None:
        import re

        import wandb

        self.run = wandb.init(
            project=self.project,
            id=re.sub(r"[^A-Za-z0-9_-]", "-", job_id),
            name=job_id,
            config=_flatten(config),
            mode=self.mode,
            resume="allow",
            settings=wandb.Settings(console="off"),
        )

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class JsonlTracker:
    """One line per round appended to a file: ``{"job_id", "round", "step", <scalars>}``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.job_id = ""

    def start(self, job_id: str, config: dict[str, Any]) -> None:
        self.job_id = job_id
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        line = {"job_id": self.job_id, "round": step - 1, "step": step, **scalars}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        pass


def parse_tracker(spec: str) -> Tracker:
    """A tracker from ``tensorboard:DIR``, ``mlflow[:URI]``, ``wandb[:PROJECT]`` or
    ``jsonl:PATH``.

    Raises:
        TrackerError: an unknown kind, no DIR / PATH where one is needed, or the
            tracker's library is not installed (naming the extra that installs it).
    """
    kind, _, where = spec.partition(":")
    if kind == "mlflow":
        return MLflowTracker(where or None)
    if kind == "wandb":
        return WandbTracker(where or None)
    if kind in ("tensorboard", "jsonl") and not where:
        raise TrackerError(
            kind, f"give a place: {kind}:{'DIR' if kind == 'tensorboard' else 'PATH'}"
        )
    if kind == "tensorboard":
        return TensorBoardTracker(where)
    if kind == "jsonl":
        return JsonlTracker(where)
    raise TrackerError(
        kind,
        f"unknown tracker {spec!r}: use tensorboard:DIR, mlflow[:URI], wandb[:PROJECT] or "
        "jsonl:PATH",
    )


class RoundProgress:
    """A rich progress bar over a run's rounds, with the eval loss and throughput; the
    bar's console also shows log lines above it."""

    def __init__(self, console: Console, label: str, total: float) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress: Progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("eval loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task: TaskID = self.progress.add_task(label, total=total, loss="-", rate="")

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, scalars: dict[str, float], *, advance: float = 0.0, **fields: Any) -> None:
        """Show a round's scalars (and advance the bar by ``advance``)."""
        loss = scalars.get("eval/loss")
        rate = ""
        for unit in ("tokens", "examples"):
            if f"train/{unit}_per_s" in scalars:
                rate = (
                    f"{scalars[f'train/{unit}_per_s']:,.0f} {'tok' if unit == 'tokens' else 'ex'}/s"
                )
                break
        shown = {"loss": "-" if loss is None else f"{loss:.3f}", "rate": rate} | fields
        self.progress.update(self.task, advance=advance, **shown)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _require(kind: str, module: str) -> None:
    """Raise now, before any job starts, if ``module`` is not installed.

    Raises:
        TrackerError: naming the extra that installs it.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TrackerError(kind, f"{module} is not installed: pip install 'fleet-diloco[{kind}]'")


def with_stderr(loss: float | None, stderr: float | None) -> str:
    """``1.5672 ± 0.0021`` (or the loss alone, or ``-``): an eval loss as fleet prints it."""
    if loss is None:
        return "-"
    return f"{loss:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
