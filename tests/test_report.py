"""`accel-dp report`: curves of one or several runs in a PNG, and an HTML page with the PNG and final numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics
from matplotlib.image import imread
from typer.testing import CliRunner

from accel_dp.cli import app
from accel_dp.report import (
    axis_limits,
    figure_size_px,
    load_runs,
    number_format,
    parse_metrics,
    run_names,
    summary_table,
    write_report,
)

runner = CliRunner()


def write_run(folder: Path, records: list[dict], results: dict | None = None, tail: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if results is not None:
        (folder / "all_results.json").write_text(json.dumps(results))
    return folder


def gpt_like_records(steps: int, start_loss: float) -> list[dict]:
    records = []
    for step in range(5, steps + 1, 5):
        records.append({"step": step, "loss": start_loss - 0.05 * step, "lr": 3e-3 * (1 - step / (steps + 5)),
                        "tokens_per_second": 1000.0 + 10 * step, "elapsed_s": 0.1 * step})  # fmt: skip
        if step % 10 == 0:
            records.append({"step": step, "eval_loss": start_loss - 0.04 * step, "elapsed_s": 0.1 * step})
    return records


def glue_like_records(steps: int) -> list[dict]:
    records = [
        {"step": s, "epoch": 1 + s // 4, "loss": 0.7 - 0.01 * s, "lr": 1e-4, "samples_per_second": 50.0 + s,
         "elapsed_s": s}
        for s in range(1, steps + 1)
    ]  # fmt: skip
    records += [
        {"step": s, "epoch": s // 4, "eval_accuracy": 0.6 + 0.02 * s, "eval_f1": 0.7 + 0.01 * s, "eval_loss": 0.65}
        for s in range(4, steps + 1, 4)
    ]
    return records


def pixels_of(image: np.ndarray, box, hex_color: str) -> int:
    """How many pixels inside a panel's plotting area have (about) the given colour."""
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    area = image[box.top : box.bottom, box.left : box.right, :3]
    return int((np.abs(area - rgb).max(axis=-1) < 0.08).sum())


def assert_every_curve_is_drawn(figure, image: np.ndarray) -> None:
    """Each panel shows, in its own area, the colour of every run that has a series in it."""
    boxes = {box.title: box for box in figure.panels}
    for drawn in figure.series:
        assert pixels_of(image, boxes[drawn.panel], drawn.color) > 20, (drawn, boxes[drawn.panel])


def test_two_runs_are_overlaid_with_every_series_and_the_page_shows_both(tmp_path):
    gpt = write_run(tmp_path / "runs" / "gpt-small", gpt_like_records(40, 4.0),
                    {"world_size": 2, "eval_loss": 2.4123456, "train_tokens_seen": 123456})  # fmt: skip
    glue = write_run(tmp_path / "runs" / "glue-mrpc", glue_like_records(8), tail='{"step": 9, "loss"')  # killed

    result = runner.invoke(app, ["report", str(gpt), str(glue), "--output", str(tmp_path / "out" / "compare.html")])

    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "compare.html").read_text()
    png = tmp_path / "out" / "compare.png"
    image = imread(png)
    # Loss, evaluation, both throughputs and learning rate: five panels, two per row.
    assert figure_size_px(5) == (1200, 1250)
    assert image.shape[:2] == (1250, 1200)
    assert '<img src="compare.png"' in page
    assert "gpt-small" in page and "glue-mrpc" in page
    assert '<td class="num">2.412</td>' in page and '<td class="num">123,456</td>' in page  # its all_results.json
    assert "glue-mrpc: no all_results.json" in page
    assert "glue-mrpc: 1 line(s) of metrics.jsonl were not JSON records" in page

    _, figure = write_report([gpt, glue], tmp_path / "again")  # the same through the module, to see what was drawn
    drawn = {(s.panel, s.run, s.metric): s.points for s in figure.series}
    assert drawn == {
        ("Loss", "gpt-small", "loss"): 8,
        ("Loss", "gpt-small", "eval_loss"): 4,
        ("Loss", "glue-mrpc", "loss"): 8,
        ("Loss", "glue-mrpc", "eval_loss"): 2,
        ("Evaluation: accuracy / F1", "glue-mrpc", "eval_accuracy"): 2,
        ("Evaluation: accuracy / F1", "glue-mrpc", "eval_f1"): 2,
        ("Throughput (tokens/s)", "gpt-small", "tokens_per_second"): 8,
        ("Throughput (samples/s)", "glue-mrpc", "samples_per_second"): 8,
        ("Learning rate", "gpt-small", "lr"): 8,
        ("Learning rate", "glue-mrpc", "lr"): 8,
    }
    assert_every_curve_is_drawn(figure, imread(figure.path))
    assert (tmp_path / "again" / "report.html").is_file()


