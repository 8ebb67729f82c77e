"""recipes/accelerator_setup.py: how the process was launched, the accumulation arithmetic, and the Accelerator, each
checked against what was asked for: what accelerate would run otherwise without a word is refused in one line."""

from __future__ import annotations

import subprocess
import sys

import accelerator_setup
import pytest
import torch
from conftest import (
    CONFIGS_DIR,
    RECIPES_DIR,
    assert_refused_before_any_work,
    fp32_gpt_args,
    free_port,
    glue_args,
    gpt_args,
    load_recipe,
    read_metrics,
    reset_accelerate_state,
    saved_parameters,
    subprocess_env,
)


@pytest.mark.parametrize(
    ("per_device", "world", "accumulation", "global_batch", "expected"),
    [(4, 1, None, None, 1), (4, 2, 3, None, 3), (4, 2, None, 16, 2), (4, 1, None, 16, 4), (4, 2, 2, 16, 2)],
)
def test_the_accumulation_keeps_the_global_batch_on_any_number_of_processes(
    per_device, world, accumulation, global_batch, expected
):
    assert accelerator_setup.settle_accumulation(per_device, world, accumulation, global_batch) == expected


@pytest.mark.parametrize(
    ("per_device", "world", "accumulation", "global_batch", "message"),
    [(4, 3, None, 16, "is not a multiple of per_device_train_batch_size x processes = 4 x 3 = 12"),
     (4, 2, 3, 16, "--gradient_accumulation_steps 3 contradicts --global_batch_size 16, which needs 2")],
)  # fmt: skip
def test_an_accumulation_that_cannot_keep_the_global_batch_is_refused(
    per_device, world, accumulation, global_batch, message, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        accelerator_setup.settle_accumulation(per_device, world, accumulation, global_batch)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_accelerates_cpu_switch_means_cpu_whatever_cpu_says(monkeypatch):
    """ACCELERATE_USE_CPU=1 (what cpu configs export) makes accelerate run on CPU: every check must agree (fp16's
    refusal, PowerSGD's single bucket over gloo), also on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert not accelerator_setup.runs_on_cpu(False, 2) and accelerator_setup.runs_on_cpu(True, 1)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert accelerator_setup.runs_on_cpu(False, 1)
    assert accelerator_setup.ddp_kwargs("powersgd", None, None, on_cpu=True).bucket_cap_mb == 2**20
    assert accelerator_setup.ddp_kwargs("powersgd", None, None, on_cpu=False).bucket_cap_mb == 25  # DDP's default


def test_recipes_take_accelerates_cpu_switch_for_cpu_also_on_a_gpu_machine(monkeypatch, token_cache, tmp_path, capsys):
    """On a machine with a GPU (simulated) under ACCELERATE_USE_CPU=1, fp16 is refused rather than trained in fp32
    and reported as fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("gpt_pretrain").main(gpt_args(tmp_path / "out", token_cache, "--mixed_precision", "fp16"))
    assert exit_info.value.code == 2 and "fp16 does nothing on CPU" in capsys.readouterr().err


def test_recipe_refuses_to_run_alone_when_launched_for_two_processes(tmp_path, token_cache):
    """`accelerate launch --cpu --num_processes 2` starts ONE process; the recipe says so instead of training. (The
    check is accelerator_setup's, the same in glue-bert.)"""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), str(RECIPES_DIR / "gpt_pretrain.py"),
               *fp32_gpt_args(tmp_path / "run", token_cache)]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert_refused_before_any_work(result, "started only this one", tmp_path / "run")
    assert "--multi_gpu --num_processes N" in result.stderr


def test_fsdp_config_on_cpu_is_refused_by_the_recipe(tmp_path, token_cache):
    """With fsdp.yaml on CPU accelerate silently runs plain DDP (every process holds the whole model): the recipe,
    launched by plain `accelerate launch`, refuses. (`accel-dp run --config fsdp --cpu` refuses before launching.)"""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS_DIR / "fsdp.yaml"),
               "--num_processes", "1", "--main_process_port", str(free_port()), str(RECIPES_DIR / "gpt_pretrain.py"),
               *fp32_gpt_args(out, token_cache)]  # fmt: skip
    env = subprocess_env(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    message = "FSDP was asked for (ACCELERATE_USE_FSDP) but accelerate runs MULTI_CPU"
    assert_refused_before_any_work(result, message, out)


def test_glue_bf16_on_cpu_really_changes_the_numbers(tmp_path):
    recipe = load_recipe("glue_bert")
    fp32 = recipe.main(glue_args(tmp_path / "fp32", "--max_train_steps", "2"))
    reset_accelerate_state()
    bf16 = recipe.main(glue_args(tmp_path / "bf16", "--max_train_steps", "2", "--mixed_precision", "bf16"))
    assert bf16["eval_loss"] != fp32["eval_loss"]
    assert abs(bf16["eval_loss"] - fp32["eval_loss"]) < 0.05
    assert (saved_parameters(tmp_path / "bf16") - saved_parameters(tmp_path / "fp32")).abs().max() > 0


def test_gpt_bf16_on_cpu_really_changes_the_numbers_and_still_trains(tmp_path, token_cache):
    recipe = load_recipe("gpt_pretrain")
    fp32 = recipe.main(fp32_gpt_args(tmp_path / "fp32", token_cache, "--per_device_train_batch_size", "4"))
    reset_accelerate_state()
    bf16 = recipe.main(fp32_gpt_args(tmp_path / "bf16", token_cache, "--per_device_train_batch_size", "4",
                                     "--mixed_precision", "bf16"))  # fmt: skip
    assert bf16["mixed_precision"] == "bf16"
    assert bf16["eval_loss"] != fp32["eval_loss"]
    assert abs(bf16["eval_loss"] - fp32["eval_loss"]) < 0.1
    losses = [r["loss"] for r in read_metrics(tmp_path / "bf16") if "loss" in r]
    assert losses[-1] < losses[0]
