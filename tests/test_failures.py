"""Failures during training lose nothing: a non-finite gradient stops the run (or is skipped, up to a limit)
without writing from a broken state, and checkpoints and models load without running anyone's code."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, gpt_args, load_recipe, read_metrics, reset_accelerate_state
from safetensors.torch import load_file


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


class RunsCode:
    """A pickle that runs a command when unpickled: what a malicious checkpoint file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("poisoned", ["optimizer.bin", "random_states_0.pkl"])
def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path, token_cache, capsys, poisoned):
    recipe = load_recipe("gpt_pretrain")
    out = tmp_path / "run"
    recipe.main(
        gpt_args(out, token_cache, "--max_train_steps", "2", "--checkpointing_steps", "1", "--sample_tokens", "0")
    )
    reset_accelerate_state()
    checkpoint, marker = out / "checkpoints" / "step-0000001", tmp_path / "code-ran"
    with open(checkpoint / poisoned, "wb") as f:
        pickle.dump({"state": RunsCode(marker)}, f)
    # The attacker also fixes the file's size in the checkpoint's list, so that only loading it can tell.
    state = json.loads((checkpoint / "training_state.json").read_text())
    import run_kit

    state["files"][poisoned] = [(checkpoint / poisoned).stat().st_size, run_kit.sha256_of(checkpoint / poisoned)]
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    assert pickle.loads((checkpoint / poisoned).read_bytes()) and marker.exists()  # the payload does work...
    marker.unlink()

    with pytest.raises(SystemExit) as exit_info:
        recipe.main(gpt_args(tmp_path / "resumed", token_cache, "--max_train_steps", "2", "--resume_from_checkpoint",
                             str(checkpoint)))  # fmt: skip
    assert exit_info.value.code == 2
    assert "is corrupted or incomplete (UnpicklingError" in capsys.readouterr().err
    assert not marker.exists()  # ...but loading with weights_only=True never ran it


def test_a_model_with_its_own_code_is_not_run_without_trust_remote_code(tmp_path, capsys):
    model_dir, marker = tmp_path / "custom_model", tmp_path / "code-ran"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "sneaky-bert",
        "auto_map": {"AutoConfig": "sneaky.SneakyConfig", "AutoModelForSequenceClassification": "sneaky.SneakyModel"},
    }))  # fmt: skip
    (model_dir / "sneaky.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("glue_bert").main(["--model_name_or_path", str(model_dir), "--data_dir",
                                       str(DATA_DIR / "glue" / "MRPC"), "--max_train_samples", "8",
                                       "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.faults
def test_ctrl_c_while_preparing_the_token_cache_exits_130_and_leaves_no_lock(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import SHAKESPEARE, subprocess_env

    corpus = tmp_path / "big.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 20)
    command = [sys.executable, "-m", "accel_dp.cli", "prepare", "gpt-pretrain", "--", "--train_file", str(corpus),
               "--tokenizer", "byte", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    run = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "cache").glob("*.tmp-*/train.bin")):
            assert run.poll() is None and time.monotonic() < deadline, "tokenizing never started"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, stderr[-3000:]
    assert "interrupted (Ctrl-C)" in stderr and "Traceback" not in stderr
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert not [name for name in left if name.endswith(".lock") or ".tmp-" in name], left
