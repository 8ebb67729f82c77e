"""A run killed with SIGKILL and resumed from its last checkpoint ends exactly where an uninterrupted run ends."""

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
from conftest import RECIPES_DIR, free_port, gpt_args, load_recipe, read_metrics, saved_parameters, subprocess_env


def resumable_args(output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """Dropout on, so that resuming must restore every rank's random state too; 120 steps, so a kill right
    after the first checkpoint (step 20) lands mid-run."""
    return gpt_args(output_dir, token_cache, "--n_embd", "64", "--dropout", "0.1", "--per_device_train_batch_size",
                    "8", "--max_train_steps", "120", "--num_warmup_steps", "10", "--checkpointing_steps", "20",
                    "--checkpoints_total_limit", "2", "--log_every", "10", "--eval_every", "60", "--eval_iters", "2",
                    "--mixed_precision", "no", "--sample_tokens", "0", *extra)  # fmt: skip


def command(procs: int, args: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, str(RECIPES_DIR / "gpt_pretrain.py"), *args]
    return [sys.executable, "-m", "accel_dp.cli", "run", "gpt-pretrain", "--cpu", "--procs", str(procs),
            "--main-port", str(free_port()), "--", *args]  # fmt: skip


def run(procs: int, args: list[str]) -> None:
    result = subprocess.run(command(procs, args), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def run_and_kill_after_first_checkpoint(procs: int, args: list[str], output_dir: Path) -> None:
    process = subprocess.Popen(command(procs, args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not (output_dir / "checkpoints" / "latest").is_file():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # every process of the run, at once, mid-training
        process.wait()
    assert not (output_dir / "all_results.json").exists(), "the run finished before it was killed"


@pytest.mark.parametrize("procs", [1, 2])
def test_killed_run_resumed_from_latest_checkpoint_ends_bitwise_equal(tmp_path, token_cache, procs):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(procs, resumable_args(whole, token_cache))
    run_and_kill_after_first_checkpoint(procs, resumable_args(killed, token_cache), killed)
    run(procs, resumable_args(killed, token_cache, "--resume_from_checkpoint", "latest"))

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    curve = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(whole)]
    assert [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(killed)] == curve
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-0000080", "step-0000100"]  # --checkpoints_total_limit 2, nothing partial
    assert (killed / "checkpoints" / "latest").read_text() == "step-0000100"


def test_resume_from_latest_with_no_checkpoint_starts_fresh_and_a_bad_path_is_refused(tmp_path, token_cache, capsys):
    recipe = load_recipe("gpt_pretrain")
    args = resumable_args(tmp_path / "run", token_cache, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert recipe.main(args)["optimizer_steps"] == 3
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(resumable_args(tmp_path / "other", token_cache, "--resume_from_checkpoint", str(not_a_checkpoint)))
    assert exit_info.value.code == 2
    assert "is not a gpt-pretrain checkpoint" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["optimizer_steps"] == 3
