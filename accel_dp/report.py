"""Training curves of one or several runs, read from their metrics.jsonl: a PNG with loss, evaluation metrics,
throughput, compute and learning rate against the optimizer step (runs overlaid, one colour each), and a one-page HTML
that shows the PNG and a table of each run's final numbers from its all_results.json.

Every panel says what it shows without the docs: axis labels with units (metrics of different units never share an
axis), a legend naming each series (and its run, when several are overlaid), y-limits that fit the bulk of the curve
(a first point far off it, such as the untrained loss, is marked at the edge with its value). In the table, each
column (one quantity, a row per run) has one number format, chosen from the magnitude of its values.

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
    ylabel: str  # with the unit of every metric on it
    metrics: tuple[str, ...]
    robust: bool = True  # y-limits from the bulk of the values (see axis_limits); False: all in view, from 0


@dataclass(frozen=True)
class PlottedSeries:
    panel: str
    run: str
    metric: str
    points: int
    color: str


@dataclass(frozen=True)
class PanelBox:
    """A drawn panel: where its plotting area lies in the PNG, in pixels from the top-left corner, and its labels,
    legend entries and y-limits as drawn."""

    title: str
    left: int
    top: int
    right: int
    bottom: int
    xlabel: str = ""
    ylabel: str = ""
    legend: tuple[str, ...] = ()
    ylim: tuple[float, float] | None = None
    off_scale: int = 0  # points outside the y-limits, drawn as markers at the panel's edge


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
MISMATCHED = "_mm"  # GLUE MNLI's second validation split: eval_accuracy_mm, eval_loss_mm
METRIC_LABELS = {  # what a legend calls a metric
    "loss": "train loss",
    "eval_loss": "eval loss",
    "eval_bits_per_byte": "eval bits per byte",
    "eval_accuracy": "eval accuracy",
    "eval_f1": "eval F1",
    "eval_precision": "eval precision",
    "eval_recall": "eval recall",
    "eval_matthews_correlation": "eval Matthews correlation",
    "eval_pearson": "eval Pearson r",
    "eval_spearmanr": "eval Spearman rho",
    "tokens_per_second": "tokens/s",
    "samples_per_second": "samples/s",
    "tflops": "TFLOP/s",
    "lr": "learning rate",
}
SCORE_NAMES = {"eval_accuracy": "accuracy", "eval_f1": "F1", "eval_precision": "precision", "eval_recall": "recall"}
CORRELATIONS = ("eval_matthews_correlation", "eval_pearson", "eval_spearmanr")
NOT_PLOTTED_EVAL = ("eval_samples",)  # a count of examples, not a measurement of the model


def metric_label(metric: str) -> str:
    base = metric.removesuffix(MISMATCHED)
    label = METRIC_LABELS.get(base, base.replace("eval_", "eval ", 1).replace("_", " "))
    return label + (" (mismatched)" if base != metric else "")


def series_label(run: str, metric: str, several_runs: bool) -> str:
    """A legend entry: the metric, and the run's name in front when several runs share the panel."""
    return f"{as_drawn(run)}: {metric_label(metric)}" if several_runs else metric_label(metric)


def as_drawn(name: str) -> str:
    """A folder name as matplotlib must be given it to draw it as it is: `$...$` would be read as mathtext."""
    return name.replace("$", r"\$")


