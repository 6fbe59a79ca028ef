"""The run report of ``fleet demo``: ``report.json`` and ``report.png``.

``report.png`` shows (1) the evaluation loss against wall-clock seconds for the DiLoCo
run and the single-worker baseline, and (2) a timeline of the DiLoCo rounds: each
replica's inner loop (coloured by outcome), the merge (outer step) and the evaluation,
so stragglers and overhead are visible. Both are read from the runs' typed records.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pydantic import BaseModel

from fleet.diloco.state import Evaluation, RoundRecord
from fleet.tracking import with_stderr

STATUS_COLOURS = {
    "merged": "tab:green",
    "aborted": "tab:orange",
    "lost": "tab:red",
    "failed": "tab:gray",
    "dropped": "tab:brown",
}


class RunSummary(BaseModel):
    """One run of the report: its label, job, config, when it started (unix s), the
    evaluation of its initial model and the record of every round."""

    label: str
    job_id: str
    config: dict[str, Any]
    replicas: int
    eval_split: Any
    started_at: float
    initial_eval: Evaluation | None
    rounds: list[RoundRecord]


def loss_curve(run: RunSummary) -> list[tuple[float, float]]:
    """``[(seconds since the run started, eval loss)]``: the initial model, then each
    round whose global model was evaluated (at the end of its evaluation)."""
    points = []
    if run.initial_eval is not None and run.initial_eval.loss is not None:
        points.append((run.initial_eval.at - run.started_at, run.initial_eval.loss))
    for m in run.rounds:
        if m.eval is not None and m.eval.loss is not None:
            points.append((m.started_at + m.wall_s - run.started_at, m.eval.loss))
    return points


def loss_at(curve: list[tuple[float, float]], t: float) -> float | None:
    """The last evaluated loss at or before ``t`` seconds."""
    known = [loss for at, loss in curve if at <= t]
    return known[-1] if known else None


def evaluations(run: RunSummary) -> list[tuple[float, Evaluation]]:
    """``[(seconds since the run started, evaluation)]`` with a loss, as :func:`loss_curve`."""
    points = []
    if run.initial_eval is not None and run.initial_eval.loss is not None:
        points.append((run.initial_eval.at - run.started_at, run.initial_eval))
    for m in run.rounds:
        if m.eval is not None and m.eval.loss is not None:
            points.append((m.started_at + m.wall_s - run.started_at, m.eval))
    return points


def stderr_at(run: RunSummary, t: float) -> float | None:
    """The standard error of the last evaluated loss at or before ``t`` seconds (None
    if the workload reports none)."""
    known = [e for at, e in evaluations(run) if at <= t]
    return known[-1].loss_stderr if known else None


def summarize(diloco: RunSummary, baseline: RunSummary) -> dict[str, Any]:
    """Both runs compared at the same wall-clock time (the shorter run's end)."""
    d_curve, b_curve = loss_curve(diloco), loss_curve(baseline)
    t = min(d_curve[-1][0], b_curve[-1][0]) if d_curve and b_curve else 0.0
    d_loss, b_loss = loss_at(d_curve, t), loss_at(b_curve, t)
    end = float("inf")
    return {
        "at_wall_s": t,
        "diloco_eval_loss": d_loss,
        "diloco_eval_loss_stderr": stderr_at(diloco, t),
        "baseline_eval_loss": b_loss,
        "baseline_eval_loss_stderr": stderr_at(baseline, t),
        "diloco_final_eval_loss": d_curve[-1][1] if d_curve else None,
        "diloco_final_eval_loss_stderr": stderr_at(diloco, end),
        "baseline_final_eval_loss": b_curve[-1][1] if b_curve else None,
        "baseline_final_eval_loss_stderr": stderr_at(baseline, end),
        "diloco_better": d_loss is not None and b_loss is not None and d_loss < b_loss,
        "diloco_exchange_bytes_per_round": _mean([m.exchange_bytes for m in diloco.rounds]),
        "diloco_deadlines_s": [m.deadline_s for m in diloco.rounds],
    }


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def plot(diloco: RunSummary, baseline: RunSummary, out_file: Path) -> None:
    """Write the two panels described in the module docstring to ``out_file``."""
    fig, (ax_loss, ax_time) = plt.subplots(2, 1, figsize=(11, 8.5), height_ratios=[3, 2])
    curves = [loss_curve(diloco), loss_curve(baseline)]
    for run, curve, style in zip((diloco, baseline), curves, ("o-", "s--"), strict=True):
        if curve:
            (line,) = ax_loss.plot(
                [p[0] for p in curve], [p[1] for p in curve], style, label=run.label, markersize=4
            )
            banded = [(t, e.loss, e.loss_stderr) for t, e in evaluations(run) if e.loss_stderr]
            if banded:  # one standard error either side
                ax_loss.fill_between(
                    [b[0] for b in banded],
                    [b[1] - b[2] for b in banded],  # type: ignore[operator]
                    [b[1] + b[2] for b in banded],  # type: ignore[operator]
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
    trained = [loss for curve in curves for _, loss in curve[1:]]
    if trained:  # zoom on training; the untrained model's loss is noted instead
        low, high = min(trained), max(trained)
        pad = 0.05 * (high - low or 1.0)
        ax_loss.set_ylim(low - pad, high + pad)
        if curves[0] and curves[0][0][1] > high + pad:
            note = f"untrained model: {curves[0][0][1]:.2f} at 0 s (off scale)"
            ax_loss.annotate(
                note, xy=(0.01, 0.12), xycoords="axes fraction", fontsize=8, color="gray"
            )
    # Both notes sit bottom left: losses fall from the top left to the bottom right.
    summary = summarize(diloco, baseline)
    if summary["diloco_eval_loss"] is not None and summary["baseline_eval_loss"] is not None:
        d = with_stderr(summary["diloco_eval_loss"], summary["diloco_eval_loss_stderr"])
        b = with_stderr(summary["baseline_eval_loss"], summary["baseline_eval_loss_stderr"])
        text = f"at {summary['at_wall_s']:.0f} s: DiLoCo {d}, single worker {b}"
        box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.8}
        ax_loss.annotate(text, xy=(0.01, 0.03), xycoords="axes fraction", fontsize=9, bbox=box)
    ax_loss.set_xlabel("wall-clock seconds")
    ax_loss.set_ylabel(f"eval loss ({diloco.eval_split}, nats/byte)")
    ax_loss.set_title("Evaluation loss against wall-clock time")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    start, n = diloco.started_at, diloco.replicas
    last = diloco.rounds[-1] if diloco.rounds else None
    span = (last.started_at + last.wall_s - start) if last else 1.0
    min_width = span / 300  # keep sub-second merges and evaluations visible
    rows = [f"replica {i}" for i in range(n)] + ["merge", "eval"]
    for m in diloco.rounds:
        for r in m.replicas:
            ax_time.broken_barh(
                [(r.started_at - start, r.finished_at - r.started_at)],
                (r.replica - 0.4, 0.8),
                facecolors=STATUS_COLOURS.get(r.status, "tab:blue"),
                edgecolor="black",
                linewidth=0.3,
            )
        closed = m.closed_at - start
        if m.deadline_s is not None:  # where the round would have stopped waiting
            at = m.started_at - start + m.deadline_s
            ax_time.plot([at, at], [-0.5, n - 0.5], color="tab:red", linewidth=0.8, alpha=0.6)
        ax_time.broken_barh(
            [(closed, max(m.merge_s, min_width))], (n - 0.4, 0.8), facecolors="tab:purple"
        )
        if m.eval_s:
            evaluation = (closed + m.merge_s, max(m.eval_s, min_width))
            ax_time.broken_barh([evaluation], (n + 0.6, 0.8), facecolors="tab:cyan")
    ax_time.set_yticks(range(len(rows)), rows)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("wall-clock seconds (DiLoCo run)")
    ax_time.set_title(
        "DiLoCo rounds: inner loops (green merged, orange aborted, red lost), deadlines"
        " (red lines), merge, eval"
    )
    ax_time.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path, diloco: RunSummary, baseline: RunSummary, extra: dict[str, Any]
) -> tuple[Path, Path, dict[str, Any]]:
    """Write ``report.json`` and ``report.png`` to ``out_dir``; their paths and the
    comparison (:func:`summarize`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = summarize(diloco, baseline)
    report = {
        "created_at": time.time(),
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        **extra,
        "diloco": diloco.model_dump(mode="json"),
        "baseline": baseline.model_dump(mode="json"),
        "comparison": comparison,
    }
    json_path, png_path = out_dir / "report.json", out_dir / "report.png"
    json_path.write_text(json.dumps(report, indent=2))
    plot(diloco, baseline, png_path)
    return json_path, png_path, comparison
