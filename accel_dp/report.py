"""Training curves of one or several runs, read from their metrics.jsonl: a PNG with loss, evaluation metrics,
throughput and learning rate against the optimizer step (runs overlaid, one colour each), and a one-page HTML
that shows the PNG and a table of each run's final numbers from its all_results.json.

Reading and layout are pure functions; `draw_curves` and `write_report` write the files.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import UsageError

DPI = 100
PANEL_WIDTH_IN, PANEL_HEIGHT_IN, LEGEND_HEIGHT_IN = 6.0, 4.0, 0.5
# One colour per run (matplotlib's tab10), one line style and marker per metric within a panel.
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
METRIC_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"))
MARKERS_UP_TO = 20  # a series this short gets markers, so that a single evaluation still shows as a point


@dataclass(frozen=True)
class Run:
    name: str  # the legend's and the table's name for it: the folder name, with its parent if two are alike
    path: Path
    records: list[dict]
    results: dict | None  # all_results.json, written when the run finished
    skipped_lines: int = 0  # lines of metrics.jsonl that were not JSON objects (e.g. cut short by a kill)


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class PlottedSeries:
    panel: str
    run: str
    metric: str
    points: int
    color: str


@dataclass(frozen=True)
class PanelBox:
    """Where a panel's plotting area lies in the PNG, in pixels from the top-left corner."""

    title: str
    left: int
    top: int
    right: int
    bottom: int


@dataclass(frozen=True)
class DrawnFigure:
    path: Path
    width_px: int
    height_px: int
    panels: list[PanelBox]
    series: list[PlottedSeries]


# ------------------------------------------------------------------------------------------------- reading
def parse_metrics(text: str) -> tuple[list[dict], int]:
    """The JSON-object lines of a metrics.jsonl, and how many non-blank lines were not one."""
    records, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def run_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; where two are alike, as many parent folders as it takes to tell them apart."""
    resolved = [p.resolve() for p in paths]
    depths = [1] * len(resolved)
    while True:
        names = ["/".join(p.parts[-d:]).lstrip("/") for p, d in zip(resolved, depths, strict=True)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1 and depths[i] < len(resolved[i].parts)]
        if not clashing:
            return names
        for i in clashing:
            depths[i] += 1


def load_run(path: Path, name: str | None = None) -> Run:
    if not path.is_dir():
        raise UsageError(f"run folder {path} does not exist: give the --output_dir of a training run")
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UsageError(f"{path} has no metrics.jsonl: it is not a run folder, or the run has not logged yet")
    records, skipped = parse_metrics(metrics_file.read_text(encoding="utf-8"))
    results_file = path / "all_results.json"
    results = None
    if results_file.is_file():
        try:
            loaded = json.loads(results_file.read_text(encoding="utf-8"))
            results = loaded if isinstance(loaded, dict) else None
        except json.JSONDecodeError:
            results = None
    return Run(name=name or path.resolve().name, path=path, records=records, results=results, skipped_lines=skipped)


def load_runs(paths: list[Path]) -> list[Run]:
    if not paths:
        raise UsageError("no run folder given: pass one or more --output_dir folders of training runs")
    return [load_run(path, name) for path, name in zip(paths, run_names(paths), strict=True)]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every record that has a finite number for `metric` and a numeric step."""
    steps, values = [], []
    for record in records:
        if is_number(record.get(metric)) and is_number(record.get("step")):
            steps.append(record["step"])
            values.append(record[metric])
    return steps, values


# ------------------------------------------------------------------------------------------------- layout
METRIC_LABELS = {
    "loss": "train loss",
    "eval_loss": "eval loss",
    "tokens_per_second": "tokens/s",
    "samples_per_second": "samples/s",
    "lr": "learning rate",
}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.removeprefix("eval_").replace("_", " "))


