"""Every launch path behaves like the direct one: the recipe's exit status and one error line through accel-dp's
runner, the launcher environment on GPU machines, and what FSDP and DeepSpeed change (simulated on CPU: their
checkpoint layouts, a sharded model's sample, DeepSpeed's gradient norm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import run_kit
import torch
from conftest import CONFIGS_DIR, REPO_ROOT, free_port, gpt_args, load_recipe, read_metrics, subprocess_env

from accel_dp import runner
from accel_dp.launch import RunOptions, build_launch

TWO_RANKS = """
import os, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
error = Path(os.environ["ACCEL_DP_ERROR_DIR"], f"rank-{rank}")
if rank == 1:  # fails at once, as the run kit does: its line into the runner's folder, then its own status
    error.write_text("error: the same bad input\\nerror: only rank 1 saw this\\n")
    sys.exit(3)
error.write_text("error: the same bad input\\n")
time.sleep(60)  # until the launcher, seeing rank 1 gone, stops it
"""


def test_runner_returns_the_first_failing_process_s_status_and_each_error_line_once(tmp_path, capfd):
    script = tmp_path / "ranks.py"
    script.write_text(TWO_RANKS)
    before = dict(os.environ)
    args = ["--config_file", str(CONFIGS_DIR / "multi_cpu.yaml"), "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1", str(script)]  # fmt: skip
    code = runner.run(args, {"ACCELERATE_USE_CPU": "1"})
    err = capfd.readouterr().err
    # Rank 0, stopped by the launcher (SIGTERM), does not hide rank 1's own status behind its -15.
    assert code == 3
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: the same bad input",
        "error: only rank 1 saw this",
    ]
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert dict(os.environ) == before  # a caller in the same process keeps its environment


def test_runner_keeps_the_launcher_s_own_output_when_the_launcher_fails(tmp_path, capfd):
    code = runner.run(["--config_file", str(CONFIGS_DIR / "cpu.yaml"), str(tmp_path / "no_such_script.py")])
    assert code == 2 and "no_such_script.py" in capfd.readouterr().err  # python's own message, as it is


def test_one_gpu_config_leaves_the_visible_gpu_to_the_caller(tmp_path):
    """single_gpu.yaml must not pin GPU 0: under CUDA_VISIBLE_DEVICES=3 (or a Slurm allocation of one GPU) the
    process sees what the caller gave it. Through accelerate's launcher for real (no GPU is needed to see it)."""
    script = tmp_path / "show.py"
    script.write_text(f"import os; open({str(tmp_path / 'seen')!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "3"
    try:
        assert runner.run(["--config_file", str(CONFIGS_DIR / "single_gpu.yaml"), str(script)]) == 0
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES")
        if before is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
    assert (tmp_path / "seen").read_text() == "3"


def test_a_cpu_config_runs_on_cpu_also_on_a_gpu_machine_without_cpu_flag():
    """--config multi_cpu (use_cpu: true) without --cpu on a machine with GPUs: the processes are told to use the CPU
    (else they would take the GPUs), and --procs counts them."""
    launch = build_launch(REPO_ROOT / "recipes" / "gpt_pretrain.py", RunOptions(config="multi_cpu", procs=2), 8,
                          python="python", cpu_cores=16)  # fmt: skip
    assert launch.env == {"ACCELERATE_USE_CPU": "1"} and "2 CPU processes" in launch.summary
    argv = launch.argv
    assert argv[argv.index("--num_cpu_threads_per_process") + 1] == "8"  # accelerate's rule, passed: no warning


def test_recipes_take_accelerates_cpu_switch_for_cpu_also_on_a_gpu_machine(monkeypatch, token_cache, tmp_path, capsys):
    """ACCELERATE_USE_CPU=1 (what cpu configs export) makes accelerate run on CPU whatever --cpu says: on a machine
    with a GPU (simulated), fp16 must be refused there too, rather than train in fp32 and report fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("gpt_pretrain").main(gpt_args(tmp_path / "out", token_cache, "--mixed_precision", "fp16"))
    assert exit_info.value.code == 2 and "fp16 does nothing on CPU" in capsys.readouterr().err


def test_recipes_ddp_hook_options_treat_accelerates_cpu_switch_as_cpu(monkeypatch):
    """PowerSGD's single-bucket workaround for gloo must follow ACCELERATE_USE_CPU, not --cpu alone."""
    recipe = load_recipe("gpt_pretrain")
    args = recipe.parse_args(["--ddp_comm_hook", "powersgd"])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    captured = {}
    monkeypatch.setattr(run_kit, "ddp_kwargs", lambda args, on_cpu: captured.setdefault("on_cpu", on_cpu) and None)
    monkeypatch.setattr(run_kit, "Accelerator", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        run_kit.start_accelerator(args, "gpt-pretrain")
    assert captured["on_cpu"] is True


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
    recipe = load_recipe("gpt_pretrain")
    accelerator = types.SimpleNamespace(sync_gradients=True, scaler=None, clip_grad_norm_=lambda *a, **k: norm)
    optimizer = RecordingOptimizer()
    model = torch.nn.Linear(2, 2)
    assert recipe.optimizer_step(accelerator, model, optimizer, 1.0)[0] is finite
    assert optimizer.steps == (1 if finite else 0)


def fake_checkpoint(folder: Path, files: dict[str, bytes], layout: dict) -> Path:
    """A checkpoint folder with `files` (as FSDP's or DeepSpeed's save_state lays them out) and its own state."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    state = {"format": 2, "step": 4, "layout": layout, "per_process_optimizer": False, "skipped_steps": 0,
             "meter": {}, "recipe": {}, "files": {n: len(d) for n, d in files.items()}}  # fmt: skip
    (folder / "training_state.json").write_text(json.dumps(state))
    return folder


def tensors_file() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"step": torch.tensor(4)}, buffer)
    return buffer.getvalue()


LAYOUTS = {
    # FSDP with SHARDED_STATE_DICT, as fsdp.yaml asks: a distributed-checkpoint folder for the model and one for
    # the optimizer (no model.safetensors, no optimizer.bin).
    "fsdp": {"pytorch_model_fsdp_0/__0_0.distcp": b"m" * 300, "pytorch_model_fsdp_0/.metadata": b"x" * 40,
             "optimizer_0/__0_0.distcp": b"o" * 600, "optimizer_0/.metadata": b"y" * 40},
    # DeepSpeed: its engine's own checkpoint folder.
    "deepspeed": {"pytorch_model/mp_rank_00_model_states.pt": b"m" * 300,
                  "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 600, "latest": b"pytorch_model"},
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_checks_the_files_that_fsdp_and_deepspeed_save_state_wrote(tmp_path, layout, capsys):
    recipe = load_recipe("gpt_pretrain")
    from accelerate import Accelerator

    args = recipe.parse_args(["--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "run")])
    accelerator = Accelerator(cpu=True)
    files = {**LAYOUTS[layout], "scheduler.bin": tensors_file(), "random_states_0.pkl": tensors_file()}
    batch = {"per_device_train_batch_size": 4, "processes": 1, "gradient_accumulation_steps": 1}
    whole = fake_checkpoint(tmp_path / "whole", files, batch)
    args.resume_from_checkpoint = str(whole)
    assert run_kit.Checkpointer(accelerator, args, tmp_path / "run", "gpt-pretrain").resumed_step == 4

    cut = fake_checkpoint(tmp_path / "cut", files, batch)
    shard = next(name for name in LAYOUTS[layout] if "optim" in name)
    (cut / shard).write_bytes(b"o" * 100)  # a save cut short
    args.resume_from_checkpoint = str(cut)
    with pytest.raises(SystemExit):
        run_kit.Checkpointer(accelerator, args, tmp_path / "run", "gpt-pretrain")
    assert f"is corrupted or incomplete (OSError: {shard} is missing or has another size" in capsys.readouterr().err


SHARDED_SAMPLE = """
import importlib.util, sys, types
from contextlib import nullcontext
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

sys.path.insert(0, sys.argv[1].rsplit("/", 1)[0])  # the recipe's modules, beside it
spec = importlib.util.spec_from_file_location("recipe", sys.argv[1])
recipe = importlib.util.module_from_spec(spec); sys.modules["recipe"] = recipe; spec.loader.exec_module(recipe)
dist.init_process_group("gloo")
rank = dist.get_rank()
vocab = {c: i for i, c in enumerate("abcdefgh \\n")}
core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
core.pre_tokenizer, core.decoder = pre_tokenizers.Split("", behavior="isolated"), decoders.Fuse()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=2, n_head=2))
for block in model.transformer.h:
    fully_shard(block)