def test_report_of_a_real_gpt_pretrain_run(tmp_path, tiny_gpt_run):
    html_path, figure = write_report([tiny_gpt_run], tmp_path / "report.html")

    records = read_metrics(tiny_gpt_run)
    image = imread(figure.path)
    assert image.shape[:2] == figure_size_px(5)[::-1]
    titles = ["Loss", "Evaluation: bits per byte", "Throughput", "Compute", "Learning rate"]
    assert [box.title for box in figure.panels] == titles
    points = {s.metric: s.points for s in figure.series}
    assert points == {
        "loss": sum("loss" in r for r in records),
        "eval_loss": sum("eval_loss" in r for r in records),
        "eval_bits_per_byte": sum("eval_bits_per_byte" in r for r in records),
        "tokens_per_second": sum("tokens_per_second" in r for r in records),
        "tflops": sum("tflops" in r for r in records),
        "lr": sum("lr" in r for r in records),
    }
    assert points["loss"] == 4 and points["eval_loss"] == 2
    assert_every_curve_is_drawn(figure, image)
    page = html_path.read_text()
    results = json.loads((tiny_gpt_run / "all_results.json").read_text())
    table = summary_table(load_runs([tiny_gpt_run]))
    cells = dict(zip(table.columns, table.rows[0], strict=True))
    assert cells["world_size"] == "1" and math.isclose(float(cells["eval_loss"]), results["eval_loss"], rel_tol=1e-3)
    assert f'<td class="num">{cells["eval_loss"]}</td>' in page


def gpt_30_step_records() -> list[dict]:
    """Shaped like a 30-step gpt-pretrain run: logged at step 1 (the untrained loss, ln(vocabulary) = 10.9, and a
    throughput measured while compiling) and every 5 steps, the loss falling from 4.2 to 2.5; evaluated at 15 and 30."""
    records = []
    for step in (1, 5, 10, 15, 20, 25, 30):
        loss = 10.9 if step == 1 else 4.2 - 1.7 * (step - 5) / 25
        records.append({"step": step, "loss": loss, "lr": 6e-4 * min(1, step / 5) * (1 - step / 31),
                        "tokens_per_second": 3697.4 if step == 1 else 17630.0 + 20 * step,
                        "tflops": 0.9 if step == 1 else 4.3, "elapsed_s": 0.8 * step})  # fmt: skip
        if step in (15, 30):
            eval_loss = 3.1 if step == 15 else 2.6
            records.append({"step": step, "eval_loss": eval_loss, "eval_bits_per_byte": 0.38 * eval_loss})
    return records


def test_every_panel_labels_its_axes_with_units_and_names_each_series_in_a_legend(tmp_path):
    gpt = write_run(tmp_path / "gpt", gpt_30_step_records())
    _, figure = write_report([gpt], tmp_path / "one")
    panels = {box.title: box for box in figure.panels}

    assert {title: box.ylabel for title, box in panels.items()} == {
        "Loss": "loss (nats)",
        "Evaluation: bits per byte": "bits per byte",
        "Throughput": "tokens/s",
        "Compute": "TFLOP/s",
        "Learning rate": "learning rate",
    }
    assert all(box.xlabel == "optimizer step" for box in figure.panels)
    # A legend on every panel, also where it has a single series: one run, so each entry is the metric's name.
    assert {title: box.legend for title, box in panels.items()} == {
        "Loss": ("train loss", "eval loss"),
        "Evaluation: bits per byte": ("eval bits per byte",),
        "Throughput": ("tokens/s",),
        "Compute": ("TFLOP/s",),
        "Learning rate": ("learning rate",),
    }
    # Evaluation losses (nats) and bits per byte never share an axis.
    panel_of = {s.metric: s.panel for s in figure.series}
    assert panel_of["eval_loss"] == "Loss" and panel_of["eval_bits_per_byte"] == "Evaluation: bits per byte"

    # Several runs overlaid: each legend entry names the run as well; GLUE's scores and throughput have their units.
    glue = write_run(tmp_path / "glue", glue_like_records(8))
    _, figure = write_report([gpt, glue], tmp_path / "two")
    panels = {box.title: box for box in figure.panels}
    assert panels["Evaluation: accuracy / F1"].ylabel == "accuracy / F1 (0-1)"
    assert panels["Evaluation: accuracy / F1"].legend == ("glue: eval accuracy", "glue: eval F1")
    assert panels["Throughput (samples/s)"].ylabel == "samples/s"
    assert panels["Throughput (samples/s)"].legend == ("glue: samples/s",)
    assert panels["Throughput (tokens/s)"].legend == ("gpt: tokens/s",)
    assert panels["Loss"].legend == ("gpt: train loss", "gpt: eval loss", "glue: train loss", "glue: eval loss")
    assert all(box.xlabel == "optimizer step" and box.legend for box in figure.panels)