def choose_panels(runs: list[Run]) -> list[Panel]:
    """The panels that have something to show, in a fixed order: loss, evaluation, throughput, learning rate."""
    present: list[str] = []
    for run in runs:
        for record in run.records:
            for key, value in record.items():
                if key not in present and is_number(value):
                    present.append(key)
    eval_metrics = tuple(m for m in present if m.startswith("eval_") and m not in ("eval_loss", "eval_samples"))
    candidates = [
        Panel("Loss", "loss", tuple(m for m in ("loss", "eval_loss") if m in present)),
        Panel("Evaluation", "metric", eval_metrics),
        Panel("Throughput", "tokens per second", ("tokens_per_second",) if "tokens_per_second" in present else ()),
        Panel("Throughput", "samples per second", ("samples_per_second",) if "samples_per_second" in present else ()),
        Panel("Learning rate", "learning rate", ("lr",) if "lr" in present else ()),
    ]
    panels = [p for p in candidates if p.metrics]
    if sum(p.title == "Throughput" for p in panels) > 1:  # both units (a GPT run beside a GLUE run): say which
        panels = [Panel(f"Throughput ({metric_label(p.metrics[0])})", p.ylabel, p.metrics) if p.title == "Throughput"
                  else p for p in panels]  # fmt: skip
    return panels


def grid_shape(n_panels: int) -> tuple[int, int]:
    """(rows, columns): one panel alone, else two per row."""
    columns = 1 if n_panels <= 1 else 2
    return max(1, math.ceil(n_panels / columns)), columns


def figure_size_px(n_panels: int) -> tuple[int, int]:
    """(width, height) of the PNG for this many panels: 600 x 400 pixels per panel plus a legend strip."""
    rows, columns = grid_shape(n_panels)
    return round(columns * PANEL_WIDTH_IN * DPI), round((rows * PANEL_HEIGHT_IN + LEGEND_HEIGHT_IN) * DPI)


# ------------------------------------------------------------------------------------------------- drawing
def draw_curves(runs: list[Run], png_path: Path) -> DrawnFigure:
    """Draw every panel with every run's series on it and save the PNG; say what was drawn where."""
    # The Agg canvas, attached to this figure only: no pyplot, no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator

    panels = choose_panels(runs)
    if not panels:
        names = ", ".join(run.name for run in runs)
        raise UsageError(f"no numeric metrics with a step in the metrics.jsonl of {names}: nothing to plot")
    rows, columns = grid_shape(len(panels))
    width_px, height_px = figure_size_px(len(panels))
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    axes_list = [ax for row in axes_grid for ax in row]
    for spare in axes_list[len(panels) :]:
        figure.delaxes(spare)
    axes_list = axes_list[: len(panels)]

    plotted: list[PlottedSeries] = []
    for panel, ax in zip(panels, axes_list, strict=True):
        last_step = 1
        for run_index, run in enumerate(runs):
            color = RUN_COLORS[run_index % len(RUN_COLORS)]
            for metric_index, metric in enumerate(panel.metrics):
                steps, values = series(run.records, metric)
                if not steps:
                    continue
                linestyle, marker = METRIC_STYLES[metric_index % len(METRIC_STYLES)]
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linestyle=linestyle,
                    marker=marker if len(steps) <= MARKERS_UP_TO else None,
                    markersize=6 if len(steps) == 1 else 3.5,
                    linewidth=1.6,
                )
                last_step = max(last_step, *steps)
                plotted.append(PlottedSeries(panel.title, run.name, metric, len(steps), color))
        ax.set_title(panel.title, fontsize=11, loc="left", fontweight="bold")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if panel.metrics[0] in ("tokens_per_second", "samples_per_second"):
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        if panel.metrics == ("lr",):  # 0.003 rather than an offset "1e-3" that would sit on the title
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
        ax.set_xlim(0, last_step * 1.03)  # from step 0, so that panels of the same runs line up
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(panel.metrics) > 1:  # which line style is which metric; the colours are the runs (figure legend)
            styles = [
                Line2D([], [], color="#444444", linestyle=METRIC_STYLES[i % len(METRIC_STYLES)][0],
                       marker=METRIC_STYLES[i % len(METRIC_STYLES)][1], markersize=4)
                for i in range(len(panel.metrics))
            ]  # fmt: skip
            ax.legend(styles, [metric_label(m) for m in panel.metrics], fontsize=8, frameon=False)

    run_handles = [Line2D([], [], color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=3) for i in range(len(runs))]
    figure.legend(
        run_handles,
        [run.name for run in runs],
        loc="outside upper center",
        ncols=min(len(runs), 4),
        frameon=False,
        fontsize=10,
    )
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=DPI, facecolor="white")

    boxes = []
    for panel, ax in zip(panels, axes_list, strict=True):
        extent = ax.get_window_extent()
        boxes.append(
            PanelBox(
                panel.title,
                left=round(extent.x0),
                top=round(height_px - extent.y1),
                right=round(extent.x1),
                bottom=round(height_px - extent.y0),
            )
        )
    return DrawnFigure(png_path, width_px, height_px, boxes, plotted)


