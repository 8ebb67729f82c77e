"""Data parallelism is exact: K processes at batch B compute what one process computes at batch K*B.

Every multi-process test here runs real processes over gloo (torchrun or `accel-dp run`), bounded in time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FP32_STEPS,
    fp32_gpt_args,
    free_port,
    glue_args,
    launch_and_record,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
    saved_parameters,
    subprocess_env,
)
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def loss_curve(output_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(output_dir) if "loss" in r]


def assert_same_curves(a: list, b: list) -> None:
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, FP32_STEPS + 1))
    assert [lr for _, _, lr in a] == pytest.approx([lr for _, _, lr in b], rel=1e-12)
    assert [loss for _, loss, _ in a] == pytest.approx([loss for _, loss, _ in b], abs=1e-5)


def test_gpt_two_processes_one_big_batch_and_accumulation_end_at_the_same_parameters(tmp_path, token_cache):
    recipe = load_recipe("gpt_pretrain")
    # 1 process, batch 8.
    recipe.main(fp32_gpt_args(tmp_path / "big", token_cache, "--per_device_train_batch_size", "8"))
    reset_accelerate_state()
    # 1 process, batch 4, and --global_batch_size 8 makes it accumulate 2 micro-batches.
    accumulated = recipe.main(
        fp32_gpt_args(tmp_path / "accum", token_cache, "--per_device_train_batch_size", "4", "--global_batch_size", "8")
    )
    assert accumulated["gradient_accumulation_steps"] == 2
    # 2 processes, batch 4 each: the same global batch size 8 needs no accumulation.
    args = fp32_gpt_args(
        tmp_path / "ddp", token_cache, "--per_device_train_batch_size", "4", "--global_batch_size", "8"
    )
    completed, records = launch_and_record("gpt_pretrain", args, tmp_path)
    assert len(records) == 2, completed.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    assert ddp["world_size"] == 2 and ddp["gradient_accumulation_steps"] == 1

    big = saved_parameters(tmp_path / "big")
    assert (saved_parameters(tmp_path / "accum") - big).abs().max() <= 1e-5
    assert (records[0]["parameters"] - big).abs().max() <= 1e-5
    assert torch.equal(records[0]["parameters"], records[1]["parameters"])
    assert (big - saved_parameters(tmp_path / "ddp")).abs().max() <= 1e-5
    curve = loss_curve(tmp_path / "big")
    assert_same_curves(loss_curve(tmp_path / "accum"), curve)
    assert_same_curves(loss_curve(tmp_path / "ddp"), curve)  # the LR schedule does not run faster on 2 processes
    assert curve[-1][1] < curve[0][1]


def test_gpt_accumulation_all_reduces_only_at_optimizer_steps(tmp_path, token_cache):
    accumulation, steps = 3, 4
    args = fp32_gpt_args(tmp_path / "run", token_cache, "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", str(steps))  # fmt: skip
    completed, records = launch_and_record("gpt_pretrain", args, tmp_path)
    assert len(records) == 2, completed.stderr[-3000:]
    for record in records:
        # One round over the buckets per optimizer step; none on the 2 micro-steps before each boundary.
        assert record["allreduce_rounds"] == steps
        assert record["allreduce_calls"] >= steps
        assert record["optimizer_steps"] == steps
    # The schedule stepped once per optimizer step: it ends where a 4-step schedule ends, not 2 x 4 steps later.
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3), 2, steps, min_lr=3e-4
    )
    for _ in range(steps):
        schedule.optimizer.step()
        schedule.step()
    assert records[0]["last_lr"] == pytest.approx(schedule.get_last_lr()[0], rel=1e-12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--per_device_train_batch_size", "4", "--global_batch_size", "10"], "not a multiple of"),
        (["--per_device_train_batch_size", "4", "--global_batch_size", "8", "--gradient_accumulation_steps", "3"],
         "contradicts --global_batch_size"),
    ],
)  # fmt: skip
def test_gpt_global_batch_size_that_does_not_divide_is_refused(tmp_path, token_cache, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("gpt_pretrain").main(fp32_gpt_args(tmp_path / "run", token_cache, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# 37 pairs (conftest.glue_args): batches of 8 leave a last step of 5 examples, so uneven batches are always exercised,
# in training and in evaluation. The tiny BERT: what is compared is the arithmetic of data parallelism, not the model.
# A constant learning rate keeps that last step's update as large as the others.
EXACT_GLUE = ("--max_eval_samples", "37", "--dropout", "0", "--mixed_precision", "no", "--lr_scheduler_type",
              "constant_with_warmup", "--num_warmup_steps", "1", "--learning_rate", "1e-4",
              "--per_device_eval_batch_size", "8")  # fmt: skip


def test_glue_two_processes_one_big_batch_and_accumulation_agree_with_an_uneven_last_batch(tmp_path):
    """Each step's loss is the mean over its real examples, wherever they sit: in one batch of 8, in two
    accumulated batches of 4, or in two processes' batches of 4, whose last round accelerate fills up with
    repeats (the 5 real examples of the last step are not a mean of per-batch means)."""
    recipe = load_recipe("glue_bert")
    big = recipe.main(glue_args(tmp_path / "big", *EXACT_GLUE, "--per_device_train_batch_size", "8"))
    reset_accelerate_state()
    accumulated = recipe.main(
        glue_args(tmp_path / "accum", *EXACT_GLUE, "--per_device_train_batch_size", "4", "--global_batch_size", "8")
    )
    assert big["optimizer_steps"] == accumulated["optimizer_steps"] == 5
    completed, records = launch_and_record(
        "glue_bert", glue_args(tmp_path / "ddp", *EXACT_GLUE, "--per_device_train_batch_size", "4"), tmp_path
    )
    assert len(records) == 2, completed.stderr[-3000:]
    assert records[0]["world_size"] == 2 and records[0]["optimizer_steps"] == 5
    assert torch.equal(records[0]["parameters"], records[1]["parameters"])

    reference = saved_parameters(tmp_path / "big")
    assert (saved_parameters(tmp_path / "accum") - reference).abs().max() <= 1e-5
    assert (records[0]["parameters"] - reference).abs().max() <= 1e-5
    curves = {name: loss_curve(tmp_path / name) for name in ("big", "accum", "ddp")}
    for name in ("accum", "ddp"):
        assert [s for s, _, _ in curves[name]] == [1, 2, 3, 4, 5]
        assert [loss for _, loss, _ in curves[name]] == pytest.approx([loss for _, loss, _ in curves["big"]], abs=1e-5)
        assert [lr for _, _, lr in curves[name]] == [lr for _, _, lr in curves["big"]]  # once per optimizer step
        # Exactly the 37 validation examples, in order, though 2 processes split them unevenly (no repeats counted).
        predictions = (tmp_path / name / "eval_predictions.tsv").read_text().splitlines()
        assert predictions == (tmp_path / "big" / "eval_predictions.tsv").read_text().splitlines()
        assert len(predictions) == 1 + 37


def test_glue_accumulation_all_reduces_only_at_optimizer_steps(tmp_path):
    """2 processes x batch 4 x 2 accumulation steps over 37 SST-2 sentences: 5 rounds, so windows of 2, 2 and 1
    micro-batches (the end of the data closes the last one): 3 optimizer steps, 3 all-reduce rounds, and a
    linear schedule with 10 warmup steps that stepped 3 times, not 3 x 2."""
    args = glue_args(tmp_path / "run", *EXACT_GLUE, "--task", "sst2", "--per_device_train_batch_size", "4",
                     "--gradient_accumulation_steps", "2", "--lr_scheduler_type", "linear", "--num_warmup_steps",
                     "10")  # fmt: skip
    completed, records = launch_and_record("glue_bert", args, tmp_path)
    assert len(records) == 2, completed.stderr[-3000:]
    for record in records:
        assert record["allreduce_rounds"] == 3
        assert record["allreduce_calls"] >= 3
        assert record["optimizer_steps"] == 3
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["world_size"] == 2
    assert results["final_learning_rate"] == pytest.approx(1e-4 * 3 / 10)
    assert [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r] == pytest.approx([1e-5, 2e-5, 3e-5])


def test_gpt_two_nodes_on_loopback_match_two_processes_on_one_node(tmp_path, token_cache):
    """`accel-dp run --nodes 2 --node-rank 0|1 --main-ip 127.0.0.1`: two "machines" of one CPU process each."""
    args = fp32_gpt_args(tmp_path / "nodes", token_cache, "--per_device_train_batch_size", "4")
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accel_dp",
                "run",
                "gpt-pretrain",
                "--cpu",
                "--nodes",
                "2",
                "--node-rank",
                str(rank),
                "--main-ip",
                "127.0.0.1",
                "--main-port",
                str(port),
                "--",
                *args,
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a kill reaches the launcher's children too
        )  # fmt: skip
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + 240  # one bound for both: a missing peer fails the test, never hangs it
    try:
        outputs = [node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for node in nodes]
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert json.loads((tmp_path / "nodes" / "all_results.json").read_text())["world_size"] == 2

    single = fp32_gpt_args(tmp_path / "single", token_cache, "--per_device_train_batch_size", "4")
    completed, records = launch_and_record("gpt_pretrain", single, tmp_path)
    assert len(records) == 2, completed.stderr[-3000:]
    assert (saved_parameters(tmp_path / "nodes") - records[0]["parameters"]).abs().max() <= 1e-6
    # (Not bitwise: each "node" here runs 2 threads, as accel-dp gives one process of a 2-core machine, against 1.)
    nodes, single = loss_curve(tmp_path / "nodes"), loss_curve(tmp_path / "single")
    assert [(step, lr) for step, _, lr in nodes] == [(step, lr) for step, _, lr in single]
    assert [loss for _, loss, _ in nodes] == pytest.approx([loss for _, loss, _ in single], rel=1e-6)
