"""`accel-dp report`: curves of one or several runs in a PNG, and an HTML page with the PNG and final numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics
from matplotlib.image import imread
from typer.testing import CliRunner

from accel_dp.cli import app
from accel_dp.report import figure_size_px, parse_metrics, run_names, write_report

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
    assert "<td>2.412</td>" in page and "<td>123,456</td>" in page  # gpt-small's all_results.json
    assert "glue-mrpc: no all_results.json" in page
    assert "glue-mrpc: 1 line(s) of metrics.jsonl were not JSON records" in page

    _, figure = write_report([gpt, glue], tmp_path / "again")  # the same through the module, to see what was drawn
    drawn = {(s.panel, s.run, s.metric): s.points for s in figure.series}
    assert drawn == {
        ("Loss", "gpt-small", "loss"): 8,
        ("Loss", "gpt-small", "eval_loss"): 4,
        ("Loss", "glue-mrpc", "loss"): 8,
        ("Loss", "glue-mrpc", "eval_loss"): 2,
        ("Evaluation", "glue-mrpc", "eval_accuracy"): 2,
        ("Evaluation", "glue-mrpc", "eval_f1"): 2,
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
    assert image.shape[:2] == figure_size_px(4)[::-1]  # loss, evaluation (bits per byte), throughput, learning rate
    assert [box.title for box in figure.panels] == ["Loss", "Evaluation", "Throughput", "Learning rate"]
    points = {s.metric: s.points for s in figure.series}
    assert points == {
        "loss": sum("loss" in r for r in records),
        "eval_loss": sum("eval_loss" in r for r in records),
        "eval_bits_per_byte": sum("eval_bits_per_byte" in r for r in records),
        "tokens_per_second": sum("tokens_per_second" in r for r in records),
        "lr": sum("lr" in r for r in records),
    }
    assert points["loss"] == 4 and points["eval_loss"] == 2
    assert_every_curve_is_drawn(figure, image)
    page = html_path.read_text()
    results = json.loads((tiny_gpt_run / "all_results.json").read_text())
    assert f"<td>{results['eval_loss']:.4g}</td>" in page and "<th>world_size</th><td>1</td>" in page


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