def choose_panels(runs: list[Run]) -> list[Panel]:
    """The panels that have something to show, in a fixed order: loss, evaluation metrics (one panel per unit),
    throughput, compute, learning rate. Each y-axis label says the unit of everything plotted on it."""
    present: list[str] = []
    for run in runs:
        for record in run.records:
            for key, value in record.items():
                if key not in present and is_number(value):
                    present.append(key)

    def pick(*bases: str) -> tuple[str, ...]:
        return tuple(m for base in bases for m in (base, base + MISMATCHED) if m in present)

    regression = bool(pick("eval_pearson", "eval_spearmanr"))  # GLUE STS-B: a mean squared error, not nats
    scores = pick(*SCORE_NAMES)
    score_names = " / ".join(dict.fromkeys(SCORE_NAMES[m.removesuffix(MISMATCHED)] for m in scores))
    known = {"eval_loss", "eval_bits_per_byte", *SCORE_NAMES, *CORRELATIONS, *NOT_PLOTTED_EVAL}
    other_eval = [m for m in present if m.startswith("eval_") and m.removesuffix(MISMATCHED) not in known]
    candidates = [
        Panel("Loss", "loss (nats, or MSE for regression)" if regression else "loss (nats)", pick("loss", "eval_loss")),
        Panel("Evaluation: bits per byte", "bits per byte", pick("eval_bits_per_byte")),
        Panel(f"Evaluation: {score_names}", f"{score_names} (0-1)", scores),
        Panel("Evaluation: correlation", "correlation (-1 to 1)", pick(*CORRELATIONS)),
        *(Panel(f"Evaluation: {metric_label(m).removeprefix('eval ')}", metric_label(m), (m,)) for m in other_eval),
        Panel("Throughput", "tokens/s", pick("tokens_per_second")),
        Panel("Throughput", "samples/s", pick("samples_per_second")),
        Panel("Compute", "TFLOP/s", pick("tflops")),
        Panel("Learning rate", "learning rate", pick("lr"), robust=False),
    ]
    panels = [p for p in candidates if p.metrics]
    if sum(p.title == "Throughput" for p in panels) > 1:  # both units (a GPT run beside a GLUE run): say which
        panels = [Panel(f"Throughput ({p.ylabel})", p.ylabel, p.metrics) if p.title == "Throughput" else p
                  for p in panels]  # fmt: skip
    return panels