def test_robust_y_limits_leave_out_a_single_early_outlier_which_is_still_drawn(tmp_path):
    loss = [10.9, 4.2, 3.6, 3.1, 2.8, 2.6, 2.5]
    low, high = axis_limits([loss])
    assert 4.2 < high < 4.2 + 0.2 * (4.2 - 2.5) and 2.5 - 0.2 * (4.2 - 2.5) < low < 2.5  # the rest, padded
    assert axis_limits([[3697.4, 17630, 17700, 17650, 17720]])[0] > 15000  # a first throughput while compiling
    # A curve without an outlier, and two points, are shown whole; a learning rate is always whole and from 0.
    assert axis_limits([[4.2, 3.35, 2.5]])[1] > 4.2 and axis_limits([[10.9, 4.2]])[1] > 10.9
    assert axis_limits([[1e-5, 6e-4, 3e-4]], robust=False) == pytest.approx((-0.08 * 6e-4, 1.08 * 6e-4))

    _, figure = write_report([write_run(tmp_path / "gpt", gpt_30_step_records())], tmp_path / "report")
    panels = {box.title: box for box in figure.panels}
    assert panels["Loss"].ylim[1] < 5 and panels["Loss"].ylim[0] < 2.5 and panels["Loss"].off_scale == 1
    assert panels["Throughput"].ylim[0] > 10000 and panels["Throughput"].off_scale == 1
    assert panels["Learning rate"].off_scale == 0
    points = {(s.panel, s.metric): s.points for s in figure.series}
    assert points[("Loss", "loss")] == 7 and points[("Throughput", "tokens_per_second")] == 7  # every point drawn
    assert_every_curve_is_drawn(figure, imread(figure.path))


def test_each_column_of_the_results_table_has_one_number_format(tmp_path):
    first = write_run(tmp_path / "first", [{"step": 30, "loss": 2.5}],
                      {"world_size": 2, "tokens_per_second": 3697.4, "eval_loss": 2.4123456, "lr": 3e-4,
                       "mfu": 0.0021789, "peak_memory_gib": None, "mixed_precision": "bf16"})  # fmt: skip
    second = write_run(tmp_path / "second", [{"step": 30, "loss": 2.5}],
                       {"world_size": 16, "tokens_per_second": 17630.2, "eval_loss": 10.531, "lr": 2e-5,
                        "mfu": 0.41, "peak_memory_gib": 71.25})  # fmt: skip
    table = summary_table(load_runs([first, second]))
    columns = {name: [row[i] for row in table.rows] for i, name in enumerate(table.columns)}

    assert columns["world_size"] == ["2", "16"]
    assert columns["tokens_per_second"] == ["3,697", "17,630"]  # not 3697 beside 1.763e+04
    assert columns["eval_loss"] == ["2.41", "10.53"]
    assert columns["lr"] == ["3.000e-04", "2.000e-05"]
    assert columns["mfu"] == ["0.0022", "0.4100"]
    assert columns["peak_memory_gib"] == ["–", "71.25"] and columns["mixed_precision"] == ["bf16", "–"]

    def number_format_of(cell: str) -> tuple[bool, int]:  # scientific or not, and how many decimals
        mantissa = cell.split("e")[0]
        return "e" in cell, len(mantissa.split(".")[1]) if "." in mantissa else 0

    for name, cells in columns.items():
        numbers = [cell for cell in cells if re.fullmatch(r"[\d,.e+-]+", cell)]
        assert len({number_format_of(cell) for cell in numbers}) <= 1, (name, cells)
    assert number_format([1, 2.5]) == number_format([2.5, 1]) == ",.3f" and number_format([123456, 7]) == ","

    page = (write_report([first, second], tmp_path / "report")[0]).read_text()
    assert '<td class="num">3,697</td>' in page and '<td class="num">17,630</td>' in page
    assert "1.763e+04" not in page and "<td>bf16</td>" in page


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "has no metrics.jsonl"),
        (lambda root: write_run(root / "empty", [{"note": "no numbers"}]), "nothing to plot"),
    ],
)
def test_bad_run_folders_are_one_line_errors_with_exit_code_2(tmp_path, make, message):
    result = runner.invoke(app, ["report", str(make(tmp_path)), "--output", str(tmp_path / "r.html")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and message in text and "Traceback" not in result.output
    assert not (tmp_path / "r.html").exists()


def test_runs_with_the_same_folder_name_are_told_apart_by_their_parents(tmp_path):
    assert run_names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]


def test_lines_that_are_not_records_are_counted_and_skipped():
    records, skipped = parse_metrics('{"step": 1, "loss": 2.0}\n\n[1, 2]\n{"step": 2, "lo')
    assert records == [{"step": 1, "loss": 2.0}] and skipped == 2


def test_folder_names_with_dollar_signs_are_drawn_as_written_not_as_mathtext(tmp_path):
    """matplotlib reads `$...$` as TeX: a folder named `run_$\\frac$` failed to draw, and `$x$` would be drawn as
    an italic x."""
    names = ["run_$\\frac$", "cost_$5$"]
    runs = [write_run(tmp_path / name, gpt_like_records(20, 4.0)) for name in names]
    result = runner.invoke(app, ["report", *map(str, runs), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    _, figure = write_report(runs, tmp_path / "again")
    legends = {entry for box in figure.panels for entry in box.legend}
    assert {f"{name}: train loss".replace("$", r"\$") for name in names} <= legends  # escaped: drawn as is
