"""The run report of ``fleet demo``: ``report.json`` and ``report.png``.

``report.png`` shows (1) the evaluation loss against wall-clock seconds and (2) against
tokens trained on, for the DiLoCo run and the single-worker baseline, each loss with a
band of one standard error, with the time-to-loss table (:func:`time_to_loss`), and
(3) a timeline of the DiLoCo rounds: each replica's inner loop (coloured by outcome),
the merge (outer step) and the evaluation, so stragglers and overhead are visible. All
are read from the runs' typed records.
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
from fleet.tracking import trained, with_stderr

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
    """``[(seconds since the run started, eval loss)]``: the initial model (when round 0
    started), then each round whose global model was evaluated (when the round ended: its
    commit, or the end of its evaluation where that ran before the next round)."""
    points = []
    if run.initial_eval is not None and run.initial_eval.loss is not None:
        points.append((_initial_at(run), run.initial_eval.loss))
    for m in run.rounds:
        if m.eval is not None and m.eval.loss is not None:
            points.append((m.started_at + m.wall_s - run.started_at, m.eval.loss))
    return points


def _initial_at(run: RunSummary) -> float:
    """Seconds since the run started at which its initial model was ready: when round 0
    started (after the initial evaluation, unless that ran beside round 0)."""
    assert run.initial_eval is not None
    at = run.rounds[0].started_at if run.rounds else run.initial_eval.at
    return at - run.started_at


def tokens_curve(run: RunSummary) -> list[tuple[float, float]]:
    """``[(tokens trained into the global model, eval loss)]``, the points of
    :func:`loss_curve`: the merged replicas' tokens (:func:`fleet.tracking.trained`)
    summed over the rounds so far. Empty when the workload reports no ``tokens``."""
    points = []
    if run.initial_eval is not None and run.initial_eval.loss is not None:
        points.append((0.0, run.initial_eval.loss))
    seen = 0.0
    for m in run.rounds:
        tokens = trained(m)
        if tokens is None:
            return []
        seen += tokens
        if m.eval is not None and m.eval.loss is not None:
            points.append((seen, m.eval.loss))
    return points


def first_at_or_below(curve: list[tuple[float, float]], loss: float) -> float | None:
    """The x (seconds or tokens) of the first point of ``curve`` at or below ``loss``."""
    return next((x for x, y in curve if y <= loss), None)


def time_to_loss(diloco: RunSummary, baseline: RunSummary, rows: int = 4) -> list[dict[str, Any]]:
    """Wall-clock seconds and tokens each run took to first reach target eval losses.

    The targets run evenly from the higher of the two runs' first trained evaluation
    (after round 0) down to the higher of their losses at the comparison time of
    :func:`summarize`, so both runs reach every one. Each row: ``loss``, ``diloco_s``,
    ``baseline_s``, ``speedup`` (``baseline_s / diloco_s``), ``diloco_tokens``,
    ``baseline_tokens`` (None where the workload reports no tokens).
    """
    d_curve, b_curve = loss_curve(diloco), loss_curve(baseline)
    if len(d_curve) < 2 or len(b_curve) < 2:
        return []
    t = min(d_curve[-1][0], b_curve[-1][0])
    d_end, b_end = loss_at(d_curve, t), loss_at(b_curve, t)
    if d_end is None or b_end is None:
        return []
    last = max(d_end, b_end)
    first = max(d_curve[1][1], b_curve[1][1])
    targets = (
        [last] if first <= last else [first + (last - first) * i / (rows - 1) for i in range(rows)]
    )
    d_tokens, b_tokens = tokens_curve(diloco), tokens_curve(baseline)
    out = []
    for loss in targets:
        d_s, b_s = first_at_or_below(d_curve, loss), first_at_or_below(b_curve, loss)
        out.append(
            {
                "loss": loss,
                "diloco_s": d_s,
                "baseline_s": b_s,
                "speedup": b_s / d_s if d_s and b_s is not None else None,
                "diloco_tokens": first_at_or_below(d_tokens, loss) if d_tokens else None,
                "baseline_tokens": first_at_or_below(b_tokens, loss) if b_tokens else None,
            }
        )
    return out


def time_to_loss_lines(rows: list[dict[str, Any]]) -> list[str]:
    """:func:`time_to_loss` as fixed-width text lines (the report's and the CLI's)."""

    def cell(value: float | None, fmt: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, fmt)

    head = ("eval loss", "DiLoCo s", "single s", "speed-up", "DiLoCo Mtok", "single Mtok")
    widths = (9, 9, 9, 8, 11, 11)
    lines = [" ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    for r in rows:
        cells = (
            f"{r['loss']:.4f}",
            cell(r["diloco_s"], ".0f"),
            cell(r["baseline_s"], ".0f"),
            cell(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            cell(r["diloco_tokens"], ".2f", 1e6),
            cell(r["baseline_tokens"], ".2f", 1e6),
        )
        lines.append(" ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return lines


def loss_at(curve: list[tuple[float, float]], t: float) -> float | None:
    """The last evaluated loss at or before ``t`` seconds."""
    known = [loss for at, loss in curve if at <= t]
    return known[-1] if known else None


def evaluations(run: RunSummary) -> list[tuple[float, Evaluation]]:
    """``[(seconds since the run started, evaluation)]`` with a loss, as :func:`loss_curve`."""
    points = []
    if run.initial_eval is not None and run.initial_eval.loss is not None:
        points.append((_initial_at(run), run.initial_eval))
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
        "time_to_loss": time_to_loss(diloco, baseline),
    }


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def _loss_panel(
    ax: Any, runs: list[tuple[RunSummary, list[tuple[float, float]]]], styles: tuple[str, ...]
) -> None:
    """Each run's eval loss against its curve's x, with a band of one standard error."""
    for (run, curve), style in zip(runs, styles, strict=True):
        if not curve:
            continue
        (line,) = ax.plot(
            [p[0] for p in curve], [p[1] for p in curve], style, label=run.label, markersize=4
        )
        stderrs = [e.loss_stderr for _, e in evaluations(run)]
        if len(stderrs) == len(curve) and all(se is not None for se in stderrs):
            ax.fill_between(
                [p[0] for p in curve],
                [p[1] - (se or 0.0) for p, se in zip(curve, stderrs, strict=True)],
                [p[1] + (se or 0.0) for p, se in zip(curve, stderrs, strict=True)],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    trained_losses = [loss for _, curve in runs for _, loss in curve[1:]]
    if trained_losses:  # zoom on training; the untrained model's loss is noted instead
        low, high = min(trained_losses), max(trained_losses)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run evaluated nothing: no curve to name
        ax.legend()


def plot(diloco: RunSummary, baseline: RunSummary, out_file: Path) -> None:
    """Write the three panels described in the module docstring to ``out_file``."""
    fig = plt.figure(figsize=(14, 9.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    ax_loss, ax_tokens = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_time = fig.add_subplot(grid[1, :])
    styles = ("o-", "s--")
    curves = [loss_curve(diloco), loss_curve(baseline)]
    _loss_panel(ax_loss, list(zip((diloco, baseline), curves, strict=True)), styles)
    _loss_panel(
        ax_tokens, [(diloco, tokens_curve(diloco)), (baseline, tokens_curve(baseline))], styles
    )
    trained_losses = [loss for curve in curves for _, loss in curve[1:]]
    if trained_losses and curves[0] and curves[0][0][1] > ax_loss.get_ylim()[1]:
        note = f"untrained model: {curves[0][0][1]:.2f} at 0 s (off scale)"
        ax_loss.annotate(note, xy=(0.01, 0.12), xycoords="axes fraction", fontsize=8, color="gray")
    # The notes sit bottom left: losses fall from the top left to the bottom right.
    summary = summarize(diloco, baseline)
    box = {"boxstyle": "round", "facecolor": "white", "alpha": 0.85}
    if summary["diloco_eval_loss"] is not None and summary["baseline_eval_loss"] is not None:
        d = with_stderr(summary["diloco_eval_loss"], summary["diloco_eval_loss_stderr"])
        b = with_stderr(summary["baseline_eval_loss"], summary["baseline_eval_loss_stderr"])
        text = f"at {summary['at_wall_s']:.0f} s: DiLoCo {d}, single worker {b}"
        ax_loss.annotate(text, xy=(0.01, 0.03), xycoords="axes fraction", fontsize=9, bbox=box)
    if summary["time_to_loss"]:
        table = "\n".join(["time to eval loss", *time_to_loss_lines(summary["time_to_loss"])])
        ax_tokens.annotate(
            table, xy=(0.01, 0.03), xycoords="axes fraction", fontsize=8, family="monospace",
            bbox=box,
        )  # fmt: skip
    ax_loss.set_xlabel("wall-clock seconds")
    ax_loss.set_ylabel(f"eval loss ({diloco.eval_split}, nats/byte)")
    ax_loss.set_title("Evaluation loss against wall-clock time (band: ± 1 s.e.)")
    ax_tokens.set_xlabel("tokens trained on (merged replicas)")
    ax_tokens.set_title("Evaluation loss against tokens")

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
            [(closed, max(m.outer_step_s, min_width))], (n - 0.4, 0.8), facecolors="tab:purple"
        )
        if m.eval_s and m.eval is not None:  # as it ran (beside later rounds, or not)
            evaluation = (m.eval.at - m.eval_s - start, max(m.eval_s, min_width))
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
