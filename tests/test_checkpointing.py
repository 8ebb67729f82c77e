"""A run killed with SIGKILL and resumed from its last checkpoint ends exactly where an uninterrupted run ends,
for both recipes, mid-epoch included, on 1 and 2 processes; and a checkpoint is never half-visible."""

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
    RECIPES_DIR,
    accel_dp_run,
    free_port,
    gpt_args,
    kill_process_tree,
    load_recipe,
    read_metrics,
    saved_parameters,
    subprocess_env,
    tiny_bert,
)


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
    return ["--model_name_or_path", tiny_bert(), "--max_train_samples", "70", "--max_eval_samples", "16",
            "--max_length", "48",
            "--per_device_train_batch_size", "6", "--per_device_eval_batch_size", "8", "--num_train_epochs", "2",
            "--learning_rate", "5e-5", "--log_every", "2", "--output_dir", str(output_dir), *extra]  # fmt: skip


def command(recipe: str, procs: int, args: list[str], via_accel_dp: bool = False) -> list[str]:
    """One process: the recipe itself (or through `accel-dp run`); several: `accel-dp run --cpu --procs N`."""
    if procs == 1 and not via_accel_dp:
        return [sys.executable, str(RECIPES_DIR / f"{recipe.replace('-', '_')}.py"), *args]
    return [sys.executable, "-m", "accel_dp.cli", "run", recipe, "--cpu", "--procs", str(procs),
            "--main-port", str(free_port()), "--", *args]  # fmt: skip


