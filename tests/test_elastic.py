"""Elastic resume: a checkpoint written by K processes continues on K' processes at the same global batch, optimizer
step, data position and LR schedule, and ends within 1e-5 of the run that never changed (dropout off); with dropout
on it continues and says that the random stream is a new one. Refused with a message: another global batch, and
Local SGD's per-process optimizer state on another number of processes (docs/errors.md, tests/test_bad_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    accel_dp_run,
    fp32_gpt_args,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
    saved_parameters,
    tiny_bert,
)

STEPS, CHECKPOINT = 20, 10


def run(recipe: str, processes: int, args: list[str]) -> None:
    """The recipe through `accel-dp run --cpu --procs N`, as users run it."""
    assert accel_dp_run(recipe, processes, args) == 0


def gpt(output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """20 fp32 steps at a global batch of 8 sequences, however many processes; a checkpoint at step 10."""
    return fp32_gpt_args(output_dir, token_cache, "--max_train_steps", str(STEPS), "--per_device_train_batch_size",
                         "4", "--global_batch_size", "8", "--checkpointing_steps", str(CHECKPOINT), "--eval_every",
                         str(STEPS), *extra)  # fmt: skip


def losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir) if "loss" in r]


def assert_same_run(resumed: Path, whole: Path) -> None:
    """The resumed run (in a folder of its own: it logged from its checkpoint on) ends where `whole` ends."""
    assert (saved_parameters(resumed) - saved_parameters(whole)).abs().max() <= 1e-5
    logged = dict(losses(resumed))
    reference = {step: loss for step, loss in losses(whole) if step in logged}
    assert sorted(logged) == sorted(reference) and max(logged) == max(step for step, _ in losses(whole))
    assert [logged[s] for s in sorted(logged)] == pytest.approx([reference[s] for s in sorted(logged)], rel=1e-5)
    results = [json.loads((d / "all_results.json").read_text()) for d in (resumed, whole)]
    # The validation set is eval_iters global batches of windows: the same windows on any layout, whatever the
    # per-device eval batch (the resumed runs below use 3, which does not divide the 16 windows evenly).
    assert abs(results[0]["eval_loss"] - results[1]["eval_loss"]) <= 1e-6


@pytest.mark.slow
def test_gpt_checkpoint_of_two_processes_resumes_on_one_and_one_on_two(tmp_path, token_cache, capsys):
    two = tmp_path / "two"
    run("gpt-pretrain", 2, gpt(two, token_cache))  # the reference, uninterrupted; it also checkpoints at step 10
    checkpoint_of_two = two / "checkpoints" / f"step-{CHECKPOINT:07d}"

    # Fewer processes: 2 -> 1, with 2 accumulation steps for the same global batch (the recipe run directly).
    fewer = tmp_path / "fewer"
    reset_accelerate_state()
    capsys.readouterr()
    load_recipe("gpt_pretrain").main(
        gpt(fewer, token_cache, "--resume_from_checkpoint", str(checkpoint_of_two), "--per_device_eval_batch_size", "3")
    )
    reset_accelerate_state()
    output = " ".join(capsys.readouterr().out.split())
    assert "written by 4 per device x 2 process(es) x 1 accumulation; resuming on 4 per device x 1 process(es) x 2" in (
        output
    )
    assert "random numbers" not in output  # dropout is off: nothing to say about its stream
    assert_same_run(fewer, two)

    # More processes: 1 -> 2. The one-process run's checkpoint, written in this process.
    one = tmp_path / "one"
    reset_accelerate_state()
    load_recipe("gpt_pretrain").main(gpt(one, token_cache))
    reset_accelerate_state()
    more = tmp_path / "more"
    checkpoint_of_one = one / "checkpoints" / f"step-{CHECKPOINT:07d}"
    run("gpt-pretrain", 2, gpt(more, token_cache, "--resume_from_checkpoint", str(checkpoint_of_one),
                               "--per_device_eval_batch_size", "3"))  # fmt: skip
    assert_same_run(more, two)
    assert_same_run(one, two)  # (and the uninterrupted runs agree: K processes at B = 1 process at K x B)


def test_gpt_resume_with_dropout_on_another_layout_continues_and_says_the_random_stream_is_new(
    tmp_path, token_cache, capsys
):
    """The same global batch split another way (here 2 x 4 accumulation instead of 4 x 2, one process): dropout's
    masks cannot be carried over, so the run continues with a new, seeded stream, and says so."""
    recipe = load_recipe("gpt_pretrain")
    first = gpt(tmp_path / "first", token_cache, "--dropout", "0.1")
    recipe.main(first)
    reset_accelerate_state()
    capsys.readouterr()
    checkpoint = tmp_path / "first" / "checkpoints" / f"step-{CHECKPOINT:07d}"
    other = gpt(tmp_path / "other", token_cache, "--dropout", "0.1", "--per_device_train_batch_size", "2",
                "--resume_from_checkpoint", str(checkpoint))  # fmt: skip
    results = recipe.main(other)
    out = " ".join(capsys.readouterr().out.split())
    assert "resuming on 2 per device x 1 process(es) x 4 accumulation" in out
    assert "random numbers (dropout) continue from a new stream" in out
    assert results["optimizer_steps"] == STEPS and results["gradient_accumulation_steps"] == 4
    assert [step for step, _ in losses(tmp_path / "other")] == list(range(CHECKPOINT + 1, STEPS + 1))
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "other") if "lr" in r}
    lr_first = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "first") if "lr" in r}
    assert lr == pytest.approx({step: lr_first[step] for step in lr})  # the same schedule, step for step


def glue(output_dir: Path, *extra: str) -> list[str]:
    """37 MRPC pairs, a global batch of 8 (the last step of the epoch holds 5), 2 epochs, dropout off: 10 steps,
    a checkpoint mid-epoch at step 3."""
    return ["--model_name_or_path", tiny_bert(), "--max_train_samples", "37", "--max_eval_samples", "8",
            "--max_length", "32", "--num_train_epochs", "2", "--dropout", "0", "--mixed_precision", "no",
            "--log_every", "1", "--per_device_train_batch_size", "4", "--global_batch_size", "8",
            "--learning_rate", "1e-4", "--checkpointing_steps", "3", "--output_dir", str(output_dir),
            *extra]  # fmt: skip


@pytest.mark.slow
def test_glue_checkpoint_of_two_processes_resumes_on_one_mid_epoch(tmp_path):
    """GLUE's order of global batches does not depend on the number of processes (one shuffle, the same global
    batch, each step's loss weighted by its real examples): mid-epoch, 2 -> 1 ends where 2 processes end."""
    two = tmp_path / "two"
    run("glue-bert", 2, glue(two))
    one = tmp_path / "one"
    reset_accelerate_state()
    load_recipe("glue_bert").main(glue(one, "--resume_from_checkpoint", str(two / "checkpoints" / "step-0000003")))
    reset_accelerate_state()
    assert json.loads((one / "all_results.json").read_text())["optimizer_steps"] == 10
    assert_same_run(one, two)
    assert (one / "eval_predictions.tsv").read_text() == (two / "eval_predictions.tsv").read_text()