FIRST_OUTLIER_SPREADS = 1.5  # a first point further than this many spreads of the rest from the rest is an outlier
MIN_RELATIVE_SPAN = 0.1  # a robust axis spans at least this share of its largest value
FENCE_SPREADS = 1.0  # beyond the 5th..95th percentiles by more than this many times their distance: off the scale


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between the closest ranks."""
    position = (len(sorted_values) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (position - below)


def is_first_outlier(values: list[float]) -> bool:
    """Whether a series' first point lies far outside the rest: the loss before training has started, or a
    throughput measured while the first steps were compiling. Needs two points after it to tell."""
    if len(values) < 3:
        return False
    first, rest = values[0], values[1:]
    spread = max(max(rest) - min(rest), 1e-3 * max(abs(v) for v in rest), 1e-12)
    return first > max(rest) + FIRST_OUTLIER_SPREADS * spread or first < min(rest) - FIRST_OUTLIER_SPREADS * spread


def axis_limits(value_lists: list[list[float]], robust: bool = True, pad: float = 0.08) -> tuple[float, float] | None:
    """The y-limits of a panel from the values of its series (each in step order), padded by `pad` of the range.

    robust: a first point that is an outlier (see is_first_outlier) is left out of each series' range, and so are the
    values further from the 5th..95th percentiles than those are from each other; those points are still drawn,
    marked at the panel's edge. Otherwise every value is in view and the axis starts at 0 (a learning rate)."""
    kept = [v for values in value_lists for v in (values[1:] if robust and is_first_outlier(values) else values)]
    if not kept:
        return None
    if robust:
        ordered = sorted(kept)
        low_q, high_q = percentile(ordered, 5), percentile(ordered, 95)
        fence = FENCE_SPREADS * (high_q - low_q)
        kept = [v for v in kept if low_q - fence <= v <= high_q + fence]
        low, high = min(kept), max(kept)
        widen = MIN_RELATIVE_SPAN * max(abs(low), abs(high)) - (high - low)
        if widen > 0:  # a steady throughput's 1% of noise should not fill the panel as if it were a trend
            low, high = low - widen / 2, high + widen / 2
    else:
        low, high = min(0.0, *kept), max(0.0, *kept)
    span = high - low
    if span == 0:  # one value, or a constant
        margin = 0.05 * abs(high) or 1.0
        return low - margin, high + margin
    return low - pad * span, high + pad * span


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
    from matplotlib.ticker import EngFormatter, MaxNLocator, ScalarFormatter

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

    several_runs = len(runs) > 1
    plotted: list[PlottedSeries] = []
    off_scale_counts: list[int] = []
    for panel, ax in zip(panels, axes_list, strict=True):
        last_step = 1
        drawn: list[tuple[list[float], list[float], str]] = []
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
                    label=series_label(run.name, metric, several_runs),
                )
                last_step = max(last_step, *steps)
                drawn.append((steps, values, color))
                plotted.append(PlottedSeries(panel.title, run.name, metric, len(steps), color))
        ax.set_title(panel.title, fontsize=11, loc="left", fontweight="bold")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if panel.metrics[0] in ("tokens_per_second", "samples_per_second"):
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 12k: the unit is in the axis label
        else:  # 0.003 and 2.51 as they are: no offset or "1e-3" above the axis, where it would sit on the title
            plain = ScalarFormatter(useOffset=False)
            plain.set_scientific(False)
            ax.yaxis.set_major_formatter(plain)
        ax.set_xlim(0, last_step * 1.03)  # from step 0, so that panels of the same runs line up
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        limits = axis_limits([values for _, values, _ in drawn], robust=panel.robust)
        off_scale = 0
        if limits is not None:
            ax.set_ylim(*limits)
            off_scale = mark_off_scale(ax, drawn, limits)
        off_scale_counts.append(off_scale)
        ax.legend(loc="best", fontsize=8, framealpha=0.85, edgecolor="#dddddd")  # what each line is, always

    run_handles = [Line2D([], [], color=RUN_COLORS[i % len(RUN_COLORS)], linewidth=3) for i in range(len(runs))]
    figure.legend(
        run_handles,
        [as_drawn(run.name) for run in runs],
        loc="outside upper center",
        ncols=min(len(runs), 4),
        frameon=False,
        fontsize=10,
    )
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=DPI, facecolor="white")

    boxes = []
    for panel, ax, off_scale in zip(panels, axes_list, off_scale_counts, strict=True):
        extent = ax.get_window_extent()
        legend = ax.get_legend()
        boxes.append(
            PanelBox(
                panel.title,
                left=round(extent.x0),
                top=round(height_px - extent.y1),
                right=round(extent.x1),
                bottom=round(height_px - extent.y0),
                xlabel=ax.get_xlabel(),
                ylabel=ax.get_ylabel(),
                legend=tuple(text.get_text() for text in legend.get_texts()) if legend else (),
                ylim=tuple(float(v) for v in ax.get_ylim()),
                off_scale=off_scale,
            )
        )
    return DrawnFigure(png_path, width_px, height_px, boxes, plotted)


def mark_off_scale(ax, drawn: list[tuple[list[float], list[float], str]], limits: tuple[float, float]) -> int:
    """Points outside the y-limits (a first loss far above the rest): a triangle at the edge they lie beyond, with
    their value beside it, so that the axis fits the bulk of the curve and every point still shows. Returns how many."""
    low, high = limits
    count = 0
    for steps, values, color in drawn:
        for step, value in zip(steps, values, strict=True):
            if low <= value <= high:
                continue
            above = value > high
            edge = high if above else low
            ax.plot([step], [edge], marker="^" if above else "v", color=color, markersize=7, clip_on=False,
                    linestyle="none", zorder=5, label="_nolegend_")  # fmt: skip
            ax.annotate(
                f"{value:,.0f} (off scale)" if abs(value) >= 1000 else f"{value:.3g} (off scale)",
                (step, edge),
                xytext=(6, -3 if above else 3),
                textcoords="offset points",
                fontsize=8,
                color=color,
                va="top" if above else "bottom",
                annotation_clip=False,
            )
            count += 1
    return count


# ------------------------------------------------------------------------------------------------- HTML
MISSING = "–"  # a key this run's all_results.json lacks, or null there (a value that could not be measured)
SIGNIFICANT_DIGITS = 4  # of a column's largest number
MAX_DECIMALS = 6  # more than that and the column is written in scientific notation


@dataclass(frozen=True)
class SummaryTable:
    """The final-numbers table: one row per run, one column per quantity, each cell formatted as its column."""

    columns: list[str]
    numeric: list[bool]  # whether a column holds numbers (right-aligned on the page)
    rows: list[list[str]]  # one per run, in the runs' order