def run(recipe: str, procs: int, args: list[str]) -> None:
    """One process: the recipe itself; several: `accel-dp run --cpu --procs N`."""
    if procs == 1:
        result = subprocess.run(command(recipe, 1, args), env=subprocess_env(), capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert accel_dp_run(recipe, procs, args) == 0


def run_and_kill_after_first_checkpoint(recipe: str, procs: int, args: list[str], output_dir: Path) -> None:
    process = subprocess.Popen(command(recipe, procs, args), env=subprocess_env(), stdout=subprocess.DEVNULL,
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


def loss_curve(output_dir: Path) -> list[tuple]:
    return [tuple(r.get(k) for k in ("step", "loss", "eval_loss", "eval_accuracy")) for r in read_metrics(output_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, token_cache):
    """The reference runs, once per recipe and number of processes (checkpointing does not change a run)."""
    done = {}

    def get(recipe: str, procs: int) -> Path:
        if (recipe, procs) not in done:
            out = tmp_path_factory.mktemp(f"{recipe}-{procs}") / "whole"
            args = gpt_resumable_args(out, token_cache) if recipe == "gpt-pretrain" else glue_resumable_args(out)
            run(recipe, procs, args)
            done[recipe, procs] = out
        return done[recipe, procs]

    return get


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.xdist_group("gpt-2")  # with the other tests of the same reference run: it is made once per worker
def test_killed_gpt_run_resumed_from_latest_checkpoint_ends_bitwise_equal(tmp_path, token_cache, uninterrupted):
    """2 processes. (One process resumes exactly too: the preemption test below, gpt-pretrain-1-SIGUSR1.)"""
    procs = 2
    whole, killed = uninterrupted("gpt-pretrain", procs), tmp_path / "killed"
    # Checkpoints at steps 25, 50, ..., between log steps (every 10): each rank's losses not yet logged come back.
    checkpointing = ["--checkpointing_steps", "25", "--checkpoints_total_limit", "2"]
    run_and_kill_after_first_checkpoint(
        "gpt-pretrain", procs, gpt_resumable_args(killed, token_cache, *checkpointing), killed
    )
    run(
        "gpt-pretrain",
        procs,
        gpt_resumable_args(killed, token_cache, *checkpointing, "--resume_from_checkpoint", "latest"),
    )

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    assert loss_curve(killed) == loss_curve(whole)
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-0000075", "step-0000100"]  # --checkpoints_total_limit 2, nothing partial
    assert (killed / "checkpoints" / "latest").read_text() == "step-0000100"


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
def test_killed_local_sgd_run_resumed_from_latest_checkpoint_ends_bitwise_equal(tmp_path, token_cache):
    """Under Local SGD the replicas' optimizer moments differ between averages: each rank saves and gets back its
    own. (Checkpoints at multiples of K, as the uninterrupted run averages only there.) The run kit does this for
    both recipes alike; gpt-pretrain shows it."""
    recipe, local_sgd, every = "gpt-pretrain", "4", "20"

    def args(out, *extra):
        return gpt_resumable_args(out, token_cache, *extra)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(recipe, 2, args(whole, "--local_sgd_steps", local_sgd))
    checkpointing = ["--local_sgd_steps", local_sgd, "--checkpointing_steps", every]
    run_and_kill_after_first_checkpoint(recipe, 2, args(killed, *checkpointing), killed)
    first = killed / "checkpoints" / f"step-{int(every):07d}"
    assert sorted(p.name for p in first.glob("optimizer_rank_*.bin")) == [
        "optimizer_rank_0.bin",
        "optimizer_rank_1.bin",
    ]
    run(recipe, 2, args(killed, *checkpointing, "--resume_from_checkpoint", "latest"))

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    assert loss_curve(killed) == loss_curve(whole)


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.parametrize(
    ("procs", "checkpointing_steps", "first_checkpoint"),
    # On 2 processes the checkpoint (step 3) falls between log steps (every 2): each rank's losses not yet logged
    # must come back to that rank.
    # The xdist groups keep the tests of one reference run (the `uninterrupted` fixture) on one worker.
    # (One process, mid-epoch: the preemption test below, glue-bert-1-SIGTERM, resumes there.)
    [
        pytest.param(2, "3", "step-0000003", marks=pytest.mark.xdist_group("glue-2")),
        pytest.param(1, "epoch", "step-0000012", marks=pytest.mark.xdist_group("glue-1")),
    ],
    ids=["2-processes-mid-epoch", "1-process-epoch"],
)
def test_killed_glue_run_resumed_from_latest_checkpoint_ends_bitwise_equal(
    tmp_path, uninterrupted, procs, checkpointing_steps, first_checkpoint
):
    whole, killed = uninterrupted("glue-bert", procs), tmp_path / "killed"
    checkpointing = ["--checkpointing_steps", checkpointing_steps]
    run_and_kill_after_first_checkpoint("glue-bert", procs, glue_resumable_args(killed, *checkpointing), killed)
    state = json.loads((killed / "checkpoints" / first_checkpoint / "training_state.json").read_text())
    if checkpointing_steps != "epoch":  # killed in the middle of the first epoch
        assert state["recipe"]["epoch"] == 0 and 0 < state["recipe"]["epoch_step"] < {1: 12, 2: 6}[procs]
    run("glue-bert", procs, glue_resumable_args(killed, *checkpointing, "--resume_from_checkpoint", "latest"))

    assert torch.equal(saved_parameters(killed), saved_parameters(whole))
    assert loss_curve(killed) == loss_curve(whole)
    assert (killed / "eval_predictions.tsv").read_text() == (whole / "eval_predictions.tsv").read_text()
    whole_results = json.loads((whole / "all_results.json").read_text())
    killed_results = json.loads((killed / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_f1", "eval_loss", "train_loss", "optimizer_steps", "epochs"):
        assert killed_results[key] == whole_results[key], key


def test_resume_from_latest_with_no_checkpoint_starts_fresh_and_a_bad_path_is_refused(tmp_path, token_cache, capsys):
    recipe = load_recipe("gpt_pretrain")
    args = gpt_resumable_args(
        tmp_path / "run", token_cache, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"
    )
    assert recipe.main(args)["optimizer_steps"] == 3
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(
            gpt_resumable_args(tmp_path / "other", token_cache, "--resume_from_checkpoint", str(not_a_checkpoint))
        )
    assert exit_info.value.code == 2
    assert "is not a gpt-pretrain checkpoint" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "all_results.json").read_text())["optimizer_steps"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM or SIGUSR1 makes every rank finish its step, checkpoint and exit 75; the same command with
# --resume_from_checkpoint latest then ends exactly where an uninterrupted run ends.


def signal_after_first_checkpoint(recipe: str, procs: int, args: list[str], output_dir: Path, send, via_accel_dp):
    """Start a run, wait for its first checkpoint, call send(process) to signal it; its exit status and output.
    Every process of the run has exited by the time the one started here has."""
    process = subprocess.Popen(command(recipe, procs, args, via_accel_dp), env=subprocess_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not (output_dir / "checkpoints" / "latest").is_file():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        workers = descendants(process.pid)
        send(process)
        output, _ = process.communicate(timeout=120)
        left = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        assert not left, f"processes of the run left behind: {left}"
    finally:
        kill_process_tree(process.pid)
    assert not (output_dir / "all_results.json").exists(), "the run finished before the signal"
    assert "preempted" in output, output[-2000:]
    return process.returncode, output


def descendants(launcher_pid: int) -> list[int]:
    parents = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == launcher_pid:
                return True
        return False

    return list(filter(descends, parents))


def rank_process(launcher_pid: int, rank: int) -> int:
    """The pid of the worker with RANK=rank among the launcher's descendants."""
    for pid in descendants(launcher_pid):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no rank {rank} worker under {launcher_pid}")


@pytest.mark.faults  # kill-and-resume: with the fault matrix (`make test-faults`, .ci/run's second step)
@pytest.mark.parametrize(
    ("recipe", "procs", "how"),
    [pytest.param("gpt-pretrain", 1, "SIGUSR1", marks=pytest.mark.xdist_group("gpt-1")),
     pytest.param("gpt-pretrain", 2, "SIGUSR1 to rank 1 only", marks=pytest.mark.xdist_group("gpt-2")),
     pytest.param("glue-bert", 1, "SIGTERM to accel-dp", marks=pytest.mark.xdist_group("glue-1"))],
)  # fmt: skip
def test_preempted_run_checkpoints_exits_75_and_resumes_bitwise_equal(
    tmp_path, token_cache, uninterrupted, recipe, procs, how
):
    whole, preempted = uninterrupted(recipe, procs), tmp_path / "preempted"

    def args(*extra):
        if recipe == "gpt-pretrain":
            return gpt_resumable_args(preempted, token_cache, "--checkpointing_steps", "20", *extra)
        return glue_resumable_args(preempted, "--checkpointing_steps", "9", *extra)

    senders = {
        "SIGUSR1": lambda process: process.send_signal(signal.SIGUSR1),
        # 1 process: accelerate's own launcher would die without passing it on, and the recipe train on, orphaned.
        # (With several, accel-dp sends it to each: tests/test_cli.py shows it, and the case below, one rank
        # signalled, makes every rank checkpoint.)
        "SIGTERM to accel-dp": lambda process: process.send_signal(signal.SIGTERM),
        "SIGUSR1 to rank 1 only": lambda process: os.kill(rank_process(process.pid, 1), signal.SIGUSR1),
    }
    via_accel_dp = "accel-dp" in how or procs > 1
    code, output = signal_after_first_checkpoint(recipe, procs, args(), preempted, senders[how], via_accel_dp)
    assert code == 75 and "Traceback" not in output, output[-3000:]  # the recipe's status, through accel-dp too
    if how == "SIGUSR1 to rank 1 only":
        assert "preempted (a signal to another rank)" in output
    latest = (preempted / "checkpoints" / "latest").read_text()
    state = json.loads((preempted / "checkpoints" / latest / "training_state.json").read_text())
    assert state["layout"]["processes"] == procs
    assert all((preempted / "checkpoints" / latest / f"random_states_{r}.pkl").is_file() for r in range(procs))
    run(recipe, procs, args("--resume_from_checkpoint", "latest"))
    assert torch.equal(saved_parameters(preempted), saved_parameters(whole))
    assert loss_curve(preempted) == loss_curve(whole)


# ---------------------------------------------------------------------------------------------------------------
# Fail fast: a node that dies makes the survivors stop within seconds, naming the lost rank.


@pytest.mark.faults  # (with the fault matrix: `make test-faults`, .ci/run's second step)
@pytest.mark.parametrize("failure", ["killed", "frozen"])
def test_when_a_node_dies_or_hangs_the_other_stops_within_seconds_naming_the_lost_rank(tmp_path, token_cache, failure):
    """killed: its sockets close and the next collective fails at once. frozen (SIGSTOP, like a hung machine):
    nothing closes, and --ddp_timeout bounds the wait."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        argv = [sys.executable, "-m", "accel_dp.cli", "run", "gpt-pretrain", "--cpu", "--nodes", "2", "--procs", "1",
                "--node-rank", str(rank), "--main-ip", "127.0.0.1", "--main-port", str(port), "--",
                *gpt_resumable_args(tmp_path / f"node{rank}", token_cache, "--max_train_steps", "100000",
                                    "--ddp_timeout", "10")]  # fmt: skip
        nodes.append(subprocess.Popen(argv, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "node0" / "metrics.jsonl").is_file():  # both ranks are training
            assert all(node.poll() is None for node in nodes), "a node stopped before training"
            assert time.monotonic() < deadline, "no training within 180 s"
            time.sleep(0.05)
        if failure == "killed":
            kill_process_tree(nodes[1].pid)  # node 1 vanishes: launcher and rank at once
        else:
            kill_process_tree(nodes[1].pid, signal.SIGSTOP)  # node 1 stops answering
        killed_at = time.monotonic()
        _, stderr = nodes[0].communicate(timeout=60)
        stopped_after = time.monotonic() - killed_at
    finally:
        for node in nodes:
            kill_process_tree(node.pid)
    assert nodes[0].returncode not in (0, None)
    assert stopped_after < {"killed": 30, "frozen": 45}[failure]  # frozen: the 10 s timeout, then the check-in
    assert "rank 0: lost contact with rank 1" in stderr, stderr[-3000:]
    assert not (tmp_path / "node0" / "all_results.json").exists()


def fail_on_second(original, matches):
    """`original`, except that its second call for which `matches(*args)` holds raises, as a crash or a full disk
    would at that point."""
    calls = []

    def wrapper(*args, **kwargs):
        if matches(*args):
            calls.append(args)
            if len(calls) == 2:
                raise RuntimeError("unexpected pos 1454016 vs 1453904 (injected)")
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("point", ["in save_state", "before the manifest", "before the rename", "before latest"])
def test_a_save_that_fails_at_any_point_leaves_latest_whole_and_the_resume_exact(tmp_path, token_cache, point,
                                                                                 monkeypatch, capsys):  # fmt: skip
    """Each point of a checkpoint save failed on purpose, at the second save (step 4 of 6): `latest` still names a
    whole checkpoint (step 2), and resuming from it ends bitwise where an uninterrupted run ends."""
    import accelerate
    import run_kit
    from conftest import reset_accelerate_state

    recipe = load_recipe("gpt_pretrain")
    args = gpt_args(tmp_path / "run", token_cache, "--max_train_steps", "6", "--checkpointing_steps", "2",
                    "--eval_every", "6", "--sample_tokens", "0", "--dropout", "0.1")  # fmt: skip
    recipe.main(gpt_args(tmp_path / "whole", token_cache, *args[-10:]))
    reset_accelerate_state()
    injected = {
        "in save_state": (accelerate.Accelerator, "save_state", lambda *a: True),
        "before the manifest": (Path, "write_text", lambda path, *a: path.name == "training_state.json"),
        "before the rename": (Path, "rename", lambda path, *a: path.name.endswith(".partial")),
        "before latest": (run_kit.os, "replace", lambda source, target, *a: str(target).endswith("latest")),
    }[point]
    with monkeypatch.context() as patched:
        patched.setattr(injected[0], injected[1], fail_on_second(getattr(injected[0], injected[1]), injected[2]))
        with pytest.raises((RuntimeError, SystemExit)):
            recipe.main(args)
    reset_accelerate_state()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-0000002"
    assert json.loads((checkpoints / "step-0000002" / "training_state.json").read_text())["step"] == 2
    if point == "in save_state":  # the failed save says why, and removed what it wrote
        error = capsys.readouterr().err
        assert "could not write checkpoint" in error and "GiB are free on its file system" in error
        assert not (checkpoints / "step-0000004.partial").exists()
    recipe.main([*args, "--resume_from_checkpoint", "latest"])
    assert torch.equal(saved_parameters(tmp_path / "run"), saved_parameters(tmp_path / "whole"))