# ------------------------------------------------------------------------------------------------- HTML
def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def summary_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per run): where the run is, how far it got, then every key of all_results.json."""
    rows = [
        ("folder", [str(run.path) for run in runs]),
        ("last logged step", [format_value(max(series(run.records, "step")[0], default=None)) for run in runs]),
        ("metrics records", [format_value(len(run.records)) for run in runs]),
    ]
    keys: list[str] = []
    for run in runs:
        keys += [key for key in (run.results or {}) if key not in keys]
    for key in keys:
        rows.append(
            (key, [format_value(run.results[key]) if run.results and key in run.results else "–" for run in runs])
        )
    return rows


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1240px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #666; font-size: 0.9rem; margin-top: 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { text-align: left; padding: 0.3rem 0.8rem; border-bottom: 1px solid #eee; vertical-align: top; }
td { font-variant-numeric: tabular-nums; word-break: break-all; }
th.run { border-bottom: 2px solid var(--run-color); }
.note { color: #a15c00; font-size: 0.9rem; }
"""


def render_html(runs: list[Run], figure: DrawnFigure, image_src: str, generated_at: str | None = None) -> str:
    """The report page: the figure (by `image_src`, relative to the page) and the final-numbers table."""
    esc = html.escape
    generated_at = generated_at or time.strftime("%Y-%m-%d %H:%M")
    header = "".join(
        f'<th class="run" style="--run-color: {RUN_COLORS[i % len(RUN_COLORS)]}">{esc(run.name)}</th>'
        for i, run in enumerate(runs)
    )
    body = "\n".join(
        f"<tr><th>{esc(name)}</th>{''.join(f'<td>{esc(cell)}</td>' for cell in cells)}</tr>"
        for name, cells in summary_rows(runs)
    )
    notes = [
        f"{esc(run.name)}: no all_results.json, the run has not finished (or was stopped)"
        for run in runs
        if run.results is None
    ]
    notes += [
        f"{esc(run.name)}: {run.skipped_lines} line(s) of metrics.jsonl were not JSON records and were left out"
        for run in runs
        if run.skipped_lines
    ]
    notes_html = "".join(f'<p class="note">{note}</p>' for note in notes)
    names = ", ".join(run.name for run in runs)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>accel-dp report: {esc(names)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Training report</h1>
<p class="meta">{len(runs)} run(s): {esc(names)} &middot; generated {esc(generated_at)} by accel-dp {__version__}</p>
<img src="{esc(image_src)}" width="{figure.width_px}" height="{figure.height_px}" alt="Training curves of {esc(names)}">
<h2>Final results</h2>
{notes_html}
<table>
<thead><tr><th></th>{header}</tr></thead>
<tbody>
{body}
</tbody>
</table>
</body>
</html>
"""


def report_paths(output: Path) -> tuple[Path, Path]:
    """(html, png): `output` is the page if it ends in .html, else a folder for report.html and report.png."""
    html_path = output if output.suffix.lower() in (".html", ".htm") else output / "report.html"
    return html_path, html_path.with_suffix(".png")


def write_report(run_dirs: list[Path], output: Path) -> tuple[Path, DrawnFigure]:
    """Read the runs, draw their curves and write the page; returns the page's path and what was drawn."""
    runs = load_runs(run_dirs)
    html_path, png_path = report_paths(output)
    if html_path.exists() and html_path.is_dir():
        raise UsageError(f"{html_path} is a folder: give a .html file name or a folder for --output")
    figure = draw_curves(runs, png_path)
    html_path.write_text(render_html(runs, figure, png_path.name), encoding="utf-8")
    return html_path, figure
