"""recipes/training.py: the optimizer and its schedule, the step and its non-finite decision, the non-finite policy
through whole runs, and Local SGD's averaging."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import training
from conftest import (
    gpt_args,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
)
from safetensors.torch import load_file


class RecordingOptimizer:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        pass


@pytest.mark.parametrize(("norm", "finite"), [(None, True), (2.5, True), (float("nan"), False), (float("inf"), False)])
def test_a_gradient_norm_as_deepspeed_returns_it_is_judged_without_crashing(norm, finite):
    """DeepSpeed's clip_grad_norm_ gives a float (None before its first step), not a tensor."""
    accelerator = types.SimpleNamespace(sync_gradients=True, scaler=None, clip_grad_norm_=lambda *a, **k: norm)
    optimizer = RecordingOptimizer()
    model = torch.nn.Linear(2, 2)
    assert training.optimizer_step(accelerator, model, optimizer, 1.0)[0] is finite
    assert optimizer.steps == (1 if finite else 0)


def test_the_nonfinite_policy_skips_up_to_its_limit_logging_each_then_stops_naming_the_last_checkpoint(capsys):
    logged = []
    policy = training.NonFinitePolicy(2, lambda record, message: logged.append(record), lambda: "step-0000004")
    bad = training.Step(torch.tensor(0.0), 1, 1, 0.0, float("nan"), finite=False)
    policy.check(5, bad._replace(finite=True))  # a finite step: nothing to do
    policy.check(6, bad)
    policy.check(7, bad)
    assert logged == [{"step": 6, "skipped_nonfinite_step": 1}, {"step": 7, "skipped_nonfinite_step": 2}]
    assert policy.state_dict() == {"skipped_steps": 2}
    with pytest.raises(SystemExit) as exit_info:
        policy.check(8, bad)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "gradient norm is nan at optimizer step 8" in error and "last checkpoint: step-0000004" in error
    assert "all 2 skips that --nonfinite_skip_limit allows are used up" in error
    resumed = training.NonFinitePolicy(2, lambda *a: None, lambda: None)
    resumed.load_state_dict({"skipped_steps": 2})
    with pytest.raises(SystemExit):  # the count comes back from a checkpoint: no fresh skips after a resume
        resumed.check(9, bad)


def test_local_sgd_is_off_with_one_process_and_averages_nothing():
    from accelerate import Accelerator

    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    local_sgd = training.LocalSGD(Accelerator(cpu=True), model, every=2)
    assert not local_sgd.enabled
    with local_sgd:
        local_sgd.step(2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def exploding_args(recipe: str, output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """A learning rate of 1e30: step 1 is finite and blows the weights up, so step 2's gradient norm is NaN. A
    checkpoint after every step."""
    common = ["--learning_rate", "1e30", "--num_warmup_steps", "0", "--checkpointing_steps", "1", "--log_every", "1"]
    if recipe == "gpt_pretrain":
        return gpt_args(output_dir, token_cache, "--sample_tokens", "0", "--max_train_steps", "4", *common, *extra)
    return ["--max_train_samples", "32", "--max_eval_samples", "8", "--max_length", "32",
            "--per_device_train_batch_size", "4", "--max_train_steps", "4", "--output_dir", str(output_dir),
            *common, *extra]  # fmt: skip


def model_tensors(path: Path) -> dict:
    return {k: v for k, v in load_file(path).items()}


@pytest.mark.parametrize("recipe", ["gpt_pretrain", "glue_bert"])
def test_nonfinite_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, token_cache, capsys, recipe):
    # Twice in one process, the first traceback kept alive (as a notebook keeps sys.last_traceback): a stopped run
    # must close its progress bar, else the next run's bar and error line are drawn one row lower, behind a
    # cursor-up escape, and the error no longer starts its line.
    tracebacks = []
    for out in (tmp_path / "first", tmp_path / "run"):
        reset_accelerate_state()
        with pytest.raises(SystemExit) as exit_info:
            load_recipe(recipe).main(exploding_args(recipe, out, token_cache))
        tracebacks.append(exit_info.tb)
        assert exit_info.value.code == 1
        error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "gradient norm is nan at optimizer step 2" in error[0]
        assert "last checkpoint: step-0000001" in error[0] and "--nonfinite_skip_limit" in error[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000001"
    weights = model_tensors(out / "checkpoints" / "step-0000001" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the last good state, loadable
    assert not (out / "model.safetensors").exists() and not (out / "all_results.json").exists()


@pytest.mark.parametrize("recipe", ["gpt_pretrain", "glue_bert"])
def test_nonfinite_steps_are_skipped_up_to_the_limit_and_change_nothing(tmp_path, token_cache, recipe, capsys):
    out = tmp_path / "run"
    results = load_recipe(recipe).main(exploding_args(recipe, out, token_cache, "--nonfinite_skip_limit", "3"))
    assert results["optimizer_steps"] == 4
    skipped = [r["skipped_nonfinite_step"] for r in read_metrics(out) if "skipped_nonfinite_step" in r]
    assert skipped == [1, 2, 3]  # steps 2, 3 and 4
    # A log window whose every step was skipped logs no loss (not 0, not the previous window's).
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1]
    after_step_1 = model_tensors(out / "checkpoints" / "step-0000001" / "model.safetensors")
    final = model_tensors(out / "model.safetensors")
    shared = set(after_step_1) & set(final)
    assert len(shared) > 10
    assert all(torch.equal(after_step_1[k], final[k]) for k in shared)  # the skipped steps left the weights alone

    reset_accelerate_state()
    with pytest.raises(SystemExit) as exit_info:  # one skip allowed: step 3 is the second NaN
        load_recipe(recipe).main(
            exploding_args(recipe, tmp_path / "limited", token_cache, "--nonfinite_skip_limit", "1")
        )
    assert exit_info.value.code == 1
    assert not (tmp_path / "limited" / "model.safetensors").exists()
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "all 1 skips that --nonfinite_skip_limit allows are used up" in error  # not "allow skips with ..."


def test_adamw_is_torchs_fused_one_except_under_fp16s_loss_scaler():
    """fp16's scaler must see every step to skip and count an overflowing one: there AdamW is foreach."""
    import torch

    model = torch.nn.Linear(4, 4)
    for precision, fused in (("no", True), ("bf16", True), ("fp16", False)):
        optimizer, _ = training.make_optimizer(
            model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99), schedule="constant_with_warmup",
            num_warmup_steps=0, num_training_steps=10, mixed_precision=precision,
        )  # fmt: skip
        assert bool(optimizer.defaults["fused"]) is fused and bool(optimizer.defaults["foreach"]) is not fused