fully_shard(model)  # every parameter is now a shard: a forward needs all ranks
accelerator = types.SimpleNamespace(distributed_type=types.SimpleNamespace(name="FSDP"), is_main_process=rank == 0,
                                    num_processes=2, device=torch.device("cpu"), unwrap_model=lambda m: m,
                                    autocast=nullcontext)
torch.manual_seed(rank)  # different draws on each rank: one may end early at EOS, the other must not wait alone
sample = recipe.generate_sample(accelerator, model, tokenizer, "ab", 12, 32)
open(sys.argv[2] + f"/rank{rank}", "w").write(sample)
dist.barrier()  # both done before either tears its process group down
dist.destroy_process_group()
"""


def test_the_sample_of_a_sharded_model_is_generated_by_every_process_in_step(tmp_path):
    """Under FSDP or ZeRO-3 a forward needs every rank: generate_sample runs on all of them (synced_gpus) rather than
    on rank 0 alone, which would wait for the others until --ddp_timeout. Simulated with torch's own FSDP2
    (fully_shard), which runs over gloo on CPU."""
    script = tmp_path / "sample.py"
    script.write_text(SHARDED_SAMPLE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(REPO_ROOT / "recipes" / "gpt_pretrain.py"),
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank0").read_text().startswith("ab") and (tmp_path / "rank1").exists()


def test_a_run_that_cannot_fit_in_memory_is_refused_in_seconds(tmp_path, token_cache, capsys):
    """The issue's case: attention over 12 x 100,000 tokens would train on, silently, for minutes (here x 10 in
    batch, so that it cannot fit on any CI machine either)."""
    import time

    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        load_recipe("gpt_pretrain").main(gpt_args(tmp_path / "out", token_cache, "--block_size", "100000",
                                                  "--per_device_train_batch_size", "120"))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and time.monotonic() - start < 30
    assert "this run needs about" in err and "lower --block_size, --per_device_train_batch_size" in err
    assert not (tmp_path / "out").exists()


def test_resuming_from_an_older_checkpoint_moves_the_newer_ones_aside_and_latest_stays_whole(
    tmp_path, token_cache, capsys
):
    """Issue: pruning kept the last K folders by name, so resuming from step 10 of a run that had 10/20/30 with a
    limit of 1 deleted the new step 20 in favour of the old 30, and `latest` named a folder that was gone."""
    recipe = load_recipe("gpt_pretrain")
    out = tmp_path / "run"
    args = gpt_args(out, token_cache, "--max_train_steps", "35", "--checkpointing_steps", "10", "--sample_tokens", "0")
    recipe.main(args)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000010", "step-0000020", "step-0000030"]
    old_timeline = {p.name: (p / "training_state.json").read_text() for p in checkpoints.glob("step-*")}

    from conftest import reset_accelerate_state

    reset_accelerate_state()
    recipe.main(
        [*args, "--checkpoints_total_limit", "1", "--resume_from_checkpoint", str(checkpoints / "step-0000010")]
    )
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000030"]  # this timeline's newest
    assert (checkpoints / "latest").read_text() == "step-0000030"
    assert json.loads((checkpoints / "step-0000030" / "training_state.json").read_text())["step"] == 30
    [aside] = checkpoints.glob("abandoned-*")
    assert {p.name: (p / "training_state.json").read_text() for p in aside.iterdir()} == {
        name: text for name, text in old_timeline.items() if name != "step-0000010"
    }  # the abandoned timeline is kept whole, not deleted
    assert "moved to" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out) if "eval_loss" in r] == [15, 30, 35]  # no record from the old run