def number_format(values: list) -> str:
    """The one format (a format spec) for every number of a column, chosen from the column's magnitudes.

    Whole numbers get thousands separators (123,456). Otherwise every number gets the same count of decimals: enough
    for 4 significant digits on the largest and 2 on the smallest (17,630 and 3,697; 2.412 and 10.53 as 2.41 and
    10.53), or, when that needs more than 6 decimals (a learning rate of 3e-4), scientific notation (3.000e-04)."""
    numbers = [v for v in values if is_number(v)]
    if all(isinstance(v, int) for v in numbers):
        return ","
    nonzero = [abs(v) for v in numbers if v]
    if not nonzero:
        return ".1f"
    decimals = max(
        SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(max(nonzero))),
        1 - math.floor(math.log10(min(nonzero))),
        0,
    )
    return f".{SIGNIFICANT_DIGITS - 1}e" if decimals > MAX_DECIMALS else f",.{decimals}f"


def format_cell(value, spec: str) -> str:
    if value is None:
        return MISSING
    if is_number(value):
        return format(value, spec)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def summary_table(runs: list[Run]) -> SummaryTable:
    """How far each run got, then every key of the runs' all_results.json, in the order they first appear."""
    columns = {
        "last logged step": [max(series(run.records, "step")[0], default=None) for run in runs],
        "metrics records": [len(run.records) for run in runs],
    }
    for run in runs:
        for key in run.results or {}:
            if key not in columns:
                columns[key] = [(run.results or {}).get(key) for run in runs]
    numeric, cells = [], []
    for values in columns.values():
        present = [v for v in values if v is not None]
        numeric.append(bool(present) and all(is_number(v) for v in present))
        spec = number_format(values)
        cells.append([format_cell(v, spec) for v in values])
    rows = [[column[i] for column in cells] for i in range(len(runs))]
    return SummaryTable(list(columns), numeric, rows)


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1240px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #666; font-size: 0.9rem; margin-top: 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { text-align: left; padding: 0.3rem 0.6rem; border-bottom: 1px solid #eee; vertical-align: top; }
thead th { vertical-align: bottom; font-weight: 600; min-width: 4.5rem; max-width: 9rem; }
td { white-space: nowrap; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.run { position: sticky; left: 0; background: white; border-left: 4px solid var(--run-color); min-width: 10rem;
         max-width: 18rem; }
th.run .folder { display: block; color: #777; font-weight: normal; font-size: 0.8rem; word-break: break-all; }
.note { color: #a15c00; font-size: 0.9rem; }
"""


def render_html(runs: list[Run], figure: DrawnFigure, image_src: str, generated_at: str | None = None) -> str:
    """The report page: the figure (by `image_src`, relative to the page) and the final-numbers table."""
    esc = html.escape
    generated_at = generated_at or time.strftime("%Y-%m-%d %H:%M")
    table = summary_table(runs)

    def align(numeric: bool) -> str:
        return ' class="num"' if numeric else ""

    header = "".join(  # long keys may break after an underscore
        f"<th{align(numeric)}>{esc(column).replace('_', '_<wbr>')}</th>"
        for column, numeric in zip(table.columns, table.numeric, strict=True)
    )
    body = "\n".join(
        f'<tr><th class="run" style="--run-color: {RUN_COLORS[i % len(RUN_COLORS)]}">{esc(run.name)}'
        f'<span class="folder">{esc(str(run.path))}</span></th>'
        + "".join(f"<td{align(numeric)}>{esc(cell)}</td>" for cell, numeric in zip(row, table.numeric, strict=True))
        + "</tr>"
        for i, (run, row) in enumerate(zip(runs, table.rows, strict=True))
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
<p class="meta">One row per run: how far it logged, then its all_results.json. {MISSING} = not recorded.</p>
{notes_html}
<div class="table-wrap">
<table>
<thead><tr><th>run</th>{header}</tr></thead>
<tbody>
{body}
</tbody>
</table>
</div>
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
