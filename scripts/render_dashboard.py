#!/usr/bin/env python3
"""Render the Grafana dashboard's panels (ops/grafana/fleet.json) to a PNG from a live
Prometheus, with matplotlib: each panel's queries over the last ``--minutes`` through
``/api/v1/query_range``, laid out by the panels' grid positions, titles, units and
legends as Grafana would show them (lines; stacked bars for bar panels).

    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --minutes 15 --out docs/dashboard.png

Dashboard variables: ``$job_id`` is every job (``.*``), ``$__rate_interval`` is
``--rate-interval``. Exits 1 with one line when Prometheus cannot be reached or refuses
a query.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Grafana's grid is 24 columns wide; one grid row is this many inches tall.
GRID_COLUMNS = 24
ROW_INCHES = 0.5
WIDTH_INCHES = 15.0


class RenderError(Exception):
    """Prometheus could not be reached, or refused a query."""


def query_range(url: str, expr: str, start_s: float, end_s: float, step_s: float) -> list[Any]:
    """The matrix ``/api/v1/query_range`` returns for ``expr`` (unix seconds)."""
    params = urllib.parse.urlencode(
        {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s:g}"}
    )
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as reply:
            data = json.loads(reply.read())
    except (urllib.error.URLError, OSError) as exc:
        raise RenderError(f"{url}: {exc}") from exc
    if data.get("status") != "success":
        raise RenderError(f"query refused: {expr}: {data.get('error')}")
    return list(data["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    """A Grafana ``legendFormat`` (``{{label}}``) filled in from a series' labels."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def _scale(unit: str, largest: float) -> tuple[float, str]:
    """A factor and label for a Grafana unit: bytes in kB or MB by the largest value."""
    if unit == "bytes":
        return (1e-6, "MB") if largest >= 1e6 else (1e-3, "kB")
    return 1.0, {"s": "seconds", "none": ""}.get(unit, unit)


def render(
    dashboard: dict[str, Any], url: str, minutes: float, rate_interval: str, out: Path
) -> int:
    """Draw every panel of ``dashboard`` into ``out`` (PNG); returns the panel count.

    Raises:
        RenderError: Prometheus could not be reached or refused a query.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    end_s = time.time()
    start_s = end_s - minutes * 60
    step_s = max(1.0, minutes * 60 / 300)
    limits = (mdates.date2num(datetime.fromtimestamp(start_s)),
              mdates.date2num(datetime.fromtimestamp(end_s)))  # fmt: skip
    fig = plt.figure(figsize=(WIDTH_INCHES, rows * ROW_INCHES), dpi=80, layout="constrained")
    grid = GridSpec(rows, GRID_COLUMNS, figure=fig)
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[pos["y"] : pos["y"] + pos["h"], pos["x"] : pos["x"] + pos["w"]])
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        bars = defaults.get("custom", {}).get("drawStyle") == "bars"
        lines: list[tuple[str, list[float], list[float]]] = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$job_id", ".*")
            expr = expr.replace("$__rate_interval", rate_interval)
            for series in query_range(url, expr, start_s, end_s, step_s):
                name = legend(target.get("legendFormat", ""), series["metric"]) or expr
                times = [
                    mdates.date2num(datetime.fromtimestamp(float(t))) for t, _ in series["values"]
                ]
                lines.append((name, times, [float(v) for _, v in series["values"]]))
        largest = max((max(v) for _, _, v in lines if v), default=0.0)
        scale, unit = _scale(defaults.get("unit", "none"), largest)
        bottom: dict[float, float] = {}
        for name, times, values in sorted(lines):
            scaled = [v * scale for v in values]
            if bars:
                base = [bottom.get(t, 0.0) for t in times]
                ax.bar(times, scaled, width=step_s / 86400, bottom=base, label=name)
                for t, v in zip(times, scaled, strict=True):
                    bottom[t] = bottom.get(t, 0.0) + v
            else:
                ax.plot(times, scaled, label=name, linewidth=1.6, marker=".", markersize=3)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.set_xlim(*limits)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, loc="upper left", ncol=3, framealpha=0.7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{dashboard['title']} (last {minutes:.1f} min)", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return len(panels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL.")
    parser.add_argument("--dashboard", type=Path, default=REPO / "ops" / "grafana" / "fleet.json")
    parser.add_argument("--minutes", type=float, default=15.0, help="The window to draw.")
    parser.add_argument("--rate-interval", default="1m", help="$__rate_interval's value.")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    try:
        count = render(dashboard, args.prometheus.rstrip("/"), args.minutes, args.rate_interval,
                       args.out)  # fmt: skip
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{count} panels from {args.prometheus} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
